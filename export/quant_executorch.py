"""A quantization grid (``compress.quant.grid``) lowered into XNNPACK's quantized kernels for ExecuTorch.

What XNNPACK (ExecuTorch 1.5.1) can hold, and what each grid layer becomes:

=============================  ==================================================================
grid layer                     in the ``.pte``
=============================  ==================================================================
8-bit, per output channel      int8 per-channel weights (``qc8w``), PT2E ``XNNPACKQuantizer``;
                               the grid's integers and scales, bit for bit
4-bit linear, groups of 32k    int4 group-wise weights (``qb4w``) built from the grid's integers
                               (torchao ``IntxUnpackedToInt8Tensor``); XNNPACK stores the group
                               scales in **bf16**: the grid's group scales are exact in bf16
                               (``grid.storable_scale``), so the weight is the on-grid one
4-bit linear, other groups     XNNPACK needs groups that are a multiple of 32: the 4-bit integers
/ per channel                  stored as int8 per channel when the grid is per channel (the same
                               integers and scale), else re-quantized to int8 per channel
4-bit conv, per channel        no 4-bit convolution in XNNPACK: the same integers and scale held
                               as int8 per channel (``q4`` in [-7, 7] is a valid int8 integer)
4-bit conv, group-wise         no group-wise convolution in XNNPACK: re-quantized to int8 per
                               output channel from the on-grid weights (integers differ from the
                               grid's; the weight error is at most half an int8 step)
=============================  ==================================================================

Activations: XNNPACK's int8-weight kernels need int8 activations. Weight-only schemes (w8, w4)
and every layer whose grid keeps 16-bit or float activations run with *dynamic* int8 activations
(per token, computed at run time: ``qd8`` kernels); layers the grid gives 8-bit activations
(w8a8) are quantized statically from the calibration feeds (``HistogramObserver``). XNNPACK has
no 16-bit activations, so w8a16 lowers as w8 with dynamic int8 activations.

The 8-bit integers are not left to an observer: after ``convert_pt2e`` every quantized weight
constant and its scale are pinned to the grid's (the observer's own result is recorded, see
``observer_matched``), so the ``.pte`` holds exactly ``grid.integers(module)``.

The layer map: XNNPACK stores every constant in the program's named data under the SHA-256 of its
bytes. While lowering, the bytes each layer's integers take in XNNPACK's layout (NHWC
convolutions, packed nibbles for int4) are known, so their key is recorded (``layer_map``);
``pte_readback`` reads every layer's bytes back through it, decodes them into integers and compares
them with the grid's, and checks that the scales are there.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

GROUP_MULTIPLE = 32  # XNNPACK's qb4w group size must be a multiple of this
_INT8_QMAX = 127

# storage kinds
INT8_CHANNEL = "int8-channel"  # the grid's integers as int8 per channel (8-bit grid, or 4-bit per-channel grid)
INT4_GROUP = "int4-group"  # qb4w: the grid's 4-bit integers, group-wise
INT8_REQUANT = "int8-channel-requant"  # re-quantized to int8 per channel (integers differ from the grid)

DYNAMIC = "dynamic-int8"
STATIC = "static-int8"


@dataclass
class LayerPlan:
    """How one grid layer is held in the ``.pte``."""

    name: str
    kind: str
    bits: int  # the grid's weight bits
    group_size: int | None
    storage: str  # INT8_CHANNEL | INT4_GROUP | INT8_REQUANT
    activations: str  # DYNAMIC | STATIC
    exact: bool  # integers in the .pte == the grid's
    reason: str = ""  # why the storage / activations differ from the grid's scheme

    @property
    def stored_bits(self) -> int:
        return 4 if self.storage == INT4_GROUP else 8


def _activation_bits(grid, name: str):
    acts = grid.activations or {}
    if not acts:
        return None
    layers = acts.get("layers", {}) or {}
    if name in layers:
        return layers[name].get("bits")
    return acts.get("bits")


def plan(grid, *, have_calibration: bool) -> dict[str, LayerPlan]:
    """The storage and activation quantization of every grid layer (see the module table)."""
    plans = {}
    for name, g in grid.layers.items():
        reason = []
        if g.bits == 8:
            storage, exact = INT8_CHANNEL, True
        elif g.kind == "linear" and g.group_size is not None and g.group_size % GROUP_MULTIPLE == 0:
            storage, exact = INT4_GROUP, True
        elif g.group_size is None:
            storage, exact = INT8_CHANNEL, True
            reason.append(f"4-bit {g.kind} held as int8 per channel with the same integers and scale "
                          + ("(XNNPACK has no 4-bit convolution)" if g.kind == "conv" else
                             f"(XNNPACK 4-bit linear needs groups that are a multiple of {GROUP_MULTIPLE})"))
        else:
            storage, exact = INT8_REQUANT, False
            reason.append(f"4-bit {g.kind} in groups of {g.group_size} re-quantized to int8 per channel "
                          + ("(XNNPACK has no 4-bit or group-wise convolution)" if g.kind == "conv" else
                             f"(XNNPACK 4-bit groups must be a multiple of {GROUP_MULTIPLE})"))
        abits = _activation_bits(grid, name)
        if abits == 8 and have_calibration:
            acts = STATIC
        else:
            acts = DYNAMIC
            if abits == 8:
                reason.append("8-bit activations wanted, no calibration feeds (or executorch_activations=dynamic): dynamic int8")
            elif abits == 16:
                reason.append("16-bit activations wanted: XNNPACK has none, dynamic int8 activations")
            elif grid.activations and abits is None:
                reason.append("float activations kept by calibration: XNNPACK int8 weights need int8 activations, dynamic int8")
        plans[name] = LayerPlan(name, g.kind, g.bits, g.group_size, storage, acts, exact, "; ".join(reason))
    return plans


def target_integers(grid, module, plans: dict[str, LayerPlan]) -> tuple[dict, dict]:
    """``(integers, scales)`` the ``.pte`` must hold per layer: the grid's, or the int8 re-quantization."""
    import torch

    ints = grid.integers(module)
    mods = dict(module.named_modules())
    out_q, out_s = {}, {}
    for name, p in plans.items():
        g = grid.layers[name]
        if p.storage == INT8_REQUANT:
            w = mods[name].weight.detach().float()
            amax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
            s = torch.where(amax > 0, amax / _INT8_QMAX, torch.ones_like(amax))
            q = torch.clamp(torch.round(w / s.reshape(-1, *([1] * (w.dim() - 1)))), -_INT8_QMAX, _INT8_QMAX).to(torch.int8)
            out_q[name], out_s[name] = q, s
        else:
            out_q[name], out_s[name] = ints[name], g.scale.float()
    return out_q, out_s


