"""Weight quantization of a U-Net onto the grid of ``pocketfusion.compress.grid``, driven by calibration.

Methods (``quantize_unet(..., method=)``):

* ``rtn`` — round to nearest on abs-max scales. The baseline every other figure is measured against.
* ``gptq`` — GPTQ error-compensating rounding (Frantar et al. 2022) with *static* scales: each
  layer's scales are fixed first by a clipping search that minimises the input-weighted rounding
  error (``diag(H)``-weighted, per channel or group), then the columns are rounded in order and each
  column's error is pushed onto the columns not yet rounded through the inverse Hessian of the
  layer's inputs (``H = 2 X Xᵀ / n``, convolutions via ``unfold``), collected with hooks on the
  calibration feeds. The grid convention (every non-zero channel/group holds ``±qmax``) is kept
  *inside* the loop: each group's largest original weight is rounded to ``±qmax`` and its error is
  compensated like any other, so ``grid.snap`` is a no-op afterwards. Layers are processed in
  forward order, a chunk at a time, with inputs from the already-quantized model ("sequential").

Mixed precision is measured, not assumed: at 4 bits every layer's cost is the U-Net output error
when only that layer is quantized (``layer_sensitivity``); layers far above the median stay at
8 bits as far as the size budget allows. The same for activations in ``w8a8``: each layer's input is
fake-quantized alone at 8 bits with the calibration range; the costliest fall back to 16-bit
activations until the rest meet an output-SNR target. Every decision's measured figure goes into ``LayerGrid.reason`` /
``grid.activations``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pocketfusion.compress.quant import grid as G
from pocketfusion.errors import UserError

logger = logging.getLogger(__name__)

SCHEMES = G.SCHEMES
METHODS = ("gptq", "rtn")
WEIGHT_BITS = {"w8": 8, "w4": 4, "w8a8": 8, "w8a16": 8}
ADDED_INPUTS = ("text_embeds", "time_ids")  # SDXL's added_cond_kwargs

DEFAULTS = {
    "group_size": 32,
    "mixed_threshold": 4.0,  # W4: keep a layer at 8 bits when its 4-bit cost exceeds this many medians
    "size_budget": 0.14,  # W4: stored U-Net bytes (fp16 scales) / fp32 bytes may not exceed this
    "act_snr_db": 35.0,  # W8A8: 8-bit inputs may cost at most this U-Net output SNR (vs W8); the costliest go 16-bit
    "damp": 0.01,  # GPTQ: fraction of mean(diag H) added to the diagonal
    "block": 128,  # GPTQ: lazy-batch block of columns
    "clip_grid": (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5),
    "chunks": 12,  # sequential GPTQ: Hessian passes over the calibration feeds
    "sensitivity_feeds": 32,  # feeds (CFG pairs) used to measure per-layer costs
    "max_batch": 256,  # samples per U-Net call during calibration passes
    "hessian_bytes": 2 << 30,  # GPTQ: Hessians held at once (a chunk ends earlier when they would exceed it)
}


# --------------------------------------------------------------------------------------------- feeds


def stack_feeds(feeds: Sequence[dict[str, Any]], max_batch: int = DEFAULTS["max_batch"]) -> list[dict[str, Any]]:
    """Concatenate feed dicts (numpy or torch, batch 2 each) into torch batches of at most ``max_batch`` samples."""
    import torch

    if not feeds:
        raise UserError("no calibration feeds")
    per = int(np.asarray(feeds[0]["sample"]).shape[0])
    k = max(1, max_batch // max(1, per))
    out = []
    for i in range(0, len(feeds), k):
        part = feeds[i : i + k]
        out.append({n: torch.cat([torch.as_tensor(np.asarray(f[n])) for f in part]).float() for n in part[0]})
    return out


def subsample(feeds: Sequence[dict], n: int) -> list[dict]:
    """``n`` feeds spread evenly over ``feeds`` (which are ordered by prompt, then timestep)."""
    if len(feeds) <= n:
        return list(feeds)
    idx = np.linspace(0, len(feeds) - 1, n).round().astype(int)
    return [feeds[i] for i in idx]


def unet_call(unet, batch: dict[str, Any]):
    kwargs = {}
    added = {k: batch[k] for k in ADDED_INPUTS if k in batch}
    if added:
        kwargs["added_cond_kwargs"] = added
    return unet(batch["sample"], batch["timestep"], batch["encoder_hidden_states"], return_dict=False, **kwargs)[0]


def unet_outputs(unet, batches: Iterable[dict[str, Any]]) -> list[Any]:
    import torch

    with torch.no_grad():
        return [unet_call(unet, b).float() for b in batches]


def output_error(ref: Sequence[Any], out: Sequence[Any]) -> dict[str, float]:
    """Relative error, relative MSE, SNR and PSNR (peak = max |ref|) of outputs against a reference."""
    num = sum(float(((o - r).double() ** 2).sum()) for o, r in zip(out, ref))
    den = sum(float((r.double() ** 2).sum()) for r in ref)
    n = sum(r.numel() for r in ref)
    peak = max(float(r.abs().max()) for r in ref)
    mse = num / n
    return {
        "rel": math.sqrt(num / den) if den else float("nan"),
        "rel_mse": num / den if den else float("nan"),
        "snr_db": 10 * math.log10(den / num) if num else float("inf"),
        "psnr_db": 10 * math.log10(peak**2 / mse) if mse else float("inf"),
    }


def forward_order(unet, batch: dict[str, Any]) -> list[str]:
    """Quantizable layers in the order one forward call runs them (layers never called come last)."""
    import torch

    layers = G.quantizable_layers(unet)
    seen: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=n: seen.append(n) if n not in seen else None) for n, m in layers.items()]
    try:
        with torch.no_grad():
            unet_call(unet, {k: v[:2] for k, v in batch.items()})
    finally:
        for h in hooks:
            h.remove()
    return seen + [n for n in layers if n not in seen]


class _Stop(Exception):
    pass


def _conv_columns(module, x):
    """Rows of a convolution's input as the weight sees them: (N * positions, I * kh * kw)."""
    import torch.nn.functional as F

    padding = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    elif isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same", stride 1: total padding dilation * (k - 1), the extra one at the end
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
            padding = 0
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _rows(module, x):
    import torch

    x = x.detach().float()
    if isinstance(module, torch.nn.Conv2d):
        return _conv_columns(module, x)
    return x.reshape(-1, x.shape[-1])


