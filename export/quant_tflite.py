"""Lower a quantization grid (``compress.quant.grid``) into a converted ``.tflite``: weight-only int8 / int4.

litert-torch converts the on-grid component with fp32 weights (exactly ``q * scale``). Each grid layer's
constant weight (input 1 of a ``CONV_2D`` / ``FULLY_CONNECTED``, found by value) is then replaced,
in the flatbuffer, by *our* integers with per-axis quantization parameters and a ``DEQUANTIZE``
that produces the original tensor, so the file holds int8 / int4 and LiteRT dequantizes exactly
the on-grid weights (fp32 compute, as ai-edge-quantizer's weight-only recipes do)::

    per channel:  <layer>.weight.q (INT8|INT4, OHWI / (O, I), scale (O,) on axis 0) -> DEQUANTIZE -> op

Why not ai-edge-quantizer's own recipes for everything: its weight-only configs hold CHANNELWISE
(and TENSORWISE) only; BLOCKWISE int4 exists only as *dynamic* (int8 activations at run time) and
only for ``FULLY_CONNECTED``, and stores the block scales as fp16 rounded to a 7-bit mantissa, so
neither our group scales nor (after its own re-quantization) our integers survive. Its abs-max
observer (``bound / qmax``, int8 narrow range [-127, 127], int4 [-8, 7] of which an on-grid weight
uses [-7, 7]) does reproduce our per-channel integers, but its scale can differ from ours by an ulp.
So this module writes the tensors itself, with ai-edge-quantizer's flatbuffer helpers.

Group-wise int4 (scale (O, I/g)) has no native per-block weight-only form in LiteRT. It is held
exactly with per-axis quantization on a re-laid-out tensor: the integers are stored as
(O * I/g, kh*kw*g) — one row per (output channel, group), so the per-row scale *is* the group
scale — and turned back into the op's layout after ``DEQUANTIZE``::

    (O*I/g, kh*kw*g) -DEQUANTIZE-> RESHAPE (O, I/g, kh, kw, g) -TRANSPOSE-> (O, kh, kw, I/g, g) -RESHAPE-> OHWI

(a ``FULLY_CONNECTED`` or 1x1 conv needs only the final ``RESHAPE``). Every integer and scale is ours.

Where each layer's weight went is found once, while lowering (``weight_pieces``: by value through
``layer_map.match``, then the converter's folds and splits), and recorded in the layer map
(``<layer>.weight.q`` tensors, several joined when the converter split a weight); ``read_integers``
reads the integers back through it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pocketfusion.export import layer_map as lm

logger = logging.getLogger(__name__)

Q_SUFFIX = ".weight.q"
GROUPED_NOTE = "group-wise int4 layers held"
_WEIGHT_OPS = ("CONV_2D", "FULLY_CONNECTED")


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _op_names(model) -> list[str]:
    s = _schema()
    codes = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    return [codes.get(max(oc.builtinCode, oc.deprecatedBuiltinCode), "?") for oc in model.operatorCodes]


def read_model(path: Path):
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu

    return fu.read_model(Path(path))


def write_model(model, path: Path) -> None:
    """Serialize with ai-edge-quantizer's model writer (buffers packed after the flatbuffer when large)."""
    from ai_edge_litert.tools import flatbuffer_utils, mmap_utils
    from ai_edge_quantizer import model_modifier

    packed = model_modifier._PackedBufferData(model)  # noqa: SLF001 - the quantizer's own >2 GiB-safe writer
    if packed.packed_size < 256 * 1024:
        mmap_utils.set_file_contents(str(path), flatbuffer_utils.convert_object_to_bytearray(model))
    else:
        model_modifier.ModelModifier(model)._serialize_model(model, packed, serialize_to_path=str(path))  # noqa: SLF001


def write_model_over(model, path: Path) -> None:
    """Replace the file ``model`` was read from: written beside it, then renamed over it (not in place: the read
    model's buffers are views of the mapped file)."""
    out = path.with_name(path.name + ".new")
    write_model(model, out)
    os.replace(out, path)