def apply_int4_linears_(root, plans: dict[str, LayerPlan], ints: dict, scales: dict, prefix: str) -> int:
    """Give every ``INT4_GROUP`` linear of ``root`` a torchao int4 weight made of the grid's integers.

    ``root`` must be a structural copy (its modules are replaced, not the caller's). Uses
    ``IntxUnpackedToInt8Tensor`` (int8-held int4 data, group scales, zero point 0, dynamic int8
    per-token activations): what ``torch.export`` turns into the ``dequantize_affine`` pattern the
    XNNPACK partitioner lowers to ``qd8-f32-qb4w``. The integers are given, not recomputed (torchao's
    own symmetric mapping would use ``amax / 7.5`` on [-8, 7] and change them)."""
    import torch
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    mods = dict(root.named_modules())
    n = 0
    for name, p in plans.items():
        if p.storage != INT4_GROUP:
            continue
        lin = mods[prefix + name]
        q = ints[name]
        s = scales[name].reshape(q.shape[0], -1).float()
        t = IntxUnpackedToInt8Tensor(q.contiguous(), s.contiguous(), torch.zeros_like(s, dtype=torch.int8), torch.int4,
                                     (1, p.group_size), torch.float32, "int8_asym_per_token")
        lin.weight = torch.nn.Parameter(t, requires_grad=False)
        n += 1
    return n


