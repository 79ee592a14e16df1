"""Lower a quantization grid (``compress.quant.grid``) into an exported ONNX graph: QDQ weight-only.

``torch.onnx.export`` writes the on-grid U-Net with fp32 weights (exactly ``q * scale``). Each grid
layer's weight initializer is then replaced by *our* integers plus a ``DequantizeLinear`` that
feeds the original consumer (Conv / Gemm / MatMul), so the file holds int8 / int4 and the runtime
dequantizes exactly the on-grid weights::

    q<i> (int8|int4) --DequantizeLinear(s<i>, axis, [block_size])--> [Cast] --> [Reshape] --> w<i> --> Conv/Gemm/MatMul

Scales: 4-bit group (blocked) scales are stored as **fp16** initializers (``fp16_scale``): at groups of 32 an
fp32 scale costs one more bit per weight. ``DequantizeLinear``'s output has its scale's type, so a ``Cast`` to
float follows it; the dequantized fp16 weight is still exactly ``q * scale``: the grid's group scales are exact in
both fp16 and bf16 (``grid.storable_scale``: at most 8 significant bits, multiples of ``2**-24``) and ``|q| <= 7``
has 3, so every product fits fp16's 11. onnxruntime's ``fold`` path folds both nodes at load (the same fp32
weights as before); its ``qdq`` path cannot fuse ``DequantizeLinear -> Cast -> MatMul`` into ``MatMulNBits``, so
``--onnx-weights qdq`` keeps fp32 scales. Per-channel scales (one per output channel: no size to win) stay fp32,
as do the scales of grids made before they were rounded and of graphs whose activations get quantized (the
``quantize_static`` pass expects DequantizeLinear to feed the op directly).

Layouts (``q`` in torch layout is (O, I[, kh, kw]); the scale is (O,) per channel or (O, I/g) per group):

* Conv weight (O, I, kh, kw): per channel ``axis=0``; per group the integers are stored as
  (O, I*kh*kw), blocked on axis 1 with ``block_size = g*kh*kw`` (g input channels x every kernel
  position are contiguous) so the (O, I/g) scale is stored once, then reshaped back (1x1 convs
  need no reshape);
* Gemm (transB=1) weight (O, I): ``axis=0`` / blocked on axis 1;
* MatMul weight (I, O) (the exporter transposed it): ``axis=1`` / blocked on axis 0, the layout
  onnxruntime fuses into ``MatMulNBits`` for 4-bit groups.

int4 (ONNX ``INT4``, packed two per byte) and blocked ``DequantizeLinear`` need opset 21: the
graph's default-domain opset is raised to 21 when any layer is 4-bit.

The layer map (``export.layer_map``) records, while lowering, which initializer holds each
layer's integers; ``read_integers`` reads them back through it. Names are compact (``q<i>``, ``s<i>``, ``w<i>``:
``i`` the layer's index in the grid; the float weight's own name is gone with it): the layer map, in the manifest,
is what ties them to layers. Long names cost bytes at the demo's size (each is written six to eight times over a
layer's nodes and tensors: 0.5 % of the fp32 weights over the U-Net's 132 layers, a W4 size target's margin).

Static activation quantization (schemes w8a8 / w8a16): ``onnxruntime.quantization.quantize_static``
in QDQ format on the lowered graph, restricted to the grid layers' nodes; onnxruntime recognises
our weight ``DequantizeLinear`` outputs as pre-quantized and leaves them (our integers stay).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pocketfusion.export import layer_map as lm

logger = logging.getLogger(__name__)

INT4_OPSET = 21


@dataclass
class WeightSlot:
    """A weight initializer consumed by a Conv / Gemm / MatMul and its layout relative to torch's."""

    name: str
    op: str  # "Conv" | "Gemm" | "MatMul"
    transposed: bool  # stored as (I, O): MatMul, or Gemm with transB=0
    nodes: list


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def weight_slots(graph) -> dict[str, WeightSlot]:
    """Initializers used as the weight of a Conv (input 1), Gemm (input 1) or MatMul (input 1)."""
    inits = {i.name for i in graph.initializer}
    slots: dict[str, WeightSlot] = {}
    bad: set[str] = set()
    for node in graph.node:
        for k, x in enumerate(node.input):
            if x not in inits:
                continue
            if k == 1 and node.op_type in ("Conv", "Gemm", "MatMul"):
                if node.op_type == "Gemm":
                    transposed = not _attr(node, "transB", 0)
                else:
                    transposed = node.op_type == "MatMul"
                s = slots.setdefault(x, WeightSlot(x, node.op_type, transposed, []))
                if (s.op, s.transposed) != (node.op_type, transposed):
                    bad.add(x)
                s.nodes.append(node)
            else:
                bad.add(x)  # also used elsewhere: leave it alone
    return {k: v for k, v in slots.items() if k not in bad}


