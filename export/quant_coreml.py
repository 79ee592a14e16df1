"""A quantization grid (``compress.quant.grid``) lowered into Core ML's compressed weights (ML Program).

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
integers still come out equal (``|w16/s16 - q| <= 127 * 3 * 2**-11 < 0.5``), and since the grid's
scales are exact in fp16 and chosen so that this fp16 observer gives them back
(``grid.storable_scale``), the stored scale is the grid's and the dequantized weight is exactly
``fp16(q * scale)``, the on-grid weight cast to fp16 (grids made before scales were rounded so:
scales within an fp16 ulp or two). At fp32 precision the scale is stored in fp32 (its value is the
grid's, fp16-exact): an fp16 scale makes the constexpr's output fp16, and an fp32 program would
need a ``cast`` op after it (whether Core ML folds it at load cannot be checked on Linux).
``readback`` checks integers, scales and dequantized weights in the saved package's MIL program.

Each layer's weight ``const`` is found once, after conversion, by the name torch.export gives it
(``p_<source>_<path>_weight[_to_fp16]``, its value checked) or else by value (``layer_map.match``;
torch.jit.trace names differ); the layer map records the compressed op (``<const>_quantized``), and
``readback`` reads the integers from the saved package through it.

Activations stay float (fp16/fp32): Core ML's activation quantization
(``linear_quantize_activations``) calibrates with Core ML predictions, which need macOS.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np

from pocketfusion.export import layer_map as lm

logger = logging.getLogger(__name__)

_HEAVY = ("conv", "linear", "matmul")


def needs_ios18(grid) -> bool:
    """4-bit weights (per-block int4) exist in Core ML only from iOS18."""
    return any(g.bits == 4 for g in grid.layers.values())


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


QUANTIZED_SUFFIX = "_quantized"  # coremltools names a compressed const's op "<const>_quantized"


def match_layers(layers, module, consts: dict, dtype, source: str) -> tuple[dict[str, str], dict[str, str]]:
    """Layer -> weight const name: the name torch.export gives it (``p_<source>_<path>_weight``, plus
    ``_to_fp16`` when cast), checked by value, else by value (the weight cast to ``dtype``); and
    {layer: reason} for the layers found in neither way."""
    mods = dict(module.named_modules())
    weights = {n: mods[n].weight.detach().float().numpy().astype(dtype) for n in layers}
    values = {c: op.outputs[0].val for c, op in consts.items()}
    candidates = {c: np.asarray(v).astype(dtype) for c, v in values.items() if v is not None}
    expected = {}
    for n in layers:
        base = "p_" + re.sub(r"[^0-9a-zA-Z]+", "_", f"{source}.{n}.weight")
        expected[n] = next((c for c in (base + "_to_fp16", base + "_to_fp32", base) if c in candidates), base)
    hits = lm.match(weights, candidates, expected=expected)
    found = {n: h[0] for n, h in hits.items() if h}
    missing = {n: "no conv/linear weight const with this layer's on-grid values in the converted program: kept float"
               for n, h in hits.items() if not h}
    return found, missing


def op_config(g):
    """The ``OpLinearQuantizerConfig`` reproducing layer grid ``g``."""
    import coremltools.optimize.coreml as cto

    if g.bits == 8 and g.group_size is None:
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0)
    block = [1, g.group_size or g.shape[1]] + [0] * (len(g.shape) - 2)
    return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{g.bits}", granularity="per_block", block_size=block,
                                       weight_threshold=0)


def weight_map(mlmodel, module, layers, precision: str, source: str) -> dict[str, str]:
    """The layer map of a float program: each of ``layers`` -> its weight const."""
    dtype = np.float16 if precision == "fp16" else np.float32
    found, _ = match_layers(layers, module, weight_consts(mlmodel), dtype, source)
    return found


def quantize(mlmodel, grid, module, precision: str, source: str):
    """Compress the grid's layers of ``mlmodel`` in place of their fp weights.

    Returns ``(compressed MLModel, layer map {layer: compressed op name}, {layer: reason it stayed float})``."""
    import coremltools.optimize.coreml as cto

    dtype = np.float16 if precision == "fp16" else np.float32
    found, missing = match_layers(grid.layers, module, weight_consts(mlmodel), dtype, source)
    configs = {c: op_config(grid.layers[name]) for name, c in found.items()}
    compressed = cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=configs))
    return compressed, {name: c + QUANTIZED_SUFFIX for name, c in found.items()}, missing


def _load_program(path: Path):
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    return milproto_load(spec, spec.specificationVersion, model.weights_dir)


def readback(path: str | Path, grid, module, layer_map: dict[str, str], precision: str) -> dict:
    """Read the compressed weights back from the saved package through the layer map and compare
    them with the grid.

    For every mapped layer, the ``constexpr_*`` op the map names must hold the grid's
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
    ints = grid.integers(module)
    mods = dict(module.named_modules())
    kinds: Counter[str] = Counter()
    equal = deq_exact = 0
    worst_scale = worst_deq = 0.0
    mismatch = []
    bits = Counter()
    for name, opname in layer_map.items():
        g = grid.layers[name]
        op = ops.get(opname)
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
        "layers_checked": len(layer_map), "integers_equal": equal, "constexpr_ops": dict(kinds), "data_types": dict(bits),
        "scale_max_rel_diff": worst_scale, "dequantized_exact": deq_exact, "dequantized_max_rel_err": worst_deq,
        "mismatch": mismatch,
    }


def summary(grid, layer_map: dict, missing: dict, n_float: int, target: str, bumped: str | None, precision: str) -> dict:
    """The manifest's ``quantization`` block for a Core ML export."""
    layers = [grid.layers[n] for n in layer_map]
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