def _quantization_config(static: bool):
    """XNNPACK's symmetric per-channel int8 config, with an observer eps small enough for any grid scale.

    The stock config clamps scales at ``2**-12``; a channel whose ``max|w| < 127 * 2**-12`` would get
    other integers. The weights are pinned to the grid afterwards anyway; the small eps only makes
    the recorded ``observer_matched`` figure meaningful."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e import PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec

    base = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=not static)
    w = base.weight
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-_INT8_QMAX, quant_max=_INT8_QMAX, qscheme=torch.per_channel_symmetric, ch_axis=0,
        is_dynamic=False, observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(eps=torch.finfo(torch.float32).tiny),
    )
    assert w.quant_min == -_INT8_QMAX and w.quant_max == _INT8_QMAX  # XNNPACK's restricted weight range
    return QuantizationConfig(base.input_activation, base.output_activation, weight, base.bias, base.is_qat)


def _layer_of(node, names: set[str]) -> str | None:
    for path, _ in reversed(list(node.meta.get("nn_module_stack", {}).values())):
        if path.startswith("L['self']."):
            path = path[len("L['self']."):]
        if path in names:
            return path
    return None


def _quantizer(plans: dict[str, LayerPlan], prefix: str):
    """An ``XNNPACKQuantizer`` that annotates exactly the grid's int8-held layers, each with its activation mode.

    The stock module-name filter also tests a conv's weight and bias nodes, which carry no module
    stack, so convolutions would never match; here non-op nodes pass and ops must sit in a grid
    layer (a leaf ``Linear`` / ``Conv2d``), which also keeps the rewrites' own transposed
    convolutions (nearest upsampling) float."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

    groups: dict[str, set[str]] = {DYNAMIC: set(), STATIC: set()}
    for name, p in plans.items():
        if p.storage != INT4_GROUP:
            groups[p.activations].add(prefix + name)

    class GridQuantizer(XNNPACKQuantizer):
        def _annotate_for_quantization_config(self, model):
            for mode, names in groups.items():
                if not names:
                    continue

                def keep(n, names=names):
                    return n.op != "call_function" or _layer_of(n, names) is not None

                self._annotate_all_patterns(model, _quantization_config(mode == STATIC), keep)
            return model

    return GridQuantizer()


def quantize_pt2e(exported_program, plans: dict[str, LayerPlan], ints: dict, scales: dict, example_args, calibration: list,
                  prefix: str):
    """PT2E-quantize the int8-held layers of ``exported_program`` and pin their constants to the grid.

    Returns ``(converted GraphModule, readback)`` where readback maps each layer to
    ``{"observer_matched": bool, "pinned": True}``. Raises ``RuntimeError`` when a planned layer got
    no quantized weight (the annotation missed it)."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    gm = exported_program.module()
    prepared = prepare_pt2e(gm, _quantizer(plans, prefix))
    with torch.no_grad():
        prepared(*example_args)
        for feed in calibration:
            prepared(*feed)
    converted = convert_pt2e(prepared)
    names = {prefix + n: n for n, p in plans.items() if p.storage != INT4_GROUP}
    readback: dict[str, dict] = {}
    for node in converted.graph.nodes:
        if node.op != "call_function" or "dequantize_per_channel" not in str(node.target):
            continue
        users = [u for u in node.users if u.op == "call_function"]
        layer = next((_layer_of(u, set(names)) for u in users if _layer_of(u, set(names))), None)
        if layer is None:
            continue
        name = names[layer]
        qnode, snode = node.args[0], node.args[1]
        held = getattr(converted, qnode.target)
        want_q, want_s = ints[name].to(torch.int8), scales[name].float().reshape(-1)
        matched = bool(held.shape == want_q.shape and torch.equal(held, want_q))
        setattr(converted, qnode.target, want_q.clone())
        setattr(converted, snode.target, want_s.clone())
        readback[name] = {"observer_matched": matched, "pinned": True}
    missing = sorted(set(names.values()) - set(readback))
    if missing:
        raise RuntimeError(f"XNNPACK quantizer left {len(missing)} grid layers unquantized: {', '.join(missing[:5])}")
    converted.recompile()
    return converted, readback


def _expected_weight_bytes(p: LayerPlan, q) -> bytes:
    """The bytes XNNPACK serialises for a layer's quantized weight (``node_visitor.define_tensor``)."""
    import torch

    if p.storage == INT4_GROUP:
        u = (q.to(torch.int16) + 8).to(torch.uint8).contiguous().view(-1)  # two's nibble + zero point 8, low nibble first
        packed = (u[1::2] << 4) | u[::2]
        return packed.numpy().tobytes()
    if q.dim() == 4:  # conv weights go NHWC: (O, kh, kw, I)
        return q.permute(0, 2, 3, 1).contiguous().numpy().tobytes()
    return q.contiguous().numpy().tobytes()


