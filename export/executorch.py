"""ExecuTorch exporter: ``torch.export`` -> XNNPACK partitioner -> ``.pte``; runs in ExecuTorch's Python runtime.

Pipeline: (optional) equivalent rewrites on a deep copy of the module (``export.rewrites``) ->
``torch.export.export`` -> ``to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])`` ->
``to_executorch()`` -> ``<name>.pte`` plus ``<name>.pte.io.json`` (input/output names, which the
``.pte`` does not keep).

Every node the XNNPACK partitioner refuses runs on a portable (reference) kernel and splits the
graph into another delegate blob; the returned ``delegation`` block counts both, and an ETDump
profile of one run measures the share of runtime spent outside the delegates.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pocketfusion.backends import require
from pocketfusion.export.base import ExportConfig, Exported, ExportError
from pocketfusion.export.components import ComponentSpec

logger = logging.getLogger(__name__)

_BOOKKEEPING = {"getitem"}
_PROFILE_RUNS = 4  # ETDump runs by default; the first is dropped as a warm-up when there are more


def _op_name(target) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return name.split(":")[0]


def delegation_summary(edge_program) -> dict:
    """Delegate blobs and the ops left outside them in a lowered edge program.

    Walks the top-level graph of ``edge_program.exported_program()``: every
    ``executorch_call_delegate`` call is one blob; every other ``call_function`` (except tuple
    ``getitem``) is an op that will run on a portable kernel.
    """
    ep = edge_program.exported_program()
    gm = ep.graph_module
    blobs = 0
    backends: Counter[str] = Counter()
    outside: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name == "executorch_call_delegate":
            blobs += 1
            lowered = node.args[0]
            mod = getattr(gm, lowered.target, None) if getattr(lowered, "op", None) == "get_attr" else None
            backends[getattr(mod, "backend_id", "?")] += 1
        elif name not in _BOOKKEEPING:
            outside[name] += 1
    return {
        "delegate_blobs": blobs,
        "backends": dict(backends),
        "ops_outside": dict(sorted(outside.items(), key=lambda kv: (-kv[1], kv[0]))),
        "n_ops_outside": sum(outside.values()),
    }


@dataclass
class Lowered:
    """What ``lower`` produced: the ExecuTorch program, its delegation summary, the rewrites applied
    and the module that was exported (the rewritten copy, or the caller's module)."""

    program: object  # ExecutorchProgramManager
    delegation: dict
    rewrites: list[str]
    module: object
    quant: dict | None = None  # with a grid: plans, integers, scales, PT2E readback, simulated output
    winograd: dict | None = None  # the Winograd rewrite's record (export.winograd.apply_xnnpack_), with rewrites


def _structural_copy(module):
    """A copy of ``module``'s module tree that shares its parameters and buffers (no second copy of
    the weights: 3.4 GB for a full-size SD U-Net), so modules and parameters can be swapped on it."""
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo=shared)


