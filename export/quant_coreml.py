"""A quantization grid (``compress.grid``) lowered into Core ML's compressed weights (ML Program).

After conversion, every grid layer's weight ``const`` is compressed with Core ML's own quantizer,
``coremltools.optimize.coreml.linear_quantize_weights`` (``mode="linear_symmetric"``), targeted by
name (``op_name_configs``):

==========================  ===================================================================
grid layer                  in the ``.mlpackage``
==========================  ===================================================================
8-bit, per output channel   int8 ``per_channel``: ``constexpr_affine_dequantize`` (iOS16+) or
                            ``constexpr_blockwise_shift_scale`` (iOS18)
4-bit, groups of ``g``      int4 ``per_block`` with block ``[1, g, 0, 0]`` (one scale per output
                            channel and ``g`` input channels, shared over a conv's kernel
                            positions - the grid's layout): ``constexpr_blockwise_shift_scale``,
                            which needs iOS18 (the deployment target is raised and recorded)
4-bit, per channel          int4 ``per_block`` with block ``[1, I, 0, 0]``
==========================  ===================================================================

``linear_symmetric`` uses the restricted range ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` and
``scale = max|w| / qmax`` per block (``coremltools.optimize._utils.quantize_weight_by_dtype``) -
exactly the grid's convention, so it reproduces the grid's integers. With fp16 compute precision the
weights are fp16 when they are quantized and the scale is computed and stored in fp16: the
integers still come out equal (``|w16/s16 - q| <= 127 * 3 * 2**-11 < 0.5``), the dequantized
weights differ from ``fp16(q * scale)`` by fp16 rounding. ``readback`` checks both in the saved
package's MIL program.

Activations stay float (fp16/fp32): Core ML's activation quantization
(``linear_quantize_activations``) calibrates with Core ML predictions, which need macOS.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_HEAVY = ("conv", "linear", "matmul")


def needs_ios18(grid) -> bool:
    """4-bit weights (per-block int4) exist in Core ML only from iOS18."""
    return any(g.bits == 4 for g in grid.layers.values())


def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()


def weight_consts(mlmodel) -> dict[str, object]:
    """``{const op name: const op}`` of every const that is a conv / linear / matmul weight."""
    prog = mlmodel._mil_program
    out = {}
    for fn in prog.functions.values():
        for op in fn.operations:
            if op.op_type not in _HEAVY:
                continue
            for key in ("weight", "y"):
                var = op.inputs.get(key)
                if var is not None and var.op is not None and var.op.op_type == "const":
                    out[var.op.name] = var.op
    return out


def match_layers(grid, unet, consts: dict, dtype) -> tuple[dict[str, str], dict[str, str]]:
    """Grid layer -> const name, by name (torch.export: ``p_unet_<path>_weight[_to_fp16]``) and then
    by value (the on-grid weight cast to ``dtype``, same shape), and {layer: reason} for the unmatched."""
    mods = dict(unet.named_modules())
    by_norm = {}
    for cname in consts:
        base = re.sub(r"(_to_fp16|_to_fp32)$", "", cname)
        by_norm.setdefault(_norm(base), []).append(cname)
    found, missing, used = {}, {}, set()
    for name in grid.layers:
        w = mods[name].weight.detach().float().numpy().astype(dtype)
        cands = [c for key in (_norm("p_unet_" + name + "_weight"), _norm("unet." + name + ".weight"), _norm(name + ".weight"))
                 for c in by_norm.get(key, [])]
        cands += [c for c, op in consts.items() if c not in cands and tuple(op.outputs[0].shape) == w.shape]
        for c in cands:
            if c in used:
                continue
            val = consts[c].outputs[0].val
            if val is not None and val.shape == w.shape and np.array_equal(val.astype(dtype), w):
                found[name] = c
                used.add(c)
                break
        else:
            missing[name] = "no conv/linear weight const with this layer's on-grid values in the converted program: kept float"
    return found, missing


def op_config(g):
    """The ``OpLinearQuantizerConfig`` reproducing layer grid ``g``."""
    import coremltools.optimize.coreml as cto

    if g.bits == 8 and g.group_size is None:
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0)
    block = [1, g.group_size or g.shape[1]] + [0] * (len(g.shape) - 2)
    return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{g.bits}", granularity="per_block", block_size=block,
                                       weight_threshold=0)


def quantize(mlmodel, grid, unet, precision: str):
    """Compress the grid's layers of ``mlmodel`` in place of their fp weights.

    Returns ``(compressed MLModel, {layer: const name}, {layer: reason it stayed float})``."""
    import coremltools.optimize.coreml as cto

    dtype = np.float16 if precision == "fp16" else np.float32
    consts = weight_consts(mlmodel)
    found, missing = match_layers(grid, unet, consts, dtype)
    configs = {c: op_config(grid.layers[name]) for name, c in found.items()}
    compressed = cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=configs))
    return compressed, found, missing


def _load_program(path: Path):
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    return milproto_load(spec, spec.specificationVersion, model.weights_dir)


def readback(path: str | Path, grid, unet, consts: dict[str, str], precision: str) -> dict:
    """Read the compressed weights back from the saved package and compare them with the grid.

    For every matched layer, the ``constexpr_*`` op named ``<const>_quantized`` must hold the grid's
    integers bit for bit; its scale is compared with the grid's (cast to the precision) and its
    dequantized weight with the on-grid weight cast to the precision. Returns counts, the worst
    relative differences, and ``mismatch`` (layers whose integers differ, or that are missing)."""
    from coremltools.converters.mil.mil import types

    dtype = np.float16 if precision == "fp16" else np.float32
    prog = _load_program(Path(path))
    ops = {}
    for fn in prog.functions.values():
        for op in fn.operations:
            if op.op_type.startswith("constexpr_"):
                ops[op.name] = op
    ints = grid.integers(unet)
    mods = dict(unet.named_modules())
    kinds: Counter[str] = Counter()
    equal = deq_exact = 0
    worst_scale = worst_deq = 0.0
    mismatch = []
    bits = Counter()
    for name, cname in consts.items():
        g = grid.layers[name]
        op = ops.get(cname + "_quantized")
        if op is None:
            mismatch.append(f"{name} (no constexpr op)")
            continue
        kinds[op.op_type] += 1
        vals = {k: v.val for k, v in op.inputs.items()}
        data = vals.get("data", vals.get("quantized_data"))
        scale = np.asarray(vals["scale"])
        offset = vals.get("offset", vals.get("zero_point"))
        q = ints[name].numpy()
        if data is None or data.shape != q.shape or not np.array_equal(data.astype(np.int8), q) or (
                offset is not None and np.any(np.asarray(offset) != 0)):
            mismatch.append(name)
            continue
        equal += 1
        var = op.inputs.get("data", op.inputs.get("quantized_data"))
        bits[types.builtin_to_string(var.dtype)] += 1  # the stored integer type: int8 / int4
        o = q.shape[0]
        s = scale.reshape(o, -1).astype(np.float64)
        ref = g.scale.numpy().reshape(o, -1).astype(dtype).astype(np.float64)
        worst_scale = max(worst_scale, float(np.max(np.abs(s - ref) / np.where(ref == 0, 1, np.abs(ref)))))
        full = np.repeat(scale.reshape(o, -1), q.shape[1] // s.shape[1], axis=1).reshape(o, q.shape[1], *([1] * (q.ndim - 2)))
        deq = (q.astype(np.float32) * full).astype(dtype)
        w = mods[name].weight.detach().float().numpy().astype(dtype)
        deq_exact += bool(np.array_equal(deq, w))
        worst_deq = max(worst_deq, float(np.max(np.abs(deq.astype(np.float64) - w)) / max(float(np.abs(w).max()), 1e-30)))
    return {
        "layers_checked": len(consts), "integers_equal": equal, "constexpr_ops": dict(kinds), "data_types": dict(bits),
        "scale_max_rel_diff": worst_scale, "dequantized_exact": deq_exact, "dequantized_max_rel_err": worst_deq,
        "mismatch": mismatch,
    }


def summary(grid, consts: dict, missing: dict, n_float: int, target: str, bumped: str | None, precision: str) -> dict:
    """The manifest's ``quantization`` block for a Core ML export."""
    layers = [grid.layers[n] for n in consts]
    notes = []
    if bumped:
        notes.append(bumped)
    if precision == "fp16":
        notes.append("fp16: weights are quantized from their fp16 values, scales stored in fp16 (integers unchanged)")
    acts = "float"
    if grid.activations:
        notes.append(f"{grid.scheme}: activations stay {precision} - Core ML activation quantization calibrates with "
                     "Core ML predictions (macOS only); weights as the grid")
        acts = f"{precision} (grid asks {grid.activations.get('bits')}-bit: not lowered)"
    return {
        "scheme": grid.scheme,
        "method": grid.method,
        "layers_int8": sum(g.bits == 8 for g in layers),
        "layers_int4": sum(g.bits == 4 for g in layers),
        "layers_float": n_float + len(missing),
        "fallbacks": dict(missing),
        "activations": acts,
        "deployment_target": target,
        "notes": notes,
    }