def _expected_scale_bytes(p: LayerPlan, s) -> bytes:
    import torch

    if p.storage == INT4_GROUP:
        return s.reshape(s.shape[0], -1).to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return s.float().reshape(-1).contiguous().numpy().tobytes()


def layer_map(plans: dict[str, LayerPlan], ints: dict) -> dict[str, str]:
    """Layer -> the named-data key (SHA-256) of the bytes its integers take in the ``.pte``."""
    return {name: hashlib.sha256(_expected_weight_bytes(p, ints[name])).hexdigest() for name, p in plans.items()}


def _fp32_weight_key(w) -> str:
    """The named-data key of a float weight: its fp32 bytes, convolutions NHWC."""
    w = w.detach().float()
    if w.dim() == 4:
        w = w.permute(0, 2, 3, 1)
    return hashlib.sha256(w.contiguous().numpy().tobytes()).hexdigest()


def _named_data(pte_path: str | Path) -> dict[str, bytes]:
    """``{key: bytes}`` of a written program's named data."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    nd = deserialize_pte_binary(Path(pte_path).read_bytes()).named_data
    if nd is None:
        return {}
    return {k: bytes(nd.buffers[e.buffer_index]) for k, e in nd.pte_data.items()}


def weight_map(pte_path: str | Path, module, layers) -> dict[str, str]:
    """The layer map of a float program: each of ``layers`` whose fp32 weight XNNPACK holds -> its key."""
    keys = set(_named_data(pte_path))
    mods = dict(module.named_modules())
    found = {n: _fp32_weight_key(mods[n].weight) for n in layers}
    return {n: k for n, k in found.items() if k in keys}


def _decode(p: LayerPlan, data: bytes, shape: tuple[int, ...]):
    """Integers (torch layout, int8) from a layer's bytes in the ``.pte`` (inverse of ``_expected_weight_bytes``)."""
    import numpy as np
    import torch

    b = np.frombuffer(data, dtype=np.uint8)
    if p.storage == INT4_GROUP:
        u = np.empty(2 * len(b), dtype=np.int16)
        u[0::2], u[1::2] = b & 0xF, b >> 4  # low nibble first, zero point 8
        return torch.from_numpy((u[: int(np.prod(shape))] - 8).astype(np.int8).reshape(shape))
    q = torch.from_numpy(b.view(np.int8).copy())
    if len(shape) == 4:  # stored NHWC: (O, kh, kw, I)
        o, i, kh, kw = shape
        return q.reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous()
    return q.reshape(shape)