def _tensor_array(tensor, buffers) -> np.ndarray | None:
    s = _schema()
    data = buffers[tensor.buffer].data if tensor.buffer < len(buffers) else None
    if data is None or len(data) == 0:
        return None
    dt = {s.TensorType.FLOAT32: np.float32, s.TensorType.INT8: np.int8, s.TensorType.INT32: np.int32}.get(tensor.type)
    if dt is None:
        return None
    return np.frombuffer(bytes(data), dtype=dt).reshape(list(tensor.shape))


def _torch_layout(a: np.ndarray, op: str) -> np.ndarray:
    return a.transpose(0, 3, 1, 2) if op == "CONV_2D" else a  # OHWI -> OIHW; FC is (O, I) already


@dataclass
class _Graph:
    model: object
    sg: object
    names: list
    consumers: dict = field(default_factory=dict)  # tensor -> [(op index, input slot)]

    @classmethod
    def of(cls, model):
        g = cls(model, model.subgraphs[0], _op_names(model))
        for i, op in enumerate(g.sg.operators):
            for k, t in enumerate(op.inputs):
                if t >= 0:
                    g.consumers.setdefault(t, []).append((i, k))
        return g

    def op(self, i) -> str:
        return self.names[self.sg.operators[i].opcodeIndex]

    def opcode(self, builtin: int) -> int:
        from ai_edge_quantizer.transformations import transformation_utils as tu

        return tu.add_op_code(builtin, self.model.operatorCodes)

    def add_buffer(self, data: np.ndarray) -> int:
        s = _schema()
        b = s.BufferT()
        b.data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        b.offset, b.size = 0, 0
        self.model.buffers.append(b)
        return len(self.model.buffers) - 1

    def add_tensor(self, name: str, shape, ttype, buffer: int = 0, quant=None) -> int:
        s = _schema()
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer, t.quantization = name.encode(), list(int(x) for x in shape), ttype, buffer, quant
        self.sg.tensors.append(t)
        return len(self.sg.tensors) - 1

    def const_i32(self, name: str, values) -> int:
        v = np.asarray(values, dtype=np.int32)
        return self.add_tensor(name, v.shape, _schema().TensorType.INT32, self.add_buffer(v))

    def make_op(self, builtin: int, inputs, outputs, options_type=0, options=None):
        s = _schema()
        op = s.OperatorT()
        op.opcodeIndex = self.opcode(builtin)
        op.inputs, op.outputs = list(inputs), list(outputs)
        if options is not None:
            op.builtinOptionsType, op.builtinOptions = options_type, options
        return op


def weight_slots(g: _Graph) -> dict[int, str]:
    """Constant fp32 tensors used only as the weight (input 1) of a CONV_2D / FULLY_CONNECTED: {tensor: op}."""
    s = _schema()
    out = {}
    for t, uses in g.consumers.items():
        tensor = g.sg.tensors[t]
        if tensor.type != s.TensorType.FLOAT32 or not tensor.buffer:
            continue
        ops = {g.op(i) for i, _ in uses}
        if all(k == 1 for _, k in uses) and len(ops) == 1 and next(iter(ops)) in _WEIGHT_OPS:
            out[t] = next(iter(ops))
    return out


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return q.astype(np.int8)
    from ai_edge_quantizer.transformations import transformation_utils as tu

    return tu.pack_data(4, np.ascontiguousarray(q.astype(np.int8)).reshape(-1).view(np.uint8))