def _torch_layout(a: np.ndarray, slot: WeightSlot) -> np.ndarray:
    return a.T if slot.transposed else a


def _stored(q: np.ndarray, scale: np.ndarray, slot: WeightSlot, group_size: int | None):
    """(integers as stored, scale as stored, DQ attributes, reshape-to shape or None) of one weight."""
    o = q.shape[0]
    if slot.op == "Conv":
        i, k = q.shape[1], int(np.prod(q.shape[2:]))
        if group_size is None:
            return q, scale.reshape(o), {"axis": 0}, None
        if k == 1:
            return q, scale.reshape(o, i // group_size, *([1] * (q.ndim - 2))), {"axis": 1, "block_size": group_size}, None
        return q.reshape(o, i * k), scale.reshape(o, i // group_size), {"axis": 1, "block_size": group_size * k}, q.shape
    if not slot.transposed:  # (O, I)
        if group_size is None:
            return q, scale.reshape(o), {"axis": 0}, None
        return q, scale, {"axis": 1, "block_size": group_size}, None
    # (I, O)
    if group_size is None:
        return np.ascontiguousarray(q.T), scale.reshape(o), {"axis": 1}, None
    return np.ascontiguousarray(q.T), np.ascontiguousarray(scale.T), {"axis": 0, "block_size": group_size}, None


def _int_tensor(q: np.ndarray, bits: int, name: str):
    from onnx import numpy_helper

    if bits == 4:
        import ml_dtypes

        return numpy_helper.from_array(q.astype(ml_dtypes.int4), name)
    return numpy_helper.from_array(q.astype(np.int8), name)


def raise_opset(model, opset: int):
    """The model at default-domain ``opset`` (onnx's version converter) and an IR version that holds int4."""
    import onnx

    cur = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if cur is not None and cur >= opset:
        return model
    # The converter passes the model through one serialized proto (2 GiB at most): the weights' bytes
    # are set aside while it runs (it reads shapes, not large constants) and put back after.
    stash = {}
    for t in model.graph.initializer:
        if len(t.raw_data) > (1 << 16):
            stash[t.name] = t.raw_data
            t.ClearField("raw_data")
    model = onnx.version_converter.convert_version(model, opset)
    for t in model.graph.initializer:
        if t.name in stash:
            t.raw_data = stash.pop(t.name)
    if stash:
        raise RuntimeError(f"onnx version converter dropped initializers: {sorted(stash)[:3]}")
    model.ir_version = max(model.ir_version, 10)
    del model.graph.value_info[:]  # the converter's shape inference: not needed, ~4 % of a small U-Net's file
    return model


def _slot_arrays(graph, slots: dict[str, WeightSlot]) -> dict[str, np.ndarray]:
    """The fp32 weight initializers of ``slots``, in torch layout."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    out = {}
    for name, slot in slots.items():
        a = numpy_helper.to_array(inits[name])
        if a.dtype != np.float32 or (slot.transposed and a.ndim != 2):
            continue
        out[name] = _torch_layout(a, slot)
    return out


def weight_map(model, module, layers) -> dict[str, str]:
    """The layer map of a float export: each of ``layers`` (modules of ``module``) -> the initializer
    holding its weight (found by value: the exporter renames transposed MatMul weights)."""
    mods = dict(module.named_modules())
    slots = weight_slots(model.graph)
    found = lm.match({n: mods[n].weight.detach().float().numpy() for n in layers}, _slot_arrays(model.graph, slots), all_equal=True)
    return {n: lm.join(names) for n, names in found.items() if names}


def fp16_scale(g, grid) -> bool:
    """Whether layer grid ``g`` gets fp16 scales (module docstring): 4-bit groups whose scales are exact in fp16
    and bf16 (then ``q * scale`` is exact in fp16), in a weight-only grid."""
    from pocketfusion.compress.quant.grid import scale_is_storable

    return g.group_size is not None and g.bits <= 4 and not grid.activations and scale_is_storable(g.scale, g.group_size)


def lower_weights(model, module, grid, *, fp16_scales: bool = True) -> tuple[object, dict, dict[str, str]]:
    """Replace every grid layer's fp32 weight initializer in ``model`` (an ``onnx.ModelProto`` of the
    on-grid ``module``) by its integers + ``DequantizeLinear``. The weight is found once, here, by
    value (``layer_map.match``: the fp32 initializer equals ``q * scale`` in torch's or the transposed
    layout), and the integer initializers written are recorded in the layer map. ``fp16_scales``: the layers
    ``fp16_scale`` accepts store fp16 scales (else every scale is fp32).

    A grid whose other float parameters are on fp16 values (``grid.floats_are_fp16``: W4) has them stored as fp16
    initializers + ``Cast`` (``_half_floats``).

    Returns the model, ``{"int8": [...], "int4": [...], "scales_fp16": [...], "floats_fp16": [...],
    "fallbacks": {layer: reason}}`` and the
    layer map ``{layer: "q<i>"[+"q<i>_1"...]}`` (``i``: the layer's index in the grid; compact names, see below).
    """
    from onnx import TensorProto, helper, numpy_helper

    from pocketfusion.compress.quant.grid import floats_are_fp16

    graph = model.graph
    slots = weight_slots(graph)
    mods = dict(module.named_modules())
    found = lm.match({n: mods[n].weight.detach().float().numpy() for n in grid.layers}, _slot_arrays(graph, slots), all_equal=True)
    ints = grid.integers(module)
    done: dict[str, list[str]] = {"int8": [], "int4": [], "scales_fp16": []}
    fallbacks: dict[str, str] = {}
    layer_map: dict[str, str] = {}
    new_nodes, new_inits, drop = [], [], set()
    for idx, (layer, g) in enumerate(grid.layers.items()):
        if not found[layer]:
            fallbacks[layer] = "weight not found among the graph's Conv/Gemm/MatMul initializers: kept fp32"
            continue
        q = ints[layer].numpy()
        scale = g.scale.float().numpy()
        half = fp16_scales and fp16_scale(g, grid)
        names = []
        for k, init_name in enumerate(found[layer]):
            slot = slots[init_name]
            data, sc, attrs, reshape = _stored(q, scale, slot, g.group_size)
            # compact names (the layer map says which layer each is): at the demo's size a layer's long names, written
            # six to eight times over its nodes and tensors, cost as much as 4 % of its int4 weights
            tag = f"{idx}" if k == 0 else f"{idx}_{k}"
            qn, sn, w = f"q{tag}", f"s{tag}", f"w{tag}"  # integers, scale, the dequantized weight the op reads
            new_inits += [_int_tensor(data, g.bits, qn),
                          numpy_helper.from_array(np.ascontiguousarray(sc, dtype=np.float16 if half else np.float32), sn)]
            out = w if reshape is None else w + "r"
            dq_out = out + "h" if half else out
            new_nodes.append(helper.make_node("DequantizeLinear", [qn, sn], [dq_out], name=f"dq{tag}", **attrs))
            if half:
                new_nodes.append(helper.make_node("Cast", [dq_out], [out], name=f"c{tag}", to=TensorProto.FLOAT))
            if reshape is not None:
                shp = f"r{tag}"
                new_inits.append(numpy_helper.from_array(np.array(reshape, dtype=np.int64), shp))
                new_nodes.append(helper.make_node("Reshape", [out, shp], [w], name=f"rs{tag}"))
            _rename_input(slot.nodes, init_name, w)
            drop.add(init_name)
            names.append(qn)
        layer_map[layer] = lm.join(names)
        done[f"int{g.bits}"].append(layer)
        if half:
            done["scales_fp16"].append(layer)
    keep = [i for i in graph.initializer if i.name not in drop]
    done["floats_fp16"] = []
    if floats_are_fp16(grid):  # the grid put the other float parameters on fp16 values: store them so
        keep, casts, done["floats_fp16"] = _half_floats(keep, {i.name for i in graph.input}, _consumers(graph))
        new_nodes += casts
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    inputs = [i for i in graph.input if i.name not in drop]
    del graph.input[:]
    graph.input.extend(inputs)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)
    return model, {**done, "fallbacks": fallbacks}, layer_map


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in graph.node:
        for x in n.input:
            out.setdefault(x, []).append(n)
    return out


def _past_cast(consumers: dict[str, list], node):
    """The node a DequantizeLinear's output reaches through the ``Cast`` to float that follows fp16 scales."""
    nxt = consumers.get(node.output[0], [])
    if len(nxt) == 1 and nxt[0].op_type == "Cast":
        return consumers.get(nxt[0].output[0], [])
    return nxt


def read_integers(model, layer_map: dict[str, str]) -> dict[str, dict]:
    """The integers a lowered model holds for each layer of ``layer_map``, read back from the
    initializers it names and their ``DequantizeLinear`` nodes (layers whose initializer is not
    integer are left out).

    Returns ``{layer: {"q": int8 array in torch layout, "scale": float32 array in the grid's layout
    ((O,) or (O, I/g)), "scale_dtype": the stored scale's numpy dtype name, "bits": 4|8, "op": consumer op}}``.
    """
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers = _consumers(graph)
    out = {}
    for layer, value in layer_map.items():
        qn = lm.split(value)[0]
        t = inits.get(qn)
        dq = [n for n in consumers.get(qn, []) if n.op_type == "DequantizeLinear"]
        if t is None or t.data_type not in (TensorProto.INT8, TensorProto.INT4) or not dq:
            continue
        n = dq[0]
        bits = 4 if t.data_type == TensorProto.INT4 else 8
        q = numpy_helper.to_array(t).astype(np.int8)
        stored = numpy_helper.to_array(inits[n.input[1]])
        sc = stored.astype(np.float32)
        nxt = _past_cast(consumers, n)[0]
        if nxt.op_type == "Reshape":
            q = q.reshape(numpy_helper.to_array(inits[nxt.input[1]]))
            nxt = consumers[nxt.output[0]][0]
        transposed = nxt.op_type == "MatMul" or (nxt.op_type == "Gemm" and not _attr(nxt, "transB", 0))
        if transposed:
            q = q.T
            sc = sc.T if sc.ndim == 2 else sc
        o = q.shape[0]
        sc = sc.reshape(o, -1) if _attr(n, "block_size", 0) else sc.reshape(o)
        out[layer] = {"q": np.ascontiguousarray(q), "scale": sc, "scale_dtype": stored.dtype.name, "bits": bits, "op": nxt.op_type}
    return out


# --- static activation quantization (w8a8 / w8a16) --------------------------------------------------


class _Feeds:
    """``onnxruntime.quantization.CalibrationDataReader`` over a list of feed dicts."""

    def __init__(self, feeds: list[dict], names: list[str]):
        self._it = iter([{n: np.ascontiguousarray(f[n]) for n in names} for f in feeds])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - not used by MinMax calibration
        pass


def _layer_nodes(graph, layer_map: dict[str, str]) -> dict[str, list]:
    """Grid layer -> the nodes consuming its (dequantized) weight, through the layer map."""
    consumers = _consumers(graph)
    out: dict[str, list] = {}
    for layer, value in layer_map.items():
        for qn in lm.split(value):
            for dq in consumers.get(qn, []):
                nxt = _past_cast(consumers, dq)
                if len(nxt) == 1 and nxt[0].op_type == "Reshape":
                    nxt = consumers.get(nxt[0].output[0], [])
                out.setdefault(layer, []).extend(nxt)
    return out


def quantize_activations(model, grid, layer_map: dict[str, str], feeds: list[dict], input_names: list[str],
                         workdir) -> tuple[object, dict]:
    """Static QDQ activation quantization of the grid layers' inputs (onnxruntime ``quantize_static``).

    Activation bits per layer come from ``grid.activations["layers"]`` (None: the layer's input
    stays float); outputs and biases are not quantized (the grid quantizes layer inputs only).
    Returns the model and ``{"bits": {layer: 8|16|None}, "calibration_feeds": n}``.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    acts = grid.activations or {}
    default = int(acts.get("bits", 8))
    per_layer = {n: (v.get("bits") if isinstance(v, dict) else v) for n, v in (acts.get("layers") or {}).items()}
    qtype = {8: QuantType.QInt8, 16: QuantType.QInt16}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    nodes = _layer_nodes(model.graph, layer_map)
    to_quantize, overrides, bits = [], {}, {}
    for layer in grid.layers:
        b = per_layer.get(layer, default)
        bits[layer] = b
        if b is None or layer not in nodes:
            continue
        for node in nodes[layer]:
            to_quantize.append(node.name)
            if b != default:
                overrides.setdefault(node.input[0], [{"quant_type": qtype[int(b)]}])
    src, dst = Path(workdir) / "act_in.onnx", Path(workdir) / "act_out.onnx"
    onnx.save_model(model, str(src))
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # onnxruntime.quantization logs a pre-processing hint on the root logger
    try:
        quantize_static(
            str(src), str(dst), _Feeds(feeds, input_names), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "Gemm", "MatMul"], nodes_to_quantize=to_quantize,
            activation_type=qtype[default], weight_type=QuantType.QInt8, per_channel=True,
            extra_options={
                "QuantizeBias": False, "OpTypesToExcludeOutputQuantization": ["Conv", "Gemm", "MatMul"],
                "TensorQuantOverrides": overrides, "ActivationSymmetric": False,
            },
        )
    finally:
        root.setLevel(level)
    out = onnx.load(str(dst))
    src.unlink(missing_ok=True)
    dst.unlink(missing_ok=True)
    counts = {f"layers_a{b}": sum(1 for v in bits.values() if v == b) for b in (8, 16)}
    return out, {"bits": default, **counts, "layers_float": sum(1 for v in bits.values() if v is None),
                 "calibration_feeds": len(feeds), "_per_layer": bits}


# --- the exporter's entry point ---------------------------------------------------------------------


HALF_MIN_ELEMENTS = 64  # a smaller tensor saves less than its Cast node costs; Resize scales and such stay fp32


def _rename_input(nodes, old: str, new: str) -> None:
    for n in nodes:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new


def _half_floats(inits: list, inputs: set[str], consumers: dict[str, list]) -> tuple[list, list, list[str]]:
    """fp32 initializers of at least ``HALF_MIN_ELEMENTS`` values that fp16 holds exactly, as fp16 initializers +
    ``Cast`` to float (onnxruntime folds the Cast when the session loads; the graph computes the same numbers), under
    compact names. Returns the initializers, the Cast nodes and the old names of those converted."""
    from onnx import TensorProto, helper, numpy_helper

    out, casts, names = [], [], []
    for t in inits:
        if t.data_type == TensorProto.FLOAT and int(np.prod(t.dims)) >= HALF_MIN_ELEMENTS and t.name not in inputs:
            a = numpy_helper.to_array(t)
            h = a.astype(np.float16)
            if np.isfinite(h).all() and np.array_equal(h.astype(np.float32), a):
                j = len(names)
                out.append(numpy_helper.from_array(h, f"h{j}"))
                casts.append(helper.make_node("Cast", [f"h{j}"], [f"f{j}"], name=f"hc{j}", to=TensorProto.FLOAT))
                _rename_input(consumers.get(t.name, []), t.name, f"f{j}")
                names.append(t.name)
                continue
        out.append(t)
    return out, casts, names


def _needed_opset(grid) -> tuple[int, bool]:
    acts = grid.activations or {}
    a16 = bool(acts) and (int(acts.get("bits", 8)) == 16 or any(
        (v.get("bits") if isinstance(v, dict) else v) == 16 for v in (acts.get("layers") or {}).values()))
    return (21 if any(g.bits == 4 for g in grid.layers.values()) or a16 else 13), a16


def quantize(model, spec, cfg, workdir) -> tuple[object, dict, dict[str, str]]:
    """Lower ``spec.grid`` into ``model`` (the exported on-grid component); check the integers read
    back through the layer map.

    Returns the model, the manifest's ``quantization`` entry and the layer map."""
    from pocketfusion.export.base import ExportError

    grid, module = spec.grid, spec.source_module
    notes: list[str] = []
    need, a16 = _needed_opset(grid)
    cur = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if cur < need:
        model = raise_opset(model, need)
        why = ("int4 weights / blocked DequantizeLinear" if need == 21 and not a16 else "16-bit QDQ" if need == 21
               else "per-axis DequantizeLinear")
        notes.append(f"opset raised from {cur} to {need} (for {why})")
    model, rep, layer_map = lower_weights(model, module, grid, fp16_scales=cfg.onnx_weights != "qdq")
    if cfg.onnx_weights == "qdq" and any(fp16_scale(g, grid) for g in grid.layers.values()):
        notes.append("--onnx-weights qdq: 4-bit group scales kept fp32 (onnxruntime fuses DequantizeLinear -> MatMul into "
                     "MatMulNBits only then; other paths store them in fp16)")
    act_info = None
    if grid.activations:
        feeds = spec.calibration
        if not feeds:
            feeds = spec.golden
            notes.append("no calibration set: activation ranges calibrated on the golden feeds")
        model, act_info = quantize_activations(model, grid, layer_map, feeds, [s.name for s in spec.inputs], workdir)
    back = read_integers(model, layer_map)
    ints = grid.integers(module)
    half = set(rep["scales_fp16"])
    for layer in rep["int8"] + rep["int4"]:
        got = back.get(layer)
        if got is None or not np.array_equal(got["q"], ints[layer].numpy()) or not np.array_equal(
            got["scale"], grid.layers[layer].scale.float().numpy().reshape(got["scale"].shape)
        ) or got["scale_dtype"] != ("float16" if layer in half else "float32"):
            raise ExportError(f"onnx: {spec.name}: layer {layer} does not hold the grid's integers after lowering")
    fallbacks = dict(rep["fallbacks"])
    if act_info:
        for layer, b in act_info.pop("_per_layer").items():
            if b is None:
                fallbacks.setdefault(layer, "activations kept float (the grid's activation fallback)")
    info = {
        "scheme": grid.scheme, "method": grid.method, "format": "QDQ weight-only (DequantizeLinear)"
        + (" + static QDQ activations (onnxruntime quantize_static)" if act_info else ""),
        "layers_int8": len(rep["int8"]), "layers_int4": len(rep["int4"]), "layers_float": len(rep["fallbacks"]),
        "scales": {"float16": len(rep["scales_fp16"]), "float32": len(rep["int8"]) + len(rep["int4"]) - len(rep["scales_fp16"])},
        "float_tensors_fp16": len(rep["floats_fp16"]),
        "fallbacks": fallbacks, "activations": act_info,
        "activation_bits": (8 if act_info["layers_a8"] else 16 if act_info["layers_a16"] else None) if act_info else None,
        "verified": "integers and scales (and the scales' storage type) read back through the layer map equal the grid's",
        "notes": notes,
    }
    if fallbacks:
        logger.warning("onnx: %s: %d grid layer(s) not held as quantized (%s)", spec.name, len(fallbacks),
                       "; ".join(f"{k}: {v}" for k, v in list(fallbacks.items())[:3]) + (" ..." if len(fallbacks) > 3 else ""))
    return model, info, layer_map