def pte_readback(pte_path: str | Path, plans: dict[str, LayerPlan], ints: dict, scales: dict, layer_map: dict[str, str]) -> dict:
    """Read every layer's integers back from the written ``.pte`` through the layer map and compare
    them with the planned ones, bit for bit; check that each layer's scales are there too (XNNPACK
    keys them ``scale_<SHA-256 of their bytes>``).

    Returns ``{"layers_checked", "weights_found", "integers_equal", "scales_found", "missing": [...],
    "bytes_int8", "bytes_int4"}``."""
    import torch

    data = _named_data(pte_path)
    found_w = equal = found_s = 0
    missing = []
    size = Counter()
    for name, p in plans.items():
        raw = data.get(layer_map.get(name, ""))
        w_ok = raw is not None
        same = w_ok and bool(torch.equal(_decode(p, raw, tuple(ints[name].shape)), ints[name].to(torch.int8)))
        s_ok = ("scale_" + hashlib.sha256(_expected_scale_bytes(p, scales[name])).hexdigest()) in data
        found_w += w_ok
        equal += same
        found_s += s_ok
        size["bytes_int4" if p.storage == INT4_GROUP else "bytes_int8"] += len(raw) if w_ok else 0
        if not (same and s_ok):
            what = [w for w, ok in (("weight", w_ok), ("integers", same or not w_ok), ("scale", s_ok)) if not ok]
            missing.append(f"{name} ({' '.join(what)})")
    return {"layers_checked": len(plans), "weights_found": found_w, "integers_equal": equal, "scales_found": found_s,
            "missing": missing, **size}


def summary(grid, plans: dict[str, LayerPlan], n_float: int = 0) -> dict:
    """The manifest's ``quantization`` block for an ExecuTorch export."""
    fallbacks = {n: p.reason for n, p in plans.items() if p.reason}
    acts = Counter(p.activations for p in plans.values())
    notes = []
    kinds = Counter(p.storage for p in plans.values())
    if kinds[INT8_CHANNEL] and any(p.bits == 4 for p in plans.values() if p.storage == INT8_CHANNEL):
        notes.append("4-bit per-channel layers are held as int8 with the same integers and scales (no 4-bit kernel for them)")
    if kinds[INT8_REQUANT]:
        notes.append(f"{kinds[INT8_REQUANT]} group-wise 4-bit layers re-quantized to int8 per channel (integers differ from the grid)")
    if kinds[INT4_GROUP]:
        from pocketfusion.compress.quant.grid import scale_is_storable

        exact = all(scale_is_storable(grid.layers[n].scale, grid.layers[n].group_size) for n, p in plans.items() if p.storage == INT4_GROUP)
        notes.append("int4 group scales are stored in bf16 by XNNPACK (qb4w): " + (
            "the grid's scales are exact in bf16, so the dequantized weight is the on-grid weight" if exact else
            "dequantized weight = q * bf16(scale) (a grid made before its scales were rounded to bf16-exact values)"))
    if grid.scheme == "w8a16":
        notes.append("w8a16: XNNPACK has no 16-bit activations; lowered as w8 with dynamic int8 activations")
    return {
        "scheme": grid.scheme,
        "method": grid.method,
        "layers_int8": sum(p.stored_bits == 8 for p in plans.values()),
        "layers_int4": sum(p.stored_bits == 4 for p in plans.values()),
        "layers_float": n_float,
        "storage": dict(kinds),
        "integers_exact": sum(p.exact for p in plans.values()),
        "fallbacks": fallbacks,
        "activations": {"dynamic-int8": acts[DYNAMIC], "static-int8": acts[STATIC],
                        "note": "dynamic: per-token int8 computed at run time (XNNPACK qd8 kernels)"},
        "notes": notes,
    }


