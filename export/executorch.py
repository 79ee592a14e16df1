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

from pocketfusion.export.base import ExportConfig, ExportError
from pocketfusion.export.components import ComponentSpec
from pocketfusion.runtimes.base import require

logger = logging.getLogger(__name__)

EXTENSION = ".pte"
RUNTIME = "executorch"
_BOOKKEEPING = {"getitem"}
_PROFILE_RUNS = 4  # ETDump runs; the first is dropped as a warm-up when there are more


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


def lower(module, example_args, *, rewrite: bool = True) -> Lowered:
    """Lower ``module`` for ExecuTorch with the XNNPACK partitioner.

    With ``rewrite``, a deep copy of ``module`` gets ``apply_xnnpack_rewrites_`` (the caller's
    module is never changed) and the exported graph gets ``apply_graph_rewrites_``. The delegation
    summary is ``delegation_summary`` of the lowered edge program.
    """
    import torch

    require("executorch", "executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from pocketfusion.export.rewrites import apply_graph_rewrites_, apply_xnnpack_rewrites_

    rewrites: list[str] = []
    if rewrite:
        # A structural copy that shares the weight tensors: the rewrites swap modules but reuse the
        # original parameters, so the caller's module stays intact without a second copy of the
        # weights (3.4 GB for a full-size SD U-Net).
        shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
        module = copy.deepcopy(module, memo=shared)
        rewrites = apply_xnnpack_rewrites_(module)
    module = module.eval()
    with torch.no_grad():
        ep = torch.export.export(module, tuple(example_args))
    if rewrite:
        rewrites += apply_graph_rewrites_(ep)
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    delegation = delegation_summary(edge)
    return Lowered(edge.to_executorch(), delegation, rewrites, module)


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


def export_component(spec: ComponentSpec, path: Path, cfg: ExportConfig) -> dict:
    """Export ``spec.module`` to the ExecuTorch program ``path`` (XNNPACK-delegated, fp32).

    With ``cfg.rewrite`` the module's deep copy is first rewritten into XNNPACK-delegable form
    (``export.rewrites``); the rewrite is checked against the original on the example input.
    Writes ``path`` and ``<path>.io.json`` atomically. Returns ``delegation`` (blobs, ops outside),
    ``outside_delegate_runtime_share`` (ETDump, ``cfg.extra["executorch_profile_runs"]`` runs,
    0 to skip), ``rewrites`` and ``notes``.

    Raises:
        ExportError: lowering failed, a rewrite changed the function, or the U-Net lowered into
            more than ``cfg.max_delegates`` delegate blobs.
    """
    import torch

    require("executorch", "executorch")
    path = Path(path)
    args = spec.example_args()
    notes: list[str] = []
    info: dict = {}
    t0 = time.perf_counter()
    try:
        lowered = lower(spec.module, args, rewrite=cfg.rewrite)
    except Exception as e:  # torch.export / partitioner raise many types; name the component
        raise ExportError(f"executorch: {spec.name} failed to lower ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    delegation, rewrites = lowered.delegation, lowered.rewrites
    delegation["lower_seconds"] = round(time.perf_counter() - t0, 2)
    if cfg.rewrite:
        with torch.no_grad():  # cheap guard: the rewritten copy must compute the same function
            ref = spec.module(*args)
            err = float((lowered.module(*args) - ref).abs().max())
        info["rewrite_max_abs_err"] = err
        if err > 1e-4 * max(float(ref.abs().max()), 1.0):
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
    runs = int(cfg.extra.get("executorch_profile_runs", _PROFILE_RUNS))
    share = None
    if runs > 0:
        try:
            profile = profile_outside_share(path, list(args), runs=runs)
        except Exception as e:  # no event tracer in this build, Inspector API change...
            notes.append(f"outside-delegate runtime share not measured: ETDump profiling failed ({type(e).__name__}: {e})")
        else:
            share = profile["outside_share"]
            delegation["profile"] = profile
    else:
        notes.append("outside-delegate runtime share not measured (executorch_profile_runs=0)")
    notes.append("fp32, XNNPACK delegate; ops outside delegates run on portable (reference) kernels")
    info.update(delegation=delegation, outside_delegate_runtime_share=share, rewrites=rewrites, notes=notes)
    return info