def _match(weights: dict, arrays: dict) -> dict:
    """Where each layer's weight went in the converted model: ``{layer: [(tensor, row0, row1, factor)]}``.

    The converter keeps most weights as they are (found by value, ``layer_map.match``), folds a
    constant into some (attention scale into to_q / to_k: ``factor``), and splits some along output
    rows (GEGLU's projection into its two halves: several pieces)."""
    exact = lm.match(weights, arrays, all_equal=True)
    pieces = {layer: [(t, 0, weights[layer].shape[0], 1.0) for t in ts] for layer, ts in exact.items()}
    claimed = {p[0] for ps in pieces.values() for p in ps}
    for layer, w in weights.items():
        if pieces[layer]:
            continue
        for t, a in arrays.items():  # the same weight times a constant, or times a per-input-channel vector
            if t not in claimed and a.shape == w.shape:
                c = _folded_factor(a, w)
                if c is None:
                    c = _column_factor(a, w)
                if c is not None:
                    pieces[layer] = [(t, 0, w.shape[0], c)]
                    claimed.add(t)
                    break
        if not pieces[layer]:
            pieces[layer] = _split_rows(w, arrays, claimed)
            claimed.update(p[0] for p in pieces[layer])
    return pieces


def _split_rows(w: np.ndarray, arrays: dict, claimed: set) -> list:
    """The pieces of ``w`` the converter split along output rows (all of them, or none)."""
    rows = {}
    for r in range(w.shape[0]):
        rows.setdefault(hashlib.sha1(np.ascontiguousarray(w[r]).tobytes()).hexdigest(), []).append(r)
    found, covered = [], np.zeros(w.shape[0], dtype=bool)
    for t, a in arrays.items():
        if t in claimed or a.shape[1:] != w.shape[1:] or a.shape[0] >= w.shape[0]:
            continue
        for r0 in rows.get(hashlib.sha1(np.ascontiguousarray(a[0]).tobytes()).hexdigest(), []):
            r1 = r0 + a.shape[0]
            if r1 <= w.shape[0] and not covered[r0:r1].any() and np.array_equal(a, w[r0:r1]):
                found.append((t, r0, r1, 1.0))
                covered[r0:r1] = True
                break
    return sorted(found, key=lambda p: p[1]) if found and covered.all() else []


def weight_pieces(g: _Graph, module, layers) -> tuple[dict, dict]:
    """``(pieces, slots)``: ``_match`` of ``layers`` (modules of ``module``) over the graph's weight constants."""
    slots = weight_slots(g)
    arrays = {}
    for t, op in slots.items():
        a = _tensor_array(g.sg.tensors[t], g.model.buffers)
        if a is not None:
            arrays[t] = _torch_layout(a, op)
    mods = dict(module.named_modules())
    return _match({n: mods[n].weight.detach().float().numpy() for n in layers}, arrays), slots


def weight_map(model, module, layers) -> dict[str, str]:
    """The layer map of a float export: each of ``layers`` -> the tensor(s) holding its weight."""
    g = _Graph.of(model)
    pieces, _ = weight_pieces(g, module, layers)
    return {n: lm.join(g.sg.tensors[p[0]].name.decode(errors="replace") for p in ps) for n, ps in pieces.items() if ps}


