"""Quantization grids: U-Net weights that lie exactly on an integer grid, stored with the grid.

``compress --quant`` does not ship fake-quantized fp32. It writes a normal diffusers U-Net whose
quantized layers' weights are *exactly* ``q * scale`` (``q`` integer), plus the grid itself::

    unet/quantization.json           scheme, method, per-layer bits / group size / kind / reason
    unet/quantization.safetensors    "<layer>.scale" float32 and "<layer>.q" int8 per layer

so PyTorch runs the quantized model unchanged (generate / eval work on it), and each export
target lowers the same integers into its own quantized kernels.

Convention (one grid every target's quantizer can reproduce):

* symmetric, zero point 0, *restricted* range ``[-qmax, qmax]`` with ``qmax = 2**(bits-1) - 1``
  (127 for int8, 7 for int4);
* every output channel (or group) that is not all zero holds ``+qmax`` or ``-qmax``, so
  ``max|w| / qmax`` - what an abs-max symmetric observer computes (XNNPACKQuantizer, ai-edge-
  quantizer, coremltools ``linear_symmetric``) - gives back exactly ``scale`` and the same ``q``;
* ``group_size=None``: one scale per output channel, shape ``(O,)``; otherwise groups of
  ``group_size`` consecutive *input* channels, shape ``(O, I // group_size)``, shared over a
  convolution's kernel positions (Core ML's per-block layout, ONNX blocked quantization on axis 1);
* every scale is exactly representable in fp16 (and group scales in bf16 too, XNNPACK's ``qb4w``
  storage), rounded so when it is made (``storable_scale``): each target stores it at half the
  cost of fp32 and still computes exactly ``q * scale``. It also makes ``qmax * scale`` exact in
  float32 (at most 11 + 7 significant bits), so the abs-max round trip above is exact;
* at 4 bits the U-Net's other float parameters (biases, norms, the few layers off the grid) are rounded to
  fp16 too (``round_floats_fp16``; ``settings["float_params"] = "fp16"``): a target that stores them in fp16
  (ONNX: an fp16 initializer and a ``Cast``) still computes exactly what PyTorch does. They are 2.8 % of the
  demo U-Net's fp32 bytes, a fifth of a 14 % W4 budget, and the rounding costs far less than the 4-bit grid.
  The size budget still counts them at fp32 (what TFLite and XNNPACK store).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pocketfusion.errors import UserError

GRID_JSON = "quantization.json"
GRID_TENSORS = "quantization.safetensors"
GRID_VERSION = 1
SCHEMES = ("w8", "w4", "w8a8", "w8a16")


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


@dataclass
class LayerGrid:
    """The grid of one ``nn.Linear`` / ``nn.Conv2d`` weight."""

    name: str  # module path inside the UNet2DConditionModel, e.g. "down_blocks.0.attentions.0.proj_in"
    kind: str  # "linear" | "conv"
    bits: int  # 8 | 4
    group_size: int | None  # None: per output channel; else consecutive input channels
    shape: tuple[int, ...]  # weight shape
    scale: Any = None  # torch.float32, (O,) or (O, I // group_size); on the CPU in a grid quantize_unet returns
    reason: str = ""  # why this layer has these bits (mixed precision: the measured cost)

    def expand(self, scale):
        """``scale`` broadcast to the weight's shape."""
        o = self.shape[0]
        if self.group_size is None:
            return scale.reshape(o, *([1] * (len(self.shape) - 1))).expand(self.shape)
        s = scale.repeat_interleave(self.group_size, dim=1)  # (O, I)
        return s.reshape(o, self.shape[1], *([1] * (len(self.shape) - 2))).expand(self.shape)

    def quantize(self, weight):
        """Integers of ``weight`` on this grid (int8 tensor), clamped to ``[-qmax, qmax]``."""
        import torch

        m = qmax(self.bits)
        return torch.clamp(torch.round(weight.float() / self.expand(self.scale.to(weight.device))), -m, m).to(torch.int8)

    def dequantize(self, q):
        """``q * scale`` on ``q``'s device."""
        return q.float() * self.expand(self.scale.to(q.device))

    def meta(self) -> dict:
        d = asdict(self)
        d.pop("scale")
        d["shape"] = list(self.shape)
        return d