def lower(module, example_args, *, rewrite: bool = True, grid=None, calibration=(), prefix: str = "unet.",
          winograd: str = "off") -> Lowered:
    """Lower ``module`` for ExecuTorch with the XNNPACK partitioner.

    With ``rewrite``, a deep copy of ``module`` gets ``apply_xnnpack_rewrites_`` (the caller's
    module is never changed) and the exported graph gets ``apply_graph_rewrites_``. The delegation
    summary is ``delegation_summary`` of the lowered edge program. Without a grid, the copy's 3x3
    convolutions also become Winograd F(m, 3) where ``winograd`` (a ``--winograd`` mode) says so
    (``export.winograd.apply_xnnpack_``).

    With ``grid`` (a ``compress.quant.grid.QuantGrid`` whose layer names are relative to
    ``module.<prefix>``), the grid's layers are lowered into XNNPACK's quantized kernels
    (``export.quant_executorch``): int4 group-wise linears from the grid's integers, the rest int8 per
    channel through PT2E with the constants pinned to the grid; ``calibration`` (tuples of example
    arguments) feeds the static activation observers of w8a8 layers.
    """
    import torch

    require("executorch", "executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from pocketfusion.export import winograd as wg
    from pocketfusion.export.rewrites import apply_graph_rewrites_, apply_xnnpack_rewrites_

    rewrites: list[str] = []
    wino = None
    if rewrite:
        module = _structural_copy(module)
        rewrites = apply_xnnpack_rewrites_(module, fuse_upsample_conv=grid is None)
        if grid is None:  # a grid's convolutions keep its integers
            wino = wg.apply_xnnpack_(module, example_args, winograd)
            wino.pop("originals")
            if line := wg.rewrite_line(wino, "in the file"):
                rewrites.append(line)
    module = module.eval()
    qinfo = None
    target = module
    if grid is not None:
        from pocketfusion.export import quant_executorch as qe

        source = module.get_submodule(prefix.rstrip("."))
        plans = qe.plan(grid, have_calibration=bool(calibration))
        ints, scales = qe.target_integers(grid, source, plans)
        target = _structural_copy(module)  # int4 weights go on a copy: ``module`` stays the float reference
        qe.apply_int4_linears_(target, plans, ints, scales, prefix)
    with torch.no_grad():
        ep = torch.export.export(target, tuple(example_args))
    if rewrite:
        rewrites += apply_graph_rewrites_(ep)
    if grid is not None:
        converted, readback = qe.quantize_pt2e(ep, plans, ints, scales, tuple(example_args), list(calibration), prefix)
        with torch.no_grad():
            ep = torch.export.export(converted, tuple(example_args))
        qinfo = {"plans": plans, "integers": ints, "scales": scales, "readback": readback, "converted": converted}
    if grid is None:
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    else:
        with qe.dynamic_conv_nhwc_fix():
            edge = to_edge_transform_and_lower(ep, partitioner=[qe.merging_partitioner()])
    delegation = delegation_summary(edge)
    return Lowered(edge.to_executorch(), delegation, rewrites, module, qinfo, wino)


def profile_outside_share(pte_path: str | Path, feeds: list, runs: int = _PROFILE_RUNS) -> dict:
    """Share of execution time spent outside delegate calls, from an ETDump of ``runs`` executions.

    Loads the program with ETDump enabled in ExecuTorch's Python runtime (the pip wheel is built
    with the event tracer), runs ``forward`` on ``feeds`` (a list of torch tensors) ``runs`` times,
    and parses the dump with ``executorch.devtools.Inspector``. Per run:
    ``outside = Method::execute - sum(DELEGATE_CALL)`` (portable kernels plus runtime overhead).
    Returns medians over the runs after the first (warm-up), and per-op portable kernel times.
    """
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(pte_path), enable_etdump=True, debug_buffer_size=0)
    method = program.load_method("forward")
    for _ in range(runs):
        method.execute(feeds)
    with tempfile.TemporaryDirectory(prefix="pf-etdump-") as tmp:
        etdump = os.path.join(tmp, "run.etdp")
        program.write_etdump_result_to_file(etdump, os.path.join(tmp, "debug.bin"))
        with warnings.catch_warnings():  # "Output Buffer not found": no tensor debug data was asked for
            warnings.simplefilter("ignore")
            inspector = Inspector(etdump_path=etdump)
    execute: list[float] = []
    delegate = [0.0] * runs
    ops: Counter[str] = Counter()
    for block in inspector.event_blocks:
        for ev in block.events:
            raw = list(ev.perf_data.raw) if ev.perf_data is not None else []
            if ev.name == "Method::execute":
                execute = raw
            elif ev.name == "DELEGATE_CALL":
                for i, t in enumerate(raw[:runs]):
                    delegate[i] += t
            elif ev.name.startswith("native_call_") and not ev.is_delegated_op:
                ops[ev.name[len("native_call_"):]] += statistics.median(raw[1:] or raw) if raw else 0.0
    if not execute:
        raise RuntimeError("the ETDump has no Method::execute events")
    keep = range(1, len(execute)) if len(execute) > 1 else range(len(execute))
    total = statistics.median(execute[i] for i in keep)
    inside = statistics.median(delegate[i] for i in keep)
    return {
        "execute_ms": round(total, 4),
        "delegate_ms": round(inside, 4),
        "outside_ms": round(max(total - inside, 0.0), 4),
        "outside_share": round(max(total - inside, 0.0) / total, 4) if total > 0 else 0.0,
        "portable_op_ms": {k: round(v, 4) for k, v in ops.most_common(10)},
        "runs": len(execute),
        "note": "ETDump medians (ms) over runs after the first; outside = Method::execute - sum(DELEGATE_CALL)",
    }