def _lower_piece(g: _Graph, t: int, op: str, tag: str, q: np.ndarray, scale: np.ndarray, lg, col) -> list:
    """Write one weight tensor's integers (``tag`` + ``Q_SUFFIX``) and the ops that turn them back into
    tensor ``t`` (DEQUANTIZE, the group-wise re-layout); returns the ops. A per-input-channel vector ``col`` the
    converter had folded into the weight is applied to the op's input instead (``_scale_inputs``), so the weight
    stays a constant the XNNPACK delegate takes (a MUL-produced weight is dynamic: its op runs outside the delegate,
    which split the demo U-Net's graph into 10 partitions instead of 3)."""
    s = _schema()
    B = s.BuiltinOperator
    ttype = s.TensorType.INT8 if lg.bits == 8 else s.TensorType.INT4
    ql = q.transpose(0, 2, 3, 1) if op == "CONV_2D" else q  # the op's layout: OHWI / (O, I)
    o, i = q.shape[0], q.shape[1]
    qp = s.QuantizationParametersT()
    qp.quantizedDimension = 0
    target = g.sg.tensors[t]
    if lg.group_size is None:
        stored, qp.scale = ql, scale.reshape(o).astype(np.float32)
    else:
        gs = lg.group_size
        kk = int(np.prod(ql.shape[1:-1])) if ql.ndim == 4 else 1  # kernel positions
        # (O, [kh, kw,] I) -> (O, I/g, [kh, kw,] g) -> rows (O*I/g, kk*g)
        r = ql.reshape(o, kk, i // gs, gs).transpose(0, 2, 1, 3)
        stored, qp.scale = r.reshape(o * (i // gs), kk * gs), scale.reshape(-1).astype(np.float32)
    qp.zeroPoint = np.zeros(len(qp.scale), dtype=np.int64)  # LiteRT requires one per scale
    qt = g.add_tensor(tag + Q_SUFFIX, stored.shape, ttype, g.add_buffer(_pack(stored, lg.bits)), qp)
    ops = []
    if lg.group_size is None:
        ops.append(g.make_op(B.DEQUANTIZE, [qt], [t]))
    else:
        deq = g.add_tensor(tag + ".weight.dq", stored.shape, s.TensorType.FLOAT32)
        ops.append(g.make_op(B.DEQUANTIZE, [qt], [deq]))
        src = deq
        if kk > 1:
            kh, kw = ql.shape[1], ql.shape[2]
            s5 = [o, i // gs, kh, kw, gs]
            r5 = g.add_tensor(tag + ".weight.r5", s5, s.TensorType.FLOAT32)
            ops.append(_reshape(g, src, r5, s5, tag + ".weight.shape5"))
            t5 = g.add_tensor(tag + ".weight.t5", [o, kh, kw, i // gs, gs], s.TensorType.FLOAT32)
            perm = g.const_i32(tag + ".weight.perm", [0, 2, 3, 1, 4])
            ops.append(g.make_op(B.TRANSPOSE, [r5, perm], [t5], s.BuiltinOptions.TransposeOptions, s.TransposeOptionsT()))
            src = t5
        ops.append(_reshape(g, src, t, list(target.shape), tag + ".weight.shape"))
    old, target.buffer = target.buffer, 0  # now produced by the ops above
    if not any(x.buffer == old for x in g.sg.tensors):
        g.model.buffers[old].data = None  # drop the fp32 copy
    return ops


def lower_weights(model, module, grid) -> tuple[object, dict, dict[str, str]]:
    """Replace each grid layer's fp32 weight in ``model`` (a ``ModelT`` of the on-grid ``module``) by
    its integers + DEQUANTIZE (+ layout ops for group-wise int4). Returns the model,
    ``{"int8": [...], "int4": [...], "grouped": n, "folded": {layer: factor}, "split": {layer: pieces},
    "fallbacks": {layer: reason}}`` and the layer map (layer -> its integer tensors, in row order)."""
    g = _Graph.of(model)
    pieces, slots = weight_pieces(g, module, grid.layers)
    ints = grid.integers(module)
    done: dict[str, list[str]] = {"int8": [], "int4": []}
    fallbacks: dict[str, str] = {}
    folded: dict[str, float] = {}
    columns: dict[str, bool] = {}
    split: dict[str, int] = {}
    layer_map: dict[str, str] = {}
    grouped = 0
    new_ops, input_muls = [], []
    for layer, lg in grid.layers.items():
        if not pieces[layer]:
            fallbacks[layer] = "weight not found among the model's CONV_2D / FULLY_CONNECTED constants: kept fp32"
            continue
        q_all = ints[layer].numpy()
        whole = all(p[1] == 0 and p[2] == q_all.shape[0] for p in pieces[layer])
        if not whole:
            split[layer] = len(pieces[layer])
        tags = []
        for k, (t, r0, r1, c) in enumerate(pieces[layer]):
            col = None
            if isinstance(c, np.ndarray):  # per input channel: an explicit MUL after dequantization
                col, c = c, 1.0
                columns[layer] = True
            elif c != 1.0:
                folded[layer] = c
            tag = (layer if k == 0 else f"{layer}#{k}") if whole else f"{layer}@{r0}"
            scale = lg.scale.double().numpy()[r0:r1] * c
            new_ops += _lower_piece(g, t, slots[t], tag, q_all[r0:r1], scale, lg, col)
            if col is not None:
                input_muls += _scale_inputs(g, t, col, tag)
            tags.append(tag + Q_SUFFIX)
        layer_map[layer] = lm.join(tags if not whole else tags[:1])  # a split weight's pieces; one of several copies
        grouped += lg.group_size is not None
        done[f"int{lg.bits}"].append(layer)
    before = {}  # an input MUL runs right before its op
    for op, mul in input_muls:
        before.setdefault(id(op), []).append(mul)
    g.sg.operators = new_ops + [x for op in g.sg.operators for x in (*before.get(id(op), ()), op)]  # new_ops read constants only
    rep = {**done, "grouped": grouped, "folded": folded, "columns": sorted(columns), "split": split, "fallbacks": fallbacks}
    return model, rep, layer_map


def _scale_inputs(g: _Graph, t: int, col: np.ndarray, tag: str) -> list:
    """For each op that takes weight tensor ``t``: its input activation times ``col`` (one value per input channel,
    the last axis of a CONV_2D / FULLY_CONNECTED input) by a new MUL. Returns ``[(op, mul)]``."""
    s = _schema()
    cv = g.add_tensor(tag + ".input.colscale", [len(col)], s.TensorType.FLOAT32, g.add_buffer(col.astype(np.float32)))
    out = []
    for j, _ in g.consumers.get(t, []):
        op = g.sg.operators[j]
        x = g.sg.tensors[op.inputs[0]]
        x2 = g.add_tensor(tag + ".input.scaled", list(x.shape), s.TensorType.FLOAT32)
        out.append((op, g.make_op(s.BuiltinOperator.MUL, [op.inputs[0], cv], [x2], s.BuiltinOptions.MulOptions, s.MulOptionsT())))
        op.inputs[0] = x2
    return out


def _column_factor(a: np.ndarray, w: np.ndarray) -> np.ndarray | None:
    """``v`` (one value per input channel) when ``a == w * v`` broadcast over the input-channel axis
    (axis 1 in torch layout): a preceding affine (LayerNorm weight) the converter folded in. The
    vector is returned in fp32, checked to reproduce ``a`` bit for bit."""
    if a.shape != w.shape or w.ndim < 2:
        return None
    wt = np.moveaxis(w, 1, -1).reshape(-1, w.shape[1])  # (rest, I)
    at = np.moveaxis(a, 1, -1).reshape(-1, w.shape[1])
    rows = np.abs(wt).argmax(axis=0)
    cols = np.arange(w.shape[1])
    piv = wt[rows, cols]
    v = np.where(piv != 0, at[rows, cols].astype(np.float64) / np.where(piv != 0, piv, 1), 1.0).astype(np.float32)
    bad = np.flatnonzero(~np.all(wt * v[None, :] == at, axis=0))
    for i in bad:  # the quotient can be an ulp or two off the factor that was multiplied in
        for cand in _ulps(v[i], 3):
            if np.array_equal(wt[:, i] * cand, at[:, i]):
                v[i] = cand
                break
        else:
            return None
    return v


def _ulps(x: np.float32, n: int):
    up, down = x, x
    for _ in range(n):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        yield up
        yield down


def _folded_factor(a: np.ndarray, w: np.ndarray, rtol: float = 1e-6) -> float | None:
    """``c`` when ``a == w * c`` up to float rounding (a constant the converter folded into the weight)."""
    if a.shape != w.shape or not np.any(w):
        return None
    nz = w != 0
    if np.any(a[~nz] != 0):
        return None
    r = a[nz].astype(np.float64) / w[nz]
    c = float(np.median(r))
    if c == 0 or not np.all(np.abs(r - c) <= rtol * abs(c) + 1e-30):
        return None
    return c


def _reshape(g: _Graph, src: int, dst: int, shape, name: str):
    s = _schema()
    opts = s.ReshapeOptionsT()
    opts.newShape = [int(x) for x in shape]
    return g.make_op(s.BuiltinOperator.RESHAPE, [src, g.const_i32(name, shape)], [dst], s.BuiltinOptions.ReshapeOptions, opts)


def _unpack4(data: np.ndarray, n: int) -> np.ndarray:
    b = np.frombuffer(bytes(data), dtype=np.uint8)
    lo, hi = (b & 0xF).astype(np.int8), (b >> 4).astype(np.int8)
    v = np.empty(2 * len(b), dtype=np.int8)
    v[0::2], v[1::2] = lo, hi
    v = v[:n]
    return np.where(v > 7, v - 16, v).astype(np.int8)


def _follow(g: _Graph, ti: int, q: np.ndarray) -> tuple[np.ndarray, str] | None:
    """Carry integers stored in tensor ``ti`` through DEQUANTIZE / RESHAPE / TRANSPOSE / MUL to the
    consuming weight op: ``(integers in that op's layout, op name)``, or None when the chain ends elsewhere."""
    cur = ti
    while True:
        uses = g.consumers.get(cur, [])
        if len(uses) != 1:
            return None
        op, name_op = g.sg.operators[uses[0][0]], g.op(uses[0][0])
        if name_op == "RESHAPE":
            q = q.reshape(list(g.sg.tensors[op.outputs[0]].shape))
        elif name_op == "TRANSPOSE":
            q = q.transpose(_tensor_array(g.sg.tensors[op.inputs[1]], g.model.buffers).tolist())
        elif name_op in _WEIGHT_OPS:
            return q, name_op
        elif name_op not in ("DEQUANTIZE", "MUL"):  # MUL: a per-input-channel vector the converter had folded in
            return None
        cur = op.outputs[0]


def _scales(model, tensor) -> np.ndarray:
    """A weight tensor's scales: per-axis (``quantization.scale``) or LiteRT's block-wise (an fp16 tensor, (O, K/block))."""
    s = _schema()
    qp = tensor.quantization
    if qp is not None and qp.detailsType == s.QuantizationDetails.BlockwiseQuantization:
        st = model.subgraphs[0].tensors[qp.details.scales]
        return np.frombuffer(bytes(model.buffers[st.buffer].data), dtype=np.float16).astype(np.float32).reshape(list(st.shape))
    return np.asarray(qp.scale, dtype=np.float32)


def _as_layer(q: np.ndarray, scale: np.ndarray, op: str, shape) -> tuple[np.ndarray, np.ndarray]:
    """Integers (and scales) as the torch layer holds them, given the op that consumes them and the layer's
    torch ``shape`` (needed for a convolution the dynamic path runs as a FULLY_CONNECTED: (O, kh*kw*I) weights,
    block scales repeated per tap)."""
    if op == "CONV_2D" or shape is None or len(shape) != 4 or q.ndim != 2:
        return _torch_layout(q, op), scale.reshape(-1)
    o, i, kh, kw = (int(v) for v in shape)
    if q.shape != (o, kh * kw * i):
        return q, scale.reshape(-1)
    q = q.reshape(o, kh, kw, i).transpose(0, 3, 1, 2)
    if scale.ndim == 2 and scale.shape[1] % (kh * kw) == 0:  # block scales, tap-major: one copy of the groups per tap
        taps = scale.reshape(o, kh * kw, -1)
        if (taps == taps[:, :1]).all():
            scale = taps[:, 0]
    return q, scale.reshape(-1)


def read_integers(model, layer_map: dict[str, str], shapes: dict | None = None) -> dict[str, dict]:
    """The integers a lowered model holds for each layer of ``layer_map``, read back from the tensors
    it names: ``{layer: {"q": int8 array in torch layout, "scale": float32 array (flat, (O,) or
    (O * I/g,)), "bits", "op", "pieces"}}`` (layers whose tensors are not integer are left out).

    The stored integers are carried through the DEQUANTIZE / RESHAPE / TRANSPOSE chain to the
    consuming op, so the result is what that op computes with; the pieces of a weight the converter
    split are put back together in the map's (row) order. ``shapes`` ({layer: torch weight shape}) puts back a
    convolution that LiteRT's dynamic path (``export.litert_paths``) runs as a FULLY_CONNECTED."""
    s = _schema()
    g = _Graph.of(model)
    index = {t.name.decode(errors="replace"): i for i, t in enumerate(g.sg.tensors)}
    out = {}
    for layer, value in layer_map.items():
        parts = []
        for name in lm.split(value):
            ti = index.get(name)
            tensor = g.sg.tensors[ti] if ti is not None else None
            if tensor is None or tensor.type not in (s.TensorType.INT8, s.TensorType.INT4):
                break
            n = int(np.prod(tensor.shape))
            data = model.buffers[tensor.buffer].data
            bits = 4 if tensor.type == s.TensorType.INT4 else 8
            q = _unpack4(data, n) if bits == 4 else np.frombuffer(bytes(data), dtype=np.int8)[:n].copy()
            held = _follow(g, ti, q.reshape(list(tensor.shape)))
            if held is None:
                break
            q, scale = _as_layer(held[0], _scales(model, tensor), held[1], (shapes or {}).get(layer))
            parts.append({"q": np.ascontiguousarray(q), "bits": bits, "op": held[1], "scale": scale})
        else:
            out[layer] = {"q": np.concatenate([p["q"] for p in parts]), "scale": np.concatenate([p["scale"] for p in parts]),
                          "bits": parts[0]["bits"], "op": parts[0]["op"], "pieces": len(parts)}
    return out


def expected_scale(lg, factor: float = 1.0) -> np.ndarray:
    """The flat scale a lowered layer stores: the grid's, times the converter's folded factor (if any)."""
    return (lg.scale.double().numpy().reshape(-1) * factor).astype(np.float32)


def compact_names(path: Path, layer_map: dict[str, str]) -> dict[str, str]:
    """Rename the tensors of the model at ``path`` (rewritten in place) to ``t<i>``, except the graph's inputs and
    outputs and the integer tensors the layer map names (``<layer>.weight.q``); returns the layer map with the new
    names. The converter names every tensor by its full module path: 0.40 MB of the demo U-Net's 7.75 MB fp32 file,
    a quarter of its W4 file. Nothing reads those names (signatures map their own names to tensor indices)."""
    model = read_model(path)
    keep = {n for v in layer_map.values() for n in lm.split(v) if n.endswith(Q_SUFFIX)}
    renamed: dict[str, str] = {}
    for k, sg in enumerate(model.subgraphs):
        io = set(sg.inputs) | set(sg.outputs)
        for i, t in enumerate(sg.tensors):
            old = t.name.decode(errors="replace") if t.name is not None else ""
            if i in io or old in keep:
                continue
            new = f"t{i}" if k == 0 else f"s{k}t{i}"
            if k == 0:
                renamed[old] = new
            t.name = new.encode()
    write_model_over(model, path)
    return {layer: lm.join(renamed.get(n, n) for n in lm.split(v)) for layer, v in layer_map.items()}


def check_held(path: Path, spec, layer_map: dict[str, str], layers, folded: dict[str, float], moved=(), after: str = "lowering") -> None:
    """Read the integers of ``layers`` back from the model at ``path`` through the layer map and check them against
    ``spec.grid``'s: the same integers, and the grid's scales (times the converter's ``folded`` constant, unless the
    layer's integer tensor is in ``moved``: its constant is applied to the op's input instead).

    Raises:
        ExportError: a layer does not hold the grid's integers and scales.
    """
    from pocketfusion.export.base import ExportError

    grid, module = spec.grid, spec.source_module
    back = read_integers(read_model(path), layer_map, {n: tuple(grid.layers[n].shape) for n in layers})
    ints = grid.integers(module)
    for layer in layers:
        got = back.get(layer)
        on_input = any(t in moved for t in lm.split(layer_map[layer]))
        want_scale = expected_scale(grid.layers[layer], 1.0 if on_input else folded.get(layer, 1.0))
        if got is None or not np.array_equal(got["q"], ints[layer].numpy()) or not np.array_equal(got["scale"], want_scale):
            raise ExportError(f"tflite: {spec.name}: layer {layer} does not hold the grid's integers after {after}")


def quantize(path: Path, spec) -> tuple[dict, dict[str, str]]:
    """Lower ``spec.grid`` into the converted model at ``path`` (rewritten in place), read the
    integers back through the layer map and check them; returns the manifest's ``quantization``
    entry and the layer map."""
    grid, module = spec.grid, spec.source_module
    notes: list[str] = []
    model, rep, layer_map = lower_weights(read_model(path), module, grid)
    write_model_over(model, path)
    del model
    check_held(path, spec, layer_map, rep["int8"] + rep["int4"], rep["folded"])
    if rep["folded"]:
        notes.append(
            f"{len(rep['folded'])} weights had a constant folded in by the converter (attention scale into to_q / to_k): "
            "same integers, scale multiplied by that constant"
        )
    if rep["columns"]:
        notes.append(
            f"{len(rep['columns'])} weights had a per-input-channel vector folded in by the converter (the preceding "
            "LayerNorm weight): same integers and scales, the vector applied to the op's input by a MUL (the weight stays "
            "a constant the XNNPACK delegate takes)"
        )
    if rep["split"]:
        notes.append(f"{len(rep['split'])} weights split by the converter along output rows (GEGLU projections): one int tensor per piece")
    if rep["grouped"]:
        notes.append(
            f"{rep['grouped']} {GROUPED_NOTE} as per-axis int4 rows (one row per output channel and group) "
            "+ DEQUANTIZE / RESHAPE / TRANSPOSE: LiteRT has no weight-only block-wise int4"
        )
    fallbacks = dict(rep["fallbacks"])
    acts = None
    said = []
    if fallbacks:
        said.append(f"{len(fallbacks)} grid layer(s) kept fp32 ("
                    + "; ".join(f"{k}: {v}" for k, v in list(fallbacks.items())[:3]) + (" ..." if len(fallbacks) > 3 else "") + ")")
    if grid.activations:
        why = ("activation quantization (w8a8 / w8a16) is not lowered to TFLite yet: weights only, fp32 activations "
               "(ai-edge-quantizer's static recipes restricted to CONV_2D / FULLY_CONNECTED run in LiteRT, but a first "
               "measurement on the tiny fixture gave rel_max 0.19 at a16 and 0.26 at a8)")
        acts = {"bits": None, "requested": grid.activations.get("bits"), "reason": why}
        notes.append(why)
        said.append(f"activations kept fp32 (scheme {grid.scheme})")
    if said:
        logger.warning("tflite: %s: %s", spec.name, "; ".join(said))
    info = {
        "scheme": grid.scheme, "method": grid.method,
        "format": "weight-only: INT8 / INT4 per-axis constants + DEQUANTIZE (fp32 compute)",
        "layers_int8": len(rep["int8"]), "layers_int4": len(rep["int4"]), "layers_float": len(fallbacks),
        "layers_grouped": rep["grouped"], "fallbacks": fallbacks, "activations": acts, "activation_bits": None,
        "scale_factors": dict(rep["folded"]), "split": rep["split"],  # exact floats: scale = grid scale * factor
        "verified": "integers and scales read back from the flatbuffer through the layer map equal the grid's", "notes": notes,
    }
    return info, layer_map