@dataclass
class QuantGrid:
    """Every quantized layer of a U-Net, with how and why."""

    scheme: str  # one of SCHEMES
    method: str  # "rtn" | "gptq" | ...
    layers: dict[str, LayerGrid] = field(default_factory=dict)
    activations: dict = field(default_factory=dict)  # scheme a8/a16: per-layer activation bits, ranges, fallbacks
    settings: dict = field(default_factory=dict)  # group size, calibration set, thresholds, ...

    @property
    def weight_bits(self) -> dict[str, int]:
        return {n: g.bits for n, g in self.layers.items()}

    def integers(self, unet) -> dict[str, Any]:
        """The int8 tensors of ``unet``'s quantized layers; raises if a weight is off its grid."""
        mods = dict(unet.named_modules())
        out = {}
        for name, g in self.layers.items():
            w = mods[name].weight.detach()
            q = g.quantize(w)
            if not bool((g.dequantize(q) == w.float()).all()):
                raise UserError(f"layer {name}: weights are not on their quantization grid (edited after compress?)")
            out[name] = q
        return out

    def save(self, folder: str | Path, unet) -> None:
        """Write ``quantization.json`` / ``.safetensors`` into ``folder`` (the U-Net's folder)."""
        from safetensors.torch import save_file

        from pocketfusion import artifact

        folder = Path(folder)
        ints = self.integers(unet)
        tensors = {}
        for name, g in self.layers.items():
            tensors[f"{name}.scale"] = g.scale.float().cpu().contiguous()
            tensors[f"{name}.q"] = ints[name].cpu().contiguous()
        tmp = folder / (GRID_TENSORS + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(folder / GRID_TENSORS)
        meta = {
            "version": GRID_VERSION, "scheme": self.scheme, "method": self.method, "settings": self.settings,
            "activations": self.activations, "layers": {n: g.meta() for n, g in self.layers.items()},
        }
        artifact.atomic_write_text(folder / GRID_JSON, json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> QuantGrid | None:
        """The grid stored in a U-Net folder, or None when it has none."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / GRID_JSON).is_file():
            return None
        try:
            meta = json.loads((folder / GRID_JSON).read_text())
            tensors = load_file(str(folder / GRID_TENSORS))
        except (OSError, ValueError, SafetensorError) as e:
            raise UserError(f"{folder}: unreadable quantization grid ({e})") from None
        if meta.get("version") != GRID_VERSION:
            raise UserError(f"{folder / GRID_JSON}: unknown grid version {meta.get('version')!r} (this tool reads {GRID_VERSION})")
        layers = {}
        for name, m in meta["layers"].items():
            if f"{name}.scale" not in tensors:
                raise UserError(f"{folder / GRID_TENSORS}: no scale for layer {name}")
            layers[name] = LayerGrid(
                name=name, kind=m["kind"], bits=int(m["bits"]), group_size=m["group_size"], shape=tuple(m["shape"]),
                scale=tensors[f"{name}.scale"], reason=m.get("reason", ""),
            )
        return cls(meta["scheme"], meta["method"], layers, meta.get("activations", {}), meta.get("settings", {}))


def quantizable_layers(unet) -> dict[str, Any]:
    """``nn.Linear`` and ``nn.Conv2d`` modules of a U-Net, by module path."""
    import torch

    return {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def layer_group_size(module, bits: int, group_size: int) -> int | None:
    """The group size a layer gets: ``group_size`` at 4 bits when it divides the input channels, else per channel."""
    if bits == 8:
        return None
    i = module.weight.shape[1]
    return group_size if i >= group_size and i % group_size == 0 else None


def absmax_scale(weight, bits: int, group_size: int | None, clip=1.0):
    """Abs-max scale per channel or group, times ``clip`` (a float or a tensor of the scale's shape),
    made storable (``storable_scale``)."""
    import torch

    w = weight.detach().float()
    o = w.shape[0]
    if group_size is None:
        amax = w.reshape(o, -1).abs().amax(dim=1)
    else:
        i = w.shape[1]
        amax = w.reshape(o, i // group_size, group_size, -1).abs().amax(dim=(2, 3))
    s = amax * clip / qmax(bits)
    return storable_scale(torch.where(s > 0, s, torch.ones_like(s)), bits, group_size)


FP16_TINY = 2.0 ** -24  # the smallest positive fp16 (subnormal); exact in bf16 too
FP16_BF16_MAX = 65280.0  # the largest value exact in both fp16 and bf16


def _storable(s, group_size: int | None):
    """Elementwise: ``s`` exact in fp16 (and, for groups, in bf16), and > 0."""
    import torch

    ok = (s.to(torch.float16).float() == s) & (s > 0)
    if group_size is not None:
        ok &= s.to(torch.bfloat16).float() == s
    return ok


def observed_fp16(scale, bits: int):
    """The scale an abs-max observer working in fp16 finds for ``scale`` (Core ML at fp16 precision:
    ``fp16(max|w16| / qmax)`` with ``w16 = fp16(qmax * scale)``, the division done in float32)."""
    import torch

    m = float(qmax(bits))
    return ((scale.float() * m).to(torch.float16).float() / m).to(torch.float16).float()


def storable_scale(scale, bits: int, group_size: int | None):
    """``scale`` (positive) rounded to the nearest fp16 value, and for groups (``group_size`` not None)
    then to bf16: a value every target stores exactly - fp16 scales in ONNX and Core ML, bf16 group
    scales in XNNPACK (``qb4w``), fp32 in TFLite. A scale that would round to 0 becomes the smallest
    fp16 (``2**-24``), not 0: a channel / group whose weights are not all zero keeps a scale > 0.

    Then, where an fp16 abs-max observer (``observed_fp16``: Core ML quantizing fp16 weights) would
    not give the scale back - at 8 bits about 1 scale in 128, whose ``127 * s`` is a tie in fp16 - it
    moves to a neighbouring storable value that it does give back (float32 observers always do: ``qmax
    * s`` is exact in float32)."""
    import torch

    s = scale.float().clamp(max=FP16_BF16_MAX)
    h = s.to(torch.float16).float()
    if group_size is not None:
        h = h.to(torch.bfloat16).float()  # an fp16 value rounded to bf16 is still exact in fp16
    h = torch.where((h == 0) & (s > 0), torch.full_like(h, FP16_TINY), h)
    bits_dtype = torch.float16 if group_size is None else torch.bfloat16
    for step in (1, -1):  # next storable value up, then down (positive floats: the integer view is monotonic)
        bad = observed_fp16(h, bits) != h
        if not bool(bad.any()):
            break
        cand = (h.to(bits_dtype).view(torch.int16) + step).view(bits_dtype).float()
        h = torch.where(bad & _storable(cand, group_size) & (observed_fp16(cand, bits) == cand), cand, h)
    return h


def scale_is_storable(scale, group_size: int | None) -> bool:
    """Whether ``scale`` is exact in fp16 (and, for groups, in bf16) and > 0: grids made before scales
    were rounded so are not, and their targets keep fp32 scales."""
    return bool(_storable(scale.float(), group_size).all())


def snap(grid: LayerGrid, q):
    """Make every non-zero channel/group hold ``±qmax`` (the convention above) by moving its largest
    entry there; returns the new integers. Without it an abs-max observer would pick another scale."""
    import torch

    m = qmax(grid.bits)
    o = q.shape[0]
    if grid.group_size is None:
        flat = q.reshape(o, 1, -1)
    else:
        i = q.shape[1]
        flat = q.reshape(o, i // grid.group_size, grid.group_size, -1).permute(0, 1, 3, 2).reshape(o, i // grid.group_size, -1)
    flat = flat.clone()
    amax, idx = flat.abs().max(dim=2)
    fix = (amax < m) & (amax > 0)
    if bool(fix.any()):
        vals = flat.gather(2, idx.unsqueeze(2)).squeeze(2)
        new = torch.where(fix, torch.sign(vals) * m, vals).to(flat.dtype)
        flat.scatter_(2, idx.unsqueeze(2), new.unsqueeze(2))
    if grid.group_size is None:
        return flat.reshape(q.shape)
    i = q.shape[1]
    rest = q.shape[2:]
    n = 1
    for r in rest:
        n *= r
    return flat.reshape(o, i // grid.group_size, n, grid.group_size).permute(0, 1, 3, 2).reshape(q.shape)


def rtn(module, name: str, bits: int, group_size: int | None, clip=1.0) -> tuple[LayerGrid, Any]:
    """Round-to-nearest onto an abs-max grid (optionally clipped). Returns the grid and the integers."""
    import torch

    w = module.weight.detach().float()
    kind = "linear" if isinstance(module, torch.nn.Linear) else "conv"
    g = LayerGrid(name, kind, bits, group_size, tuple(w.shape), absmax_scale(w, bits, group_size, clip))
    return g, snap(g, g.quantize(w))


def apply(unet, grid: QuantGrid, integers: dict[str, Any]) -> None:
    """Set each quantized layer's weight to ``q * scale`` (in place)."""
    import torch

    mods = dict(unet.named_modules())
    with torch.no_grad():
        for name, g in grid.layers.items():
            w = mods[name].weight
            w.copy_(g.dequantize(integers[name]).to(w.dtype))


def rtn_grid(unet, bits: int, *, group_size: int = 32, scheme: str | None = None) -> QuantGrid:
    """Every quantizable layer at ``bits`` by round-to-nearest, applied to ``unet`` in place (at 4 bits the other
    float parameters rounded to fp16: ``round_floats_fp16``).

    The baseline the calibrated methods are measured against, and a quick way to build a grid."""
    grid = QuantGrid(scheme or f"w{bits}", "rtn", settings={"group_size": group_size})
    ints = {}
    for name, mod in quantizable_layers(unet).items():
        g, q = rtn(mod, name, bits, layer_group_size(mod, bits, group_size))
        grid.layers[name], ints[name] = g, q
    apply(unet, grid, ints)
    if bits == 4:
        round_floats_fp16(unet, grid)
    return grid


FP16_MAX = 65504.0


def round_floats_fp16(unet, grid: QuantGrid) -> int:
    """Round ``unet``'s float parameters that are not grid weights to fp16-exact float32 values, in place (a tensor
    with a value beyond fp16's range is left as it is), and record it in ``grid.settings["float_params"]``.
    Returns the number of values rounded."""
    import torch

    weights = {f"{n}.weight" for n in grid.layers}
    n = 0
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name in weights or not p.is_floating_point() or p.detach().abs().max() > FP16_MAX:
                continue
            p.copy_(p.detach().to(torch.float16).to(p.dtype))
            n += p.numel()
    grid.settings["float_params"] = "fp16"
    return n


def floats_are_fp16(grid: QuantGrid) -> bool:
    """Whether ``grid``'s U-Net has its non-grid float parameters on fp16 values (``round_floats_fp16``)."""
    return grid.settings.get("float_params") == "fp16"


def load_grid(model, name: str = "unet") -> QuantGrid | None:
    """The quantization grid of component ``name`` of a loaded ``checkpoint.Model``, checked against its weights.

    Found only through the typed manifest: ``model.ref(name).grid`` (an ``artifact.GridRef`` whose
    ``path`` is relative to ``model.path``; ``"."`` for a bare component folder). None when the
    model has no manifest or the component has no grid.

    Raises:
        UserError: the grid named by the manifest is missing or unreadable, or a weight of the
            component is off its grid (edited after compress?).
    """
    from pocketfusion import artifact

    ref = model.ref(name)
    if ref is None or ref.grid is None:
        return None
    folder = artifact.resolve_path(model.path, ref.grid.path)
    grid = QuantGrid.load(folder)
    if grid is None:
        raise UserError(f"{model.path}: the manifest names a quantization grid for {name} at {ref.grid.path}, "
                        f"but {folder / GRID_JSON} is missing")
    module = model.components.get(name)
    if module is None:
        raise UserError(f"{model.path}: the manifest names a quantization grid for {name}, but the model has no {name}")
    grid.integers(module)  # raises when a weight is off its grid
    return grid