def collect_hessians(unet, batches, names: Sequence[str], order: Sequence[str] | None = None) -> dict[str, tuple[Any, int]]:
    """``{name: (sum of x xᵀ over input rows (float64), n rows)}`` for ``names`` over the calibration batches.

    With ``order`` (forward order), each forward call stops after the last of ``names`` ran."""
    import torch

    mods = dict(unet.named_modules())
    acc: dict[str, list] = {n: [None, 0] for n in names}
    last = max(names, key=order.index) if order else None

    def hook(mod, args, n):
        x = _rows(mod, args[0])
        xtx = (x.T @ x).double()
        a = acc[n]
        a[0] = xtx if a[0] is None else a[0] + xtx
        a[1] += x.shape[0]
        if n == last:
            raise _Stop

    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    unet_call(unet, b)
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return {n: (a[0], a[1]) for n, a in acc.items()}


def activation_ranges(unet, batches, names: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Min and max of each layer's input over the calibration batches."""
    import torch

    mods = dict(unet.named_modules())
    rng: dict[str, list[float]] = {n: [math.inf, -math.inf] for n in names}

    def hook(args, n):
        x = args[0]
        r = rng[n]
        r[0] = min(r[0], float(x.min()))
        r[1] = max(r[1], float(x.max()))

    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: hook(a, n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                unet_call(unet, b)
    finally:
        for h in hooks:
            h.remove()
    return {n: (r[0], r[1]) for n, r in rng.items()}


def fake_quant(x, lo: float, hi: float, bits: int):
    """Affine (asymmetric, zero point on the integer grid) fake quantization of ``x`` over ``[lo, hi]`` ∪ {0}."""
    import torch

    lo, hi = min(lo, 0.0), max(hi, 0.0)
    levels = 2**bits - 1
    scale = (hi - lo) / levels if hi > lo else 1.0
    zp = round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zp, 0, levels)
    return (q - zp) * scale


@contextlib.contextmanager
def simulate_activations(unet, layers: dict[str, dict]):
    """Fake-quantize the inputs of ``layers`` (``{name: {"bits": 8|16|None, "range": [lo, hi]}}``) while inside."""
    mods = dict(unet.named_modules())
    hooks = []
    for n, a in layers.items():
        if a.get("bits") and a.get("range"):
            lo, hi = a["range"]
            hooks.append(mods[n].register_forward_pre_hook(
                lambda m, args, lo=lo, hi=hi, b=a["bits"]: (fake_quant(args[0], lo, hi, b), *args[1:])))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


# ---------------------------------------------------------------------------------------- rounding


def _flat(w):
    return w.reshape(w.shape[0], -1)


def _anchor(lg: G.LayerGrid, w):
    """Per (row, group): a mask (O, cols) of the entry with the largest |w| in its channel/group."""
    import torch

    o = w.shape[0]
    if lg.group_size is None:
        flat = w.reshape(o, 1, -1)
    else:
        i = w.shape[1]
        flat = w.reshape(o, i // lg.group_size, -1)  # conv: group g covers g * kh * kw consecutive columns
    idx = flat.abs().argmax(dim=2, keepdim=True)
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(2, idx, True)
    nonzero = flat.abs().amax(dim=2, keepdim=True) > 0
    return (mask & nonzero).reshape(o, -1), (~nonzero).expand_as(flat).reshape(o, -1)


def clip_search(lg: G.LayerGrid, w, hdiag, clip_grid: Sequence[float]):
    """Scale per channel/group: abs-max times the clip factor minimising ``sum diag(H) * (w - q s)^2``."""
    import torch

    w = w.detach().float()
    m = G.qmax(lg.bits)
    o = w.shape[0]
    cols = _flat(w).shape[1]
    ng = 1 if lg.group_size is None else w.shape[1] // lg.group_size
    hd = hdiag.float().reshape(1, ng, cols // ng) if hdiag is not None else torch.ones(1, ng, cols // ng)
    wf = _flat(w).reshape(o, ng, cols // ng)
    amax = wf.abs().amax(dim=2)
    best_err = torch.full((o, ng), math.inf)
    best = torch.ones(o, ng)
    for c in clip_grid:
        s = (amax * c / m).clamp_min(1e-30).unsqueeze(2)
        err = (((wf - torch.clamp(torch.round(wf / s), -m, m) * s) ** 2) * hd).sum(dim=2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, c), best)
    clip = best if lg.group_size is not None else best.squeeze(1)
    return G.absmax_scale(w, lg.bits, lg.group_size, clip), clip


def gptq(w, H, scale_cols, m: int, anchor, zero, *, damp: float = 0.01, block: int = 128, act_order: bool = False):
    """GPTQ over the columns of ``w`` (O, cols) with fixed per-column scales ``scale_cols`` (O, cols).

    ``anchor`` entries are rounded to ``±m`` (sign of the original weight), ``zero`` entries to 0.
    Returns the integers (O, cols) as float."""
    import torch

    W = w.detach().double().clone()
    S = scale_cols.double()
    sign = torch.sign(W)
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    cols = W.shape[1]
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, S, sign, anchor, zero, H = W[:, perm], S[:, perm], sign[:, perm], anchor[:, perm], zero[:, perm], H[perm][:, perm]
    d = damp * float(torch.mean(torch.diag(H)))
    eye = torch.eye(cols, dtype=H.dtype)
    for attempt in range(6):
        try:
            L = torch.linalg.cholesky(H + d * eye)
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            break
        except RuntimeError:  # not positive definite: more damping
            d = d * 10 if d > 0 else 1e-6
    else:
        raise RuntimeError("Hessian is not positive definite even with heavy damping")
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        Hi = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            col = W1[:, i]
            q = torch.clamp(torch.round(col / S[:, c]), -m, m)
            q = torch.where(anchor[:, c], sign[:, c] * m, q)
            q = torch.where(zero[:, c], torch.zeros_like(q), q)
            Q1[:, i] = q
            err = (col - q * S[:, c]) / Hi[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hi[i, i:].unsqueeze(0)
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.float()


def quantize_layer(module, name: str, bits: int, group_size: int | None, method: str, hessian=None, *,
                   damp: float = DEFAULTS["damp"], clip_grid=DEFAULTS["clip_grid"], block: int = DEFAULTS["block"],
                   act_order: bool = False) -> tuple[G.LayerGrid, Any]:
    """One layer onto its grid: returns (LayerGrid, int8 integers) without touching the module."""
    import torch

    if method == "rtn" or hessian is None or hessian[1] == 0:
        return G.rtn(module, name, bits, group_size)
    H = hessian[0] / hessian[1] * 2
    w = module.weight.detach().float()
    kind = "linear" if isinstance(module, torch.nn.Linear) else "conv"
    lg = G.LayerGrid(name, kind, bits, group_size, tuple(w.shape))
    lg.scale, _ = clip_search(lg, w, torch.diag(H), clip_grid)
    anchor, zero = _anchor(lg, w)
    scale_cols = _flat(lg.expand(lg.scale))
    q = gptq(_flat(w), H, scale_cols, G.qmax(bits), anchor, zero, damp=damp, block=block, act_order=act_order)
    q = q.reshape(w.shape).to(torch.int8)
    snapped = G.snap(lg, q)
    if not bool((snapped == q).all()):  # cannot happen with the anchors; kept as a guard
        logger.warning("layer %s: GPTQ integers needed snapping", name)
    return lg, snapped


def _supported(module) -> str | None:
    """Why GPTQ cannot take this layer (RTN is used), or None."""
    import torch

    if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
        return "grouped convolution"
    return None


def _chunks(names: Sequence[str], mods: dict, k: int, max_bytes: int) -> list[list[str]]:
    """Consecutive layers, at most ``k`` a chunk and their float64 Hessians within ``max_bytes`` together."""
    parts: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for n in names:
        cols = _flat(mods[n].weight).shape[1]
        b = cols * cols * 8
        if cur and (len(cur) >= k or size + b > max_bytes):
            parts.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += b
    if cur:
        parts.append(cur)
    return parts


def quantize_weights(unet, batches, plan: dict[str, tuple[int, int | None]], *, method: str, order: Sequence[str],
                     sequential: bool = True, chunks: int = DEFAULTS["chunks"], apply: bool = True, progress: bool = False,
                     act_order: bool = False, **kw) -> tuple[dict[str, G.LayerGrid], dict[str, Any]]:
    """Quantize every layer of ``plan`` (``{name: (bits, group_size)}``) with ``method``.

    GPTQ collects the Hessians of ``chunks`` groups of consecutive layers (forward order) in one
    pass each; with ``sequential`` every chunk is applied before the next chunk's pass, so later
    layers see the inputs the quantized model gives them. Returns (grids, integers); with ``apply``
    the weights are on the grid afterwards (with ``sequential`` always; with neither the model is untouched)."""
    from tqdm import tqdm

    mods = dict(unet.named_modules())
    names = [n for n in order if n in plan]
    grids, ints = {}, {}
    if method == "rtn":
        for n in names:
            grids[n], ints[n] = G.rtn(mods[n], n, *plan[n])
    else:
        parts = _chunks(names, mods, max(1, math.ceil(len(names) / max(1, chunks))), DEFAULTS["hessian_bytes"])
        bar = tqdm(total=len(names), desc=f"gptq w{'/'.join(str(b) for b in sorted({p[0] for p in plan.values()}))}",
                   unit="layer", disable=not progress)
        for part in parts:
            hs = collect_hessians(unet, batches, part, order)
            for n in part:
                why = _supported(mods[n])
                grids[n], ints[n] = quantize_layer(mods[n], n, *plan[n], "rtn" if why else method, hs[n], act_order=act_order, **kw)
                if why:
                    grids[n].reason = f"{why}: round to nearest"
                bar.update(1)
            del hs
            if sequential:  # the next chunk's Hessians see this chunk's quantized outputs
                G.apply(unet, G.QuantGrid("tmp", method, {n: grids[n] for n in part}), ints)
        bar.close()
    if apply:
        G.apply(unet, G.QuantGrid("tmp", method, grids), ints)
    return grids, ints


# ------------------------------------------------------------------------------------------- sizes


def weight_bytes(unet, bits: dict[str, int], group: dict[str, int | None], *, scale_bytes: int = 2) -> dict[str, float]:
    """Bytes of the U-Net's parameters stored at ``bits`` (int8: 1 byte, int4: ½), scales at
    ``scale_bytes`` each, everything else fp32; and the ratio to all-fp32."""
    mods = G.quantizable_layers(unet)
    total = sum(p.numel() for p in unet.parameters())
    q_params = 0
    stored = 0.0
    for n, b in bits.items():
        w = mods[n].weight
        q_params += w.numel()
        n_scales = w.shape[0] * (1 if group.get(n) is None else w.shape[1] // group[n])
        stored += w.numel() * b / 8 + n_scales * scale_bytes
    stored += (total - q_params) * 4
    return {"fp32_bytes": total * 4, "bytes": stored, "ratio": stored / (total * 4)}


# --------------------------------------------------------------------------------------- sensitivity


def layer_sensitivity(unet, batches, ref: Sequence[Any], candidates: dict[str, Any], progress: bool = False) -> dict[str, float]:
    """Relative output MSE (vs ``ref``) with only one layer's weight replaced by ``candidates[name]``."""
    import torch
    from tqdm import tqdm

    mods = dict(unet.named_modules())
    cost = {}
    for n, w in tqdm(candidates.items(), desc="sensitivity", unit="layer", disable=not progress):
        p = mods[n].weight
        keep = p.detach().clone()
        with torch.no_grad():
            p.copy_(w.to(p.dtype))
        try:
            cost[n] = output_error(ref, unet_outputs(unet, batches))["rel_mse"]
        finally:
            with torch.no_grad():
                p.copy_(keep)
    return cost


def activation_sensitivity(unet, batches, ref: Sequence[Any], ranges: dict[str, tuple[float, float]], bits: int = 8,
                           progress: bool = False) -> dict[str, float]:
    """Relative output MSE (vs ``ref``) with only one layer's input fake-quantized at ``bits``."""
    from tqdm import tqdm

    cost = {}
    for n, r in tqdm(ranges.items(), desc="activation sensitivity", unit="layer", disable=not progress):
        with simulate_activations(unet, {n: {"bits": bits, "range": list(r)}}):
            cost[n] = output_error(ref, unet_outputs(unet, batches))["rel_mse"]
    return cost


def _median(values: Iterable[float]) -> float:
    v = [x for x in values if np.isfinite(x)]
    return float(np.median(v)) if v else 0.0


# ------------------------------------------------------------------------------------------ driver


def quantize_unet(unet, feeds_calib: Sequence[dict[str, Any]], *, scheme: str, method: str = "gptq",
                  group_size: int = DEFAULTS["group_size"], mixed_threshold: float | None = DEFAULTS["mixed_threshold"],
                  size_budget: float = DEFAULTS["size_budget"], act_snr_db: float = DEFAULTS["act_snr_db"],
                  sequential: bool = True, chunks: int = DEFAULTS["chunks"], act_order: bool = False,
                  damp: float = DEFAULTS["damp"], clip_grid: Sequence[float] = DEFAULTS["clip_grid"],
                  sensitivity_feeds: int = DEFAULTS["sensitivity_feeds"], progress: bool = True) -> G.QuantGrid:
    """Quantize ``unet``'s Linear / Conv2d weights in place onto their grid; returns the grid with its reasons.

    Args:
        unet: a float32 ``UNet2DConditionModel`` (modified in place).
        feeds_calib: calibration U-Net feeds (``CalibrationSet.unet_feeds("calib")``).
        scheme: ``w8`` (per-channel int8), ``w4`` (group-wise int4, mixed with int8 by measured
            sensitivity), ``w8a8`` (``w8`` weights, 8-bit activations with measured 16-bit fallbacks)
            or ``w8a16`` (``w8`` weights, 16-bit activations).
        method: ``gptq`` (calibrated) or ``rtn``.
        group_size: int4 group of consecutive input channels (layers it does not divide: per channel).
        mixed_threshold: ``w4``: keep at 8 bits the layers whose 4-bit cost exceeds this many times
            the median cost, within ``size_budget``; None: every layer at 4 bits.
        size_budget: ``w4``: the largest stored-bytes ratio to fp32 (fp16 scales) mixed precision may reach.
        act_snr_db: ``w8a8``: the U-Net output SNR (against the W8 model) the 8-bit activations must
            keep on the calibration feeds; the costliest layer inputs fall back to 16 bits until they do.
    """
    import torch

    if scheme not in SCHEMES:
        raise UserError(f"unknown quantization scheme {scheme!r} (choose from {', '.join(SCHEMES)})")
    if method not in METHODS:
        raise UserError(f"unknown quantization method {method!r} (choose from {', '.join(METHODS)})")
    if group_size < 2:
        raise UserError(f"--group-size must be >= 2, got {group_size}")
    if next(unet.parameters()).dtype != torch.float32:
        raise UserError("quantize a float32 U-Net (convert it with .float() first)")
    bits = WEIGHT_BITS[scheme]
    layers = G.quantizable_layers(unet)
    batches = stack_feeds(feeds_calib)
    order = forward_order(unet, batches[0])
    sens_batches = stack_feeds(subsample(feeds_calib, sensitivity_feeds))
    ref = unet_outputs(unet, sens_batches)
    gs = {n: G.layer_group_size(m, 4, group_size) for n, m in layers.items()}
    reasons: dict[str, str] = {}
    plan = {n: (bits, gs[n] if bits == 4 else None) for n in layers}
    settings: dict[str, Any] = {"group_size": group_size, "method": method, "calibration_feeds": len(feeds_calib)}
    kw = {"damp": damp, "clip_grid": tuple(clip_grid), "act_order": act_order, "chunks": chunks}
    if method == "gptq":
        settings.update(damp=damp, clip_grid=list(clip_grid), sequential=sequential, chunks=chunks, act_order=act_order)

    if bits == 4 and mixed_threshold is not None:
        plan, reasons, mixed = _mixed_precision(unet, batches, sens_batches, ref, gs, method=method, order=order,
                                                threshold=mixed_threshold, budget=size_budget, progress=progress, **kw)
        settings["mixed_precision"] = mixed
    elif bits == 4:
        reasons = {n: "every layer at 4 bits (mixed precision off)" for n in layers}
    else:
        reasons = {n: f"{scheme}: every layer at 8 bits" for n in layers}
    for n in layers:
        if plan[n][0] == 4 and plan[n][1] is None:
            reasons[n] += f"; {layers[n].weight.shape[1]} input channels not a multiple of group {group_size}: one scale per output channel"

    grids, ints = quantize_weights(unet, batches, plan, method=method, order=order, sequential=sequential,
                                   progress=progress, **kw)
    qgrid = G.QuantGrid(scheme, method, settings=settings)
    for n in order:
        if n in grids:
            g = grids[n]
            g.reason = "; ".join(r for r in (reasons.get(n, ""), g.reason) if r)
            qgrid.layers[n] = g
    G.apply(unet, qgrid, ints)
    if scheme in ("w8a8", "w8a16"):
        qgrid.activations = _activations(unet, batches, sens_batches, scheme, order, act_snr_db, progress)
    return qgrid


def _mixed_precision(unet, batches, sens_batches, ref, gs, *, method, order, threshold, budget, progress, **kw):
    """W4 bit allocation from measured per-layer 4-bit costs. Returns (plan, reasons, summary)."""

    plan4 = {n: (4, g) for n, g in gs.items()}
    grids, ints = quantize_weights(unet, batches, plan4, method=method, order=order, sequential=False, apply=False,
                                   progress=progress, **kw)
    cand = {n: grids[n].dequantize(ints[n]) for n in grids}
    cost = layer_sensitivity(unet, sens_batches, ref, cand, progress=progress)
    med = _median(cost.values())
    keep8: list[str] = []
    over_budget: list[str] = []
    mods = G.quantizable_layers(unet)

    def extra_bytes(n):  # what 8 bits cost over 4 bits for layer n
        w = mods[n].weight
        return w.numel() / 2 + w.shape[0] * 2 * (1 - (1 if gs[n] is None else w.shape[1] // gs[n]))

    # knapsack greedy: the most output error saved per extra byte first
    ranked = sorted((n for n in cost if med > 0 and cost[n] > threshold * med), key=lambda n: -cost[n] / extra_bytes(n))
    for n in ranked:
        trial = keep8 + [n]
        bits = {m: 8 if m in trial else 4 for m in gs}
        if weight_bytes(unet, bits, {m: (None if m in trial else gs[m]) for m in gs})["ratio"] <= budget:
            keep8.append(n)
        else:
            over_budget.append(n)
    plan, reasons = {}, {}
    for n in gs:
        x = cost[n] / med if med > 0 else float("nan")
        fig = f"4-bit costs {cost[n]:.2e} relative output MSE, {x:.1f}x the median"
        if n in keep8:
            plan[n] = (8, None)
            reasons[n] = f"{fig}: kept at 8 bits (threshold {threshold:g}x)"
        else:
            plan[n] = (4, gs[n])
            reasons[n] = f"{fig}: " + (f"above {threshold:g}x but the {budget:.0%} size budget is spent: 4 bits" if n in over_budget else "4 bits")
    final = weight_bytes(unet, {n: p[0] for n, p in plan.items()}, {n: p[1] for n, p in plan.items()})
    summary = {
        "threshold_x_median": threshold, "size_budget": budget, "median_cost": med, "kept_8bit": keep8,
        "over_budget": over_budget, "bytes_ratio_fp16_scales": final["ratio"], "cost": {n: cost[n] for n in order if n in cost},
    }
    if progress or keep8:
        logger.info("mixed precision: %d of %d layers kept at 8 bits (ratio %.3f)", len(keep8), len(gs), final["ratio"])
    return plan, reasons, summary


def _activations(unet, batches, sens_batches, scheme, order, target_snr_db, progress) -> dict:
    """Per-layer activation bits for w8a8 / w8a16 (ranges from the calibration feeds).

    w8a8: each layer's input is fake-quantized alone at 8 bits and its cost measured (relative
    output MSE against the W8 model). The costliest inputs fall back to 16 bits until the rest
    add up to less than the error ``target_snr_db`` allows; the combination is then measured and
    more inputs fall back (costliest first) while it misses the target."""
    names = list(order)
    ranges = activation_ranges(unet, batches, names)
    layers: dict[str, dict] = {}
    if scheme == "w8a16":
        for n in names:
            layers[n] = {"bits": 16, "reason": "w8a16: 16-bit activations everywhere", "range": list(ranges[n])}
        return {"bits": 16, "layers": layers}
    ref = unet_outputs(unet, sens_batches)  # the W8 model: isolates what 8-bit inputs cost
    cost = activation_sensitivity(unet, sens_batches, ref, ranges, 8, progress=progress)
    med = _median(cost.values())
    budget = 10 ** (-target_snr_db / 10)
    ranked = sorted(names, key=lambda n: -cost[n])
    fall: list[str] = []
    rest = sum(cost.values())
    for n in ranked:
        if rest <= budget:
            break
        fall.append(n)
        rest -= cost[n]

    def measure(fb):
        cfg = {n: {"bits": 16 if n in fb else 8, "range": list(ranges[n])} for n in names}
        with simulate_activations(unet, cfg):
            return output_error(ref, unet_outputs(unet, sens_batches))["rel_mse"]

    measured = measure(fall)
    step = 1
    while measured > budget and len(fall) < len(ranked):  # costs do not add up exactly: measure, fall back more
        fall = ranked[: len(fall) + step]
        step *= 2
        measured = measure(fall)
    for n in names:
        x = cost[n] / med if med > 0 else float("nan")
        fig = f"8-bit input costs {cost[n]:.2e} relative output MSE ({x:.0f}x the median)"
        why = (f"16 bits: among the costliest inputs, kept at 16 so the rest meet {target_snr_db:g} dB" if n in fall
               else "8 bits")
        layers[n] = {"bits": 16 if n in fall else 8, "reason": f"{fig}: {why}", "range": list(ranges[n]), "cost": cost[n]}
    snr = 10 * math.log10(1 / measured) if measured > 0 else float("inf")
    return {"bits": 8, "target_snr_db": target_snr_db, "measured_snr_db": snr, "median_cost": med,
            "fallbacks": [n for n in names if n in fall], "layers": layers}


def rtn_like(unet, qgrid: G.QuantGrid) -> G.QuantGrid:
    """RTN onto the same per-layer bits and groups as ``qgrid`` (in place): the baseline at equal size."""
    out = G.QuantGrid(qgrid.scheme, "rtn", settings=dict(qgrid.settings, method="rtn"))
    mods = dict(unet.named_modules())
    ints = {}
    for n, g in qgrid.layers.items():
        out.layers[n], ints[n] = G.rtn(mods[n], n, g.bits, g.group_size)
    G.apply(unet, out, ints)
    return out