def _quant_info(spec: ComponentSpec, lowered: Lowered, path: Path, layer_map: dict[str, str]) -> dict:
    """The ``quantization`` block: plan summary, integer read-back from the ``.pte`` through the layer
    map, measured errors.

    Raises ``ExportError`` when a layer's integers or scales are not in the written program."""
    import torch

    from pocketfusion.compress.quant.grid import quantizable_layers
    from pocketfusion.export import quant_executorch as qe

    q = lowered.quant
    grid, plans, module = spec.grid, q["plans"], spec.source_module
    n_float = len(set(quantizable_layers(module)) - set(grid.layers))
    info = qe.summary(grid, plans, n_float)
    back = qe.pte_readback(path, plans, q["integers"], q["scales"], layer_map)
    if back["missing"]:
        raise ExportError(f"executorch: {spec.name}: the .pte lacks the grid integers/scales of {len(back['missing'])} layers: "
                          + ", ".join(back["missing"][:5]))
    readback = q["readback"]
    int8_pinned = [n for n, p in plans.items() if p.storage != qe.INT4_GROUP]
    info["readback"] = {
        "pte": "every layer's integers read back from the program's named data through the layer map, and its scales found",
        **{k: v for k, v in back.items() if k != "missing"},
        # how often XNNPACKQuantizer's own observer already gave the grid's integers (8-bit grid layers only)
        "observer_matched": sum(readback[n]["observer_matched"] for n in int8_pinned if plans[n].bits == 8),
        "observer_layers": sum(plans[n].bits == 8 for n in int8_pinned),
    }
    ints = q["integers"]
    info["integers_equal_grid"] = sum(
        bool(torch.equal(ints[n], g)) for n, g in grid.integers(module).items() if plans[n].exact
    )
    err = peak = 0.0
    with torch.no_grad():  # the quantized graph run by PyTorch (per-tensor dynamic activations; XNNPACK's are per token)
        for feed in spec.golden:
            args = tuple(torch.from_numpy(feed[s.name]) for s in spec.inputs)
            ref = spec.module(*args)
            err = max(err, float((q["converted"](*args) - ref).abs().max()))
            peak = max(peak, float(ref.abs().max()))
    info["simulated_rel_max"] = err / max(peak, 1e-12)
    static = any(p.activations == qe.STATIC for p in plans.values())
    info["activation_bits"] = 8  # every quantized layer's activations are int8 (dynamic or static)
    info["tolerance_key"] = "executorch-a8" if static else "executorch-qd8"
    kinds = info["storage"]
    fell = len(info["fallbacks"])
    logger.info(
        "executorch/%s: %s -> %d int4 group-wise, %d int8 per-channel (%d re-quantized), %d float; %s activations%s",
        spec.name, grid.scheme, kinds.get(qe.INT4_GROUP, 0), kinds.get(qe.INT8_CHANNEL, 0) + kinds.get(qe.INT8_REQUANT, 0),
        kinds.get(qe.INT8_REQUANT, 0), n_float, "static+dynamic int8" if static else "dynamic int8",
        f"; {fell} layers held differently from the grid (4-bit convs/linears XNNPACK cannot hold: see manifest fallbacks)" if fell else "",
    )
    return info