@contextlib.contextmanager
def dynamic_conv_nhwc_fix():
    """Scoped fix for XNNPACK's channels-last pass with dynamically quantized convolutions.

    ``ChannelsLastTaggedReshapePass.input_to_nhwc`` (executorch 1.5.1, and main as of 2026-08)
    handles a dynamically quantized conv input (``x -> choose_qparams -> quantize -> dequantize ->
    conv``) whose ``x`` is NCHW by walking ``args[0]`` up to the *graph input* and converting that
    instead of ``x``. That is right only when the conv reads a graph input directly (a one-layer
    model); in a U-Net, where a conv follows GroupNorm's NCHW reshapes, it converts the wrong
    tensor (and crashes on a 3-D delegate input: "required rank 4 tensor to use channels_last").
    Here the NHWC copy is made of ``x`` itself and only this quantization chain reads it; every
    other case goes to the original method.
    """
    import torch
    from executorch.backends.xnnpack._passes.channels_last_tagged_reshape_pass import ChannelsLastTaggedReshapePass as P
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant, is_dynamic_qdq
    from executorch.exir.dialects._ops import ops as exir_ops

    original = P.input_to_nhwc

    def input_to_nhwc(self, graph_module, input_node, target_node):
        if not (is_dequant(input_node) and is_dynamic_qdq(input_node)) or P.is_nhwc_node(input_node):
            return original(self, graph_module, input_node, target_node)
        q = input_node.args[0]
        x = q.args[0] if isinstance(q, torch.fx.Node) and q.args else None
        if not isinstance(x, torch.fx.Node) or x.op == "placeholder" or not self.can_be_converted_to_nhwc(x):
            return original(self, graph_module, input_node, target_node)
        chain = {q}
        scale = q.args[1] if len(q.args) > 1 else None
        if isinstance(scale, torch.fx.Node) and scale.all_input_nodes:
            chain.add(scale.all_input_nodes[0])  # choose_qparams
        x_nhwc = x.meta.get(P.PARTNER_NODE)
        if x_nhwc is None:
            with graph_module.graph.inserting_after(x):
                x_nhwc = self.create_call_function_node(
                    graph_module=graph_module, target=exir_ops.edge.aten._to_copy.default, args=(x,),
                    memory_format=torch.channels_last,
                )
            P.mark_as_nhwc_node(x_nhwc)
            self.make_partners(x, x_nhwc)
        for user in list(x.users):
            if user in chain:
                user.replace_input_with(x, x_nhwc)

    P.input_to_nhwc = input_to_nhwc
    try:
        yield
    finally:
        P.input_to_nhwc = original


def merging_partitioner():
    """``XnnpackPartitioner`` whose partitions are merged wherever that creates no cycle.

    With dynamically quantized ops the partitioner's group-based merge (each quantized op travels
    with its activation's choose_qparams/quantize/dequantize chain) stops early: the tiny U-Net,
    one blob in fp32, came out as 5 blobs with *no* op outside them. Two partitions can be fused
    when no path leaves the union and comes back into it; then the tags are joined. The node
    groups stay whole (partitions are only ever united)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class MergingXnnpackPartitioner(XnnpackPartitioner):
        def partition(self, exported_program):
            result = super().partition(exported_program)
            graph = result.tagged_exported_program.graph_module.graph
            members: dict[str, set] = {}
            for node in graph.nodes:
                tag = node.meta.get("delegation_tag")
                if tag is not None:
                    members.setdefault(tag, set()).add(node)
            order = {n: i for i, n in enumerate(graph.nodes)}
            tags = sorted(members, key=lambda t: min(order[n] for n in members[t]))
            merged: list[set] = []
            names: list[list[str]] = []
            for tag in tags:
                nodes = members[tag]
                for i, group in enumerate(merged):
                    if not _creates_cycle(group | nodes):
                        group |= nodes
                        names[i].append(tag)
                        break
                else:
                    merged.append(set(nodes))
                    names.append([tag])
            for group_tags, group in zip(names, merged):
                keep = group_tags[0]
                for node in group:
                    node.meta["delegation_tag"] = keep
                for t in group_tags[1:]:
                    result.partition_tags.pop(t, None)
            return result

    return MergingXnnpackPartitioner()


def _creates_cycle(group: set) -> bool:
    """True when some path leaves ``group`` and re-enters it (the fused group would be its own input)."""
    seen = set()
    stack = [u for n in group for u in n.users if u not in group]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u in group:
                return True
            if u not in seen:
                stack.append(u)
    return False
