"""Winograd 3x3 convolutions in the ONNX export: fewer multiplies for onnxruntime's largest convolutions.

A 3x3, stride-1 convolution computes ``m x m`` outputs of a tile from an ``(m + 2)^2`` input tile. Winograd's
minimal filtering F(m x m, 3 x 3) (Lavin & Gray, 2016) computes them with ``(m + 2)^2`` multiplies per input /
output channel pair instead of ``9 m^2``: 2.25x fewer for F(2, 3), 4x for F(4, 3). In ONNX it is a graph of
onnxruntime's own fast kernels, with nothing custom:

==================  ==========================================================================================
input transform     ``Conv`` with ``group = C``: each channel's ``(m+2)^2`` tiles (stride ``m``, pads
                    ``1, 1, m-1, m-1``) times the fixed ``B^T d B`` kernels -> ``(N, C, (m+2)^2, T^2)``
                    (``T = H / m``), ``Transpose`` -> ``(N, (m+2)^2, C, T^2)``
the products        ``MatMul(U, V)`` with ``U = G g G^T`` as ``((m+2)^2, O, C)``: ``(m+2)^2`` GEMMs of
                    ``(O x C) @ (C x T^2)`` -> ``(N, (m+2)^2, O, T^2)``
output transform    ``Transpose`` -> ``(N, O, (m+2)^2, T^2)``, ``MatMul`` by ``A^T ... A`` as ``(m^2, (m+2)^2)``,
                    ``DepthToSpace(m, CRD)`` -> ``(N, O, H, W)``, plus the bias
==================  ==========================================================================================

``U`` is computed in the graph from the convolution's own weight (one ``Einsum`` with ``G x G``), so the file keeps
the 3x3 weights (and a quantized graph its grid's integers, through its ``DequantizeLinear``): onnxruntime folds the
transform when the session loads (one ``Einsum`` a conv, so the load's peak holds one new tensor a conv: 8.7 GiB at
full size, against 19.3 GiB for a Reshape / MatMul / Transpose chain; 4.5 GiB direct). The cost is memory at run
time: ``U`` holds ``(m+2)^2 / 9`` times the weight's floats (4x for F(4, 3), 1.78x for F(2, 3)); the report gives
the bytes. The transforms' constants are exact in float64 and rounded once to float32: measured error of one
convolution against the direct one, relative to its largest output, about 1e-5 for F(4, 3) and 5e-7 for F(2, 3).

Whether it pays depends on the shape: at SD-1.5's full size (batch 2, 64^2 latents, 2 threads, onnxruntime 1.32 on
a 2-core AMD EPYC) F(4, 3) ran 1.6x the direct convolution at 64^2 x 320 channels and 2.2x at 32^2 x 640 and
16^2 x 1280, but 0.74x at 8^2 x 1280; at the demo U-Net's 8^2 latents and 48-96 channels every form is slower.
So ``auto`` measures each distinct convolution shape at export (``measure``: one graph per form, the same
subgraph the export writes, timed round robin in onnxruntime) and rewrites a shape only where a Winograd form
was at least ``MIN_SPEEDUP`` times as fast as the direct convolution.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np

MIN_SPEEDUP = 1.1  # a Winograd form replaces a convolution only this much faster (measured), to stay clear of noise
TILES = (4, 2)  # the output tile sizes offered, F(4, 3) first
MEASURE_BUDGET_S = 30.0  # about this long per shape at most (a full-size convolution takes ~0.1 s a call)


def _matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``B^T``, ``G``, ``A^T`` of F(m, 3) (Lavin & Gray, interpolation points 0, +-1, [+-2,] inf), float64."""
    if m == 2:
        bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
        g = [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]
        at = [[1, 1, 1, 0], [0, 1, -1, -1]]
    elif m == 4:
        bt = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
              [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
        g = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
             [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
        at = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    else:
        raise ValueError(f"no Winograd F({m}, 3) here (have {TILES})")
    return np.array(bt, np.float64), np.array(g, np.float64), np.array(at, np.float64)


def constants(m: int) -> dict[str, np.ndarray]:
    """The fixed float32 tensors of F(m, 3): the input-transform kernels ``bk`` ``(a^2, 1, a, a)``, the weight
    transform ``gt`` ``(a^2, 3, 3)`` (``U[k] = sum_rs gt[k, r, s] g[r, s]``) and the output transform ``ax`` ``(m^2, a^2)``."""
    bt, g, at = _matrices(m)
    a = m + 2
    bk = np.einsum("ir,jq->ijrq", bt, bt).reshape(a * a, 1, a, a)
    gt = np.einsum("ir,jq->ijrq", g, g).reshape(a * a, 3, 3)
    ax = np.einsum("ik,jl->ijkl", at, at).reshape(m * m, a * a)
    return {"bk": bk.astype(np.float32), "gt": gt.astype(np.float32), "ax": ax.astype(np.float32)}


@dataclass(frozen=True)
class Candidate:
    """A convolution the rewrite can take: its node, input shape ``(N, C, H, W)`` and weight shape ``(O, C, 3, 3)``."""

    index: int  # the node's position in the graph
    node: object  # onnx.NodeProto
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]

    @property
    def key(self) -> tuple[int, ...]:
        return (*self.x_shape, self.w_shape[0])


def tiles_for(x_shape: tuple[int, ...]) -> list[int]:
    """The tile sizes F(m, 3) that fit an input of ``x_shape``: ``m`` divides H and W, at least 2 tiles a side."""
    h, w = x_shape[2], x_shape[3]
    return [m for m in TILES if h % m == 0 and w % m == 0 and min(h, w) // m >= 2]


def _attr(node, name, default):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _shapes(model) -> dict[str, tuple[int, ...]]:
    """Static shapes of the graph's tensors by onnx's shape inference (with data propagation: shapes computed in the
    graph count), run on a copy without the weights' data (small initializers, such as shapes, keep theirs). onnx does
    not know onnxruntime's ``MultiHeadAttention``: for the inference only it stands as ``Identity`` of its query
    (same shape: a diffusers attention's value width is its query's)."""
    import onnx
    from onnx import helper

    g = model.graph
    nodes = []
    for n in g.node:
        if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft":
            nodes.append(helper.make_node("Identity", [n.input[0]], [n.output[0]]))
        else:
            nodes.append(n)
    small = [t for t in g.initializer if int(np.prod(t.dims)) <= 64]  # shapes, axes, scalars: their values count
    kept = {t.name for t in small}
    inits = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer if t.name not in kept]
    light = helper.make_graph(nodes, "shapes", list(g.input) + inits, list(g.output), small)
    lm = helper.make_model(light, opset_imports=[o for o in model.opset_import if o.domain in ("", "ai.onnx")],
                           ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(lm, data_prop=True)
    out = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[v.name] = tuple(d.dim_value for d in dims)
    return out


def candidates(model) -> list[Candidate]:
    """Every float 3x3 convolution the rewrite can express: stride 1, dilation 1, one group, pads 1, a constant
    weight (an initializer, or a ``DequantizeLinear`` of initializers), static shapes and a tile size that fits."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    shapes = None
    out = []
    for i, n in enumerate(g.node):
        if n.op_type != "Conv" or n.domain not in ("", "ai.onnx"):
            continue
        if (list(_attr(n, "strides", [1, 1])) != [1, 1] or list(_attr(n, "dilations", [1, 1])) != [1, 1]
                or _attr(n, "group", 1) != 1 or list(_attr(n, "pads", [0, 0, 0, 0])) != [1, 1, 1, 1]
                or _attr(n, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            continue
        w = n.input[1]
        if w in inits:
            w_shape = tuple(inits[w].dims)
        elif w in producer and producer[w].op_type == "DequantizeLinear" and all(i in inits for i in producer[w].input if i):
            w_shape = tuple(inits[producer[w].input[0]].dims)
        else:
            continue
        if len(w_shape) != 4 or w_shape[2:] != (3, 3):
            continue
        if shapes is None:
            shapes = _shapes(model)
        x_shape = shapes.get(n.input[0])
        if x_shape is None or len(x_shape) != 4 or not tiles_for(x_shape):
            continue
        out.append(Candidate(i, n, x_shape, w_shape))
    return out


def subgraph(node, x_shape: tuple[int, ...], w_shape: tuple[int, ...], m: int, prefix: str, shared: dict[str, str]):
    """The nodes and new initializers that compute ``node`` (a candidate conv) as F(m, 3). ``shared`` maps a
    constant's key to the name of an initializer already made (the transforms are the same for every conv of a
    tile size), and is updated. Returns ``(nodes, initializers)``."""
    from onnx import helper, numpy_helper

    n, c, h, w = x_shape
    o = w_shape[0]
    a = m + 2
    t = h // m
    u = w // m
    consts = constants(m)
    inits = []

    def const(key: str, value: np.ndarray) -> str:
        if key not in shared:
            shared[key] = f"winograd.{key}"
            inits.append(numpy_helper.from_array(value, shared[key]))
        return shared[key]

    def name(s: str) -> str:
        return f"{prefix}/{s}"

    bk = const(f"F{m}.bk", consts["bk"])
    gt = const(f"F{m}.gt", consts["gt"])
    ax = const(f"F{m}.ax", consts["ax"])
    reps = const(f"F{m}.repeat{c}", np.array([c, 1, 1, 1], np.int64))
    nodes = [
        helper.make_node("Tile", [bk, reps], [name("bk")]),
        helper.make_node("Conv", [node.input[0], name("bk")], [name("tiles")], group=c, kernel_shape=[a, a],
                         pads=[1, 1, m - 1, m - 1], strides=[m, m]),
        helper.make_node("Reshape", [name("tiles"), const(f"shape.{n}.{c}.{a * a}.{t * u}",
                                                          np.array([n, c, a * a, t * u], np.int64))], [name("tiles4")]),
        helper.make_node("Transpose", [name("tiles4")], [name("v")], perm=[0, 2, 1, 3]),
        # U = G g G^T from the conv's own weight, one Einsum (folded when the session loads: one new tensor a conv)
        helper.make_node("Einsum", [gt, node.input[1]], [name("u")], equation="kab,ocab->koc"),
        helper.make_node("MatMul", [name("u"), name("v")], [name("products")]),
        helper.make_node("Transpose", [name("products")], [name("products_o")], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", [ax, name("products_o")], [name("out_tiles")]),
        helper.make_node("Reshape", [name("out_tiles"), const(f"shape.{n}.{o * m * m}.{t}.{u}",
                                                              np.array([n, o * m * m, t, u], np.int64))],
                         [name("out_d2s")]),
    ]
    y = node.output[0]
    if len(node.input) > 2 and node.input[2]:
        nodes.append(helper.make_node("DepthToSpace", [name("out_d2s")], [name("out")], blocksize=m, mode="CRD"))
        nodes.append(helper.make_node("Reshape", [node.input[2], const(f"shape.1.{o}.1.1", np.array([1, o, 1, 1], np.int64))],
                                      [name("bias")]))
        nodes.append(helper.make_node("Add", [name("out"), name("bias")], [y]))
    else:
        nodes.append(helper.make_node("DepthToSpace", [name("out_d2s")], [y], blocksize=m, mode="CRD"))
    return nodes, inits


def _single(x_shape, w_shape, m: int | None, seed: int = 0):
    """A one-convolution model of this shape (random weights): the direct ``Conv`` (``m`` None) or its F(m, 3) form."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal(w_shape) * 0.05).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(w_shape[0]).astype(np.float32), "b")
    y_shape = (x_shape[0], w_shape[0], x_shape[2], x_shape[3])
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes, inits = ([conv], []) if m is None else subgraph(conv, x_shape, w_shape, m, "wg", {})
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))], [w, b, *inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _session(model, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def measure(x_shape, w_shape, *, threads: int = 1, rounds: int = 3, runs: int = 3,
            budget_s: float = MEASURE_BUDGET_S) -> dict:
    """Per-call ms of the direct convolution and of each F(m, 3) that fits, one graph each (random weights), timed
    round robin in onnxruntime; and each form's largest output difference, relative to the direct one's largest
    output. A first call of each sizes the timing to about ``budget_s`` (at least 2 rounds of one call)."""
    forms = {"direct": None, **{f"F({m},3)": m for m in tiles_for(x_shape)}}
    sessions = {k: _session(_single(x_shape, w_shape, m), threads) for k, m in forms.items()}
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    outs, every = {}, 0.0
    for k, s in sessions.items():
        t0 = time.perf_counter()
        outs[k] = s.run(None, {"x": x})[0]
        every += time.perf_counter() - t0
    calls = int(budget_s / max(every, 1e-9))
    if rounds * runs > calls:
        rounds, runs = max(2, calls), 1
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(runs):
                t0 = time.perf_counter()
                s.run(None, {"x": x})
                samples[k].append((time.perf_counter() - t0) * 1e3)
    scale = float(np.abs(outs["direct"]).max()) or 1.0
    return {k: {"median_ms": round(float(np.median(v)), 4),
                "rel_err_vs_direct": float(np.abs(outs[k] - outs["direct"]).max() / scale)} for k, v in samples.items()}


def choose(x_shape, w_shape, mode: str, *, threads: int = 1) -> tuple[int | None, dict]:
    """The tile size for one convolution shape: ``on`` the largest that fits (nothing measured), ``auto`` the
    fastest measured form if at least ``MIN_SPEEDUP`` x the direct one's speed, else none (direct)."""
    fits = tiles_for(x_shape)
    if mode == "on":
        return (fits[0] if fits else None), {"why": "forced (--winograd on)"}
    ms = measure(x_shape, w_shape, threads=threads)
    best = min(ms, key=lambda k: ms[k]["median_ms"])
    speedup = ms["direct"]["median_ms"] / ms[best]["median_ms"]
    if best == "direct" or speedup < MIN_SPEEDUP:
        return None, {"measured": ms, "why": "direct the fastest" if best == "direct"
                      else f"{best} only {speedup:.2f}x the direct speed (< {MIN_SPEEDUP})"}
    return int(best[2]), {"measured": ms, "why": f"{best} {speedup:.2f}x the direct speed"}


def rewrite(model, mode: str = "auto", *, threads: int = 1) -> dict:
    """Replace ``model``'s candidate convolutions (in place) by their Winograd form where ``mode`` says so
    (``auto``: measured per distinct shape, ``on``: every candidate, ``off``: none). Returns the manifest's
    record: ``mode``, the convolutions rewritten by tile size, per shape the choice and its figures, and the
    weight bytes the rewritten convolutions hold at run time before / after (``U`` against the 3x3 weights)."""
    report: dict = {"mode": mode, "convs": 0, "rewritten": {}, "shapes": [],
                    "runtime_weight_bytes": {"direct": 0, "winograd": 0}}
    if mode == "off":
        return report
    cands = candidates(model)
    by_shape: dict[tuple, list[Candidate]] = {}
    for cand in cands:
        by_shape.setdefault(cand.key, []).append(cand)
    g = model.graph
    shared: dict[str, str] = {}
    replace: dict[int, list] = {}
    new_inits = []
    for key, group in by_shape.items():
        x_shape, w_shape = group[0].x_shape, group[0].w_shape
        m, rec = choose(x_shape, w_shape, mode, threads=threads)
        report["shapes"].append({"input": list(x_shape), "weight": list(w_shape), "convs": len(group),
                                 "chosen": f"F({m},3)" if m else "direct", **rec})
        if m is None:
            continue
        for cand in group:
            nodes, inits = subgraph(cand.node, x_shape, w_shape, m, f"/winograd{cand.index}", shared)
            replace[cand.index] = nodes
            new_inits += inits
            _tally(report, "runtime_weight_bytes", m, 4 * int(np.prod(w_shape)))
    if replace:
        kept = []
        for i, nd in enumerate(g.node):
            kept.extend(replace.get(i, [nd]))
        del g.node[:]
        g.node.extend(kept)
        g.initializer.extend(new_inits)
    return report


def _tally(report: dict, bytes_key: str, m: int, weight_bytes: int) -> None:
    """Count one convolution rewritten as F(m, 3) in ``report``: by tile size, in ``convs``, and its weight's bytes
    direct / as ``U`` (``(m+2)^2`` values for every 9) under ``bytes_key``."""
    key = f"F({m},3)"
    report["rewritten"][key] = report["rewritten"].get(key, 0) + 1
    report["convs"] += 1
    report[bytes_key]["direct"] += weight_bytes
    report[bytes_key]["winograd"] += weight_bytes // 9 * (m + 2) ** 2


# --- the XNNPACK targets (ExecuTorch, TFLite): the same transform as a module rewrite before lowering -----------------
#
# Neither runtime folds constants when a program loads, so there ``U`` is computed here (float64, rounded once) and
# stored in the file in place of the 3x3 weight: the file grows by ``(m+2)^2 / 9 - 1`` of the rewritten weights
# (3x for F(4, 3)). ``auto`` therefore takes only the shapes where XNNPACK gains most for the least weight: maps of
# at least ``XNNPACK_MIN_SIDE`` a side and at least ``XNNPACK_MIN_CHANNELS`` channels in and out (SD-1.5 at full size:
# its 64^2 and 32^2 levels, 79 M of its 522 M 3x3 weights, about 2/3 of its convolution time). Measured on one
# 64^2 x 320 convolution, batch 2, 2 threads, 2-core AMD EPYC: ExecuTorch 1.54x, LiteRT 1.80x the direct
# convolution's speed, in the NCHW graph below (bmm over the tile positions, no broadcast: a broadcast batch put
# ``expand_copy`` outside the ExecuTorch delegate).
XNNPACK_MIN_SIDE = 32
XNNPACK_MIN_CHANNELS = 128


def xnnpack_tile(conv, x_shape: tuple[int, ...], mode: str) -> int | None:
    """The tile size for one ``nn.Conv2d`` on an input of ``x_shape`` in an XNNPACK export (None: keep it)."""
    from torch import nn

    if (mode == "off" or type(conv) is not nn.Conv2d or conv.kernel_size != (3, 3) or conv.stride != (1, 1)
            or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding != (1, 1) or conv.padding_mode != "zeros"
            or len(x_shape) != 4):
        return None
    fits = tiles_for(x_shape)
    if mode == "on":
        return fits[0] if fits else None
    big = min(x_shape[2:]) >= XNNPACK_MIN_SIDE and min(conv.in_channels, conv.out_channels) >= XNNPACK_MIN_CHANNELS
    return 4 if big and 4 in fits else None


def _torch_module():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class WinogradConv2d(nn.Module):
        """``nn.Conv2d`` (3x3, stride 1, pad 1) as F(m, 3) in ops XNNPACK runs: a grouped strided conv (the input
        transform), one ``bmm`` over the ``(m+2)^2`` tile positions, one ``bmm`` by the output transform, a pixel
        interleave. ``U`` is a buffer computed from the conv's weight in float64."""

        def __init__(self, conv: nn.Conv2d, m: int):
            super().__init__()
            c = constants(m)
            _, g, _ = _matrices(m)
            a = m + 2
            w = conv.weight.detach().double()
            u = np.einsum("ir,ocrs,js->ijoc", g, w.cpu().numpy(), g).reshape(a * a, w.shape[0], w.shape[1])
            dtype = conv.weight.dtype
            self.m, self.a = m, a
            self.register_buffer("u", torch.from_numpy(u).to(dtype))
            self.register_buffer("bk", torch.from_numpy(c["bk"]).to(dtype).repeat(conv.in_channels, 1, 1, 1))
            self.register_buffer("ax", torch.from_numpy(c["ax"]).to(dtype)[None])
            self.bias = conv.bias

        def forward(self, x):
            n, c, h, w = x.shape
            m, a = self.m, self.a
            t, s = h // m, w // m
            v = F.conv2d(F.pad(x, (1, m - 1, 1, m - 1)), self.bk, stride=m, groups=c)  # n, c*a*a, t, s
            v = v.reshape(n, c, a * a, t * s).permute(2, 1, 0, 3).reshape(a * a, c, n * t * s)
            p = torch.bmm(self.u, v)  # a*a, o, n*t*s
            o = p.shape[1]
            y = torch.bmm(self.ax, p.reshape(1, a * a, o * n * t * s))  # 1, m*m, o*n*t*s
            y = y.reshape(m, m, o, n, t, s).permute(3, 2, 4, 0, 5, 1).reshape(n, o, h, w)
            return y if self.bias is None else y + self.bias.reshape(1, o, 1, 1)

    return WinogradConv2d


def plan_xnnpack(module, example_args, mode: str) -> dict[str, int]:
    """``{conv name: tile size}`` for ``module``'s 3x3 convolutions in an XNNPACK export (``xnnpack_tile``), their
    input shapes taken from one forward pass on ``example_args``."""
    import torch
    from torch import nn

    if mode == "off":
        return {}
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name):
        def hook(mod, args) -> None:  # a pre-hook that returned a value would replace the conv's inputs
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    hooks = [sub.register_forward_pre_hook(record(name)) for name, sub in module.named_modules() if type(sub) is nn.Conv2d]
    try:
        with torch.no_grad():
            module(*example_args)
    finally:
        for h in hooks:
            h.remove()
    plan = {name: xnnpack_tile(module.get_submodule(name), x_shape, mode) for name, x_shape in shapes.items()}
    return {k: m for k, m in plan.items() if m}


def apply_xnnpack_(module, example_args, mode: str) -> dict:
    """Replace ``module``'s planned 3x3 convolutions (``plan_xnnpack``) by ``WinogradConv2d``, in place. Returns the
    manifest's record: ``mode``, the convs rewritten by tile size, and those convs' weight bytes in the file before
    and after; under ``originals`` (not JSON: pop it) the replaced modules by name."""
    from pocketfusion.export.rewrites import _swap

    report: dict = {"mode": mode, "convs": 0, "rewritten": {}, "weight_bytes": {"direct": 0, "winograd": 0}}
    originals = {}
    plan = plan_xnnpack(module, example_args, mode)
    cls = _torch_module() if plan else None
    for name, m in plan.items():
        conv = originals[name] = module.get_submodule(name)
        _swap(module, name, cls(conv, m))
        _tally(report, "weight_bytes", m, conv.weight.numel() * conv.weight.element_size())
    report["originals"] = originals
    return report


@contextlib.contextmanager
def xnnpack_swapped(module, example_args, mode: str):
    """``apply_xnnpack_`` on ``module`` for the block (no copy of the weights), the original convolutions put back
    after; yields the report."""
    from pocketfusion.export.rewrites import _swap

    report = apply_xnnpack_(module, example_args, mode)
    originals = report.pop("originals")
    try:
        yield report
    finally:
        for name, conv in originals.items():
            _swap(module, name, conv)


def rewrite_line(report: dict, what: str) -> str | None:
    """The manifest's one-line summary of a Winograd report (None when nothing was rewritten)."""
    if not report or not report.get("convs"):
        return None
    b = report.get("runtime_weight_bytes") or report["weight_bytes"]
    return (f"winograd: {report['convs']} 3x3 convolutions as "
            + ", ".join(f"{k} x{v}" for k, v in sorted(report["rewritten"].items()))
            + f" ({report['mode']}; export.winograd): their weights take {b['winograd'] / 1e6:.1f} MB {what} "
            f"against {b['direct'] / 1e6:.1f} MB")