def _lower_spec(spec: ComponentSpec, cfg: ExportConfig, notes: list[str]) -> Lowered:
    """``lower`` the spec's module, on its grid if it has one (static activations from its calibration feeds)."""
    import torch

    kwargs = {}
    if spec.grid is not None:
        # "dynamic" (cfg.executorch_activations) ignores the grid's static 8-bit activations:
        # XNNPACK's static kernels also requantize every conv/linear output (measured on the demo
        # U-Net, w8a8: rel_max 0.21 static vs 0.038 dynamic)
        static = cfg.executorch_activations != "dynamic"
        calib = [tuple(torch.from_numpy(f[s.name]) for s in spec.inputs) for f in spec.calibration] if static else []
        if spec.calibration and not static:
            notes.append("executorch_activations=dynamic: the grid's static 8-bit activations lowered as dynamic int8")
        kwargs = {"grid": spec.grid, "calibration": calib, "prefix": spec.source + "."}
    try:
        return lower(spec.module, spec.example_args(), rewrite=cfg.rewrite, winograd=cfg.winograd, **kwargs)
    except Exception as e:  # torch.export / partitioner raise many types; name the component
        first = str(e).splitlines()[0] if str(e) else ""
        raise ExportError(f"executorch: {spec.name} failed to lower ({type(e).__name__}: {first})") from e


def _check_lowered(spec: ComponentSpec, lowered: Lowered, cfg: ExportConfig, info: dict) -> None:
    """The rewritten copy computes the same function; the U-Net is in few enough delegate blobs."""
    import torch

    delegation = lowered.delegation
    if cfg.rewrite:
        args = spec.example_args()
        with torch.no_grad():  # cheap guard: the rewritten copy must compute the same function
            ref, got = spec.module(*args), lowered.module(*args)
        refs = ref if isinstance(ref, tuple) else (ref,)  # SDXL's text_encoder_2 gives two outputs
        gots = got if isinstance(got, tuple) else (got,)
        err = max(float((g - r).abs().max()) for g, r in zip(gots, refs))
        peak = max(float(r.abs().max()) for r in refs)
        info["rewrite_max_abs_err"] = err
        if err > 1e-4 * max(peak, 1.0):
            raise ExportError(f"executorch: {spec.name}: the XNNPACK rewrites changed the output (max abs err {err:.3g})")
    logger.info("executorch/%s: %d delegate blobs, %d ops outside %s", spec.name, delegation["delegate_blobs"],
                delegation["n_ops_outside"], delegation["ops_outside"])
    if spec.name == "unet" and delegation["delegate_blobs"] > cfg.max_delegates:
        outside = ", ".join(f"{k} x{v}" for k, v in delegation["ops_outside"].items()) or "none"
        raise ExportError(
            f"executorch: unet lowered into {delegation['delegate_blobs']} XNNPACK delegate blobs, more than the limit "
            f"{cfg.max_delegates} (--max-delegates); ops outside delegates: {outside}"
            + ("" if cfg.rewrite else "; the rewrites are off (enable them to fuse the graph)")
        )


def _write(lowered: Lowered, spec: ComponentSpec, path: Path) -> None:
    """Write the program and its ``.io.json`` (input/output names) atomically."""
    io = {"inputs": [s.name for s in spec.inputs], "outputs": [s.name for s in spec.outputs]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            lowered.program.write_to_file(f)
        io_tmp = tmp + ".io.json"
        Path(io_tmp).write_text(json.dumps(io, indent=2) + "\n")
        os.replace(tmp, path)
        os.replace(io_tmp, str(path) + ".io.json")
    finally:
        for p in (tmp, tmp + ".io.json"):
            if os.path.exists(p):
                os.unlink(p)


def _profile(path: Path, spec: ComponentSpec, runs: int, delegation: dict, notes: list[str]) -> float | None:
    """ETDump share of run time outside the delegates (None when not measured)."""
    if runs <= 0:
        notes.append("outside-delegate runtime share not measured (executorch_profile_runs=0)")
        return None
    try:
        profile = profile_outside_share(path, list(spec.example_args()), runs=runs)
    except Exception as e:  # no event tracer in this build, Inspector API change...
        notes.append(f"outside-delegate runtime share not measured: ETDump profiling failed ({type(e).__name__}: {e})")
        return None
    delegation["profile"] = profile
    return profile["outside_share"]


def export_component(spec: ComponentSpec, path: Path, cfg: ExportConfig) -> Exported:
    """Export ``spec.module`` to the ExecuTorch program ``path`` (XNNPACK-delegated, fp32).

    With ``cfg.rewrite`` the module's deep copy is first rewritten into XNNPACK-delegable form
    (``export.rewrites``); the rewrite is checked against the original on the example input.
    Writes ``path`` and ``<path>.io.json`` atomically. Returns the layer map (named-data keys of the
    weights) and ``delegation`` (blobs, ops outside), ``outside_delegate_runtime_share`` (ETDump,
    ``cfg.executorch_profile_runs`` runs, 0 to skip), ``rewrites`` and ``notes``.

    With a quantization grid (``spec.grid``) the grid's layers are lowered into XNNPACK's quantized
    kernels (``export.quant_executorch``; static activations from ``spec.calibration`` for w8a8),
    the integers are read back from the written program through the layer map, and
    ``quantization`` is added: layers per storage kind, ``fallbacks`` (layer: why it is held
    differently from the grid), activations, ``readback``, ``simulated_rel_max`` (PyTorch simulation
    of the quantized graph vs the on-grid model) and ``tolerance_key`` (the parity tolerance that applies).

    Raises:
        ExportError: lowering failed, a rewrite changed the function, the U-Net lowered into
            more than ``cfg.max_delegates`` delegate blobs, or the program lacks a grid layer's integers.
    """
    from pocketfusion.compress.quant.grid import quantizable_layers
    from pocketfusion.export import quant_executorch as qe

    require("executorch", "executorch")
    path = Path(path)
    notes: list[str] = []
    info: dict = {}
    t0 = time.perf_counter()
    lowered = _lower_spec(spec, cfg, notes)
    delegation, rewrites = lowered.delegation, lowered.rewrites
    delegation["lower_seconds"] = round(time.perf_counter() - t0, 2)
    _check_lowered(spec, lowered, cfg, info)
    _write(lowered, spec, path)
    if lowered.quant is not None:
        layer_map = qe.layer_map(lowered.quant["plans"], lowered.quant["integers"])
        info["quantization"] = _quant_info(spec, lowered, path, layer_map)
    else:
        layer_map = qe.weight_map(path, spec.source_module, quantizable_layers(spec.source_module))
    share = _profile(path, spec, cfg.executorch_profile_runs, delegation, notes)
    if lowered.quant is None:
        notes.append("fp32, XNNPACK delegate; ops outside delegates run on portable (reference) kernels")
    else:
        q = info["quantization"]
        notes.append(f"{q['scheme']}: {q['layers_int4']} int4 + {q['layers_int8']} int8 weight layers in the XNNPACK delegate, "
                     f"{q['layers_float']} float; activations {q['activations']['dynamic-int8']} dynamic / "
                     f"{q['activations']['static-int8']} static int8; ops outside delegates run on portable kernels")
    info.update(delegation=delegation, outside_delegate_runtime_share=share, rewrites=rewrites, notes=notes)
    if lowered.winograd is not None:
        info["winograd"] = lowered.winograd
    return Exported(info, layer_map)
