"""Where a U-Net call's time goes in onnxruntime or ExecuTorch, per operator type, against the host's GEMM / conv roofline.

    python benchmarks/unet_profile.py EXPORT_DIR [EXPORT_DIR ...] [--runtime onnxruntime|executorch] [--threads 1]
        [--runs 50] [--json OUT]

For each export directory's ``onnx/unet`` (``pocketfusion export ... --target onnx``): onnxruntime's own profiler
(``SessionOptions.enable_profiling``) over ``--runs`` calls on the golden input after warm-up, every node's kernel
time summed per operator type; the call's multiply-accumulates counted on the export's source model (as ``bench``
counts them; all but a few are in ``Conv`` / ``MatMul`` / ``Gemm``); so the share of the call spent in those
compute-bound kernels, their achieved GFLOP/s, and the same for the whole call. The profiler adds a fixed cost
per node, so its wall time is above an unprofiled call's; the shares are what it is for. Against this host's
probes of onnxruntime's own GEMM and conv at the model's shapes
(``export.roofline``, as ``bench`` reports them) this says which part of a call keeps it under the roofline: the
time outside the GEMM / conv kernels (normalisation, attention softmax, element-wise ops, layout copies), or the
kernels themselves at these small shapes. The session is built as the runtime adapter builds it (its kernel path
from the graph's metadata, ``runtimes.ort``).

``--runtime executorch`` does the same for ``executorch/unet.pte``: ExecuTorch's event tracer (ETDump, which the pip
wheel's runtime records) holds one event per XNNPACK operator inside the delegate, so the kernel time is summed per
XNNPACK operator type (``Convolution (NHWC, F32) IGEMM``, ``Fully Connected (NC, F32) GEMM``, ...), the compute-bound
ones being the convolutions, deconvolutions, fully-connected and batched matrix multiplies. The same XNNPACK
kernels run LiteRT's graph (its default delegate), whose Python interpreter has no per-operator profiler.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

_XNNPACK_COMPUTE = ("Convolution", "Deconvolution", "Fully Connected", "Batch Matrix Multiply", "Dynamic Fully Connected")
COMPUTE_OPS = ("Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm", "NchwcConv", "QLinearConv", "MatMulInteger",
            "ConvInteger", "MatMulNBits")


def _wall_ms(sess, feed: dict, runs: int, warmup: int = 5) -> list[float]:
    import time

    f = {k: v for k, v in feed.items() if k in sess.input_names}
    for _ in range(warmup):
        sess.run(f)
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(f)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def profile(path: Path, feed: dict, *, threads: int, runs: int, warmup: int = 5) -> dict:
    """Per-op-type kernel ms per call (onnxruntime's profiler), and the call's own median wall ms."""
    from pocketfusion.runtimes.ort import OrtSession

    with tempfile.TemporaryDirectory() as tmp:
        sess = OrtSession(path, threads, profile_prefix=str(Path(tmp) / "prof"))  # as the runtime adapter builds it
        wall = _wall_ms(sess, feed, runs, warmup)
        events = json.loads(Path(sess.end_profiling()).read_text())
    unprofiled = _wall_ms(OrtSession(path, threads), feed, runs, warmup)  # unprofiled: the profiler adds a fixed cost per node
    per_op: dict[str, float] = defaultdict(float)
    nodes: dict[str, int] = defaultdict(int)
    calls = 0
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            calls += 1
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            per_op[e.get("args", {}).get("op_name", "?")] += e["dur"] / 1e3
            nodes[e.get("args", {}).get("op_name", "?")] += 1
    calls = max(1, calls)
    ops = {k: v / calls for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}
    return {"median_wall_ms": float(np.median(unprofiled)), "profiled_wall_ms": float(np.median(wall)), "kernel_ms": sum(ops.values()),
            "ms_per_op_type": ops, "nodes_per_op_type": {k: nodes[k] // calls for k in ops}, "nodes": sum(nodes.values()) // calls,
            "calls": calls}


def profile_executorch(path: Path, feed: dict, *, threads: int, runs: int, warmup: int = 5) -> dict:
    """Per-XNNPACK-op-type kernel ms per call (ETDump), and the call's own median wall ms unprofiled."""
    import re
    import statistics
    import warnings

    import torch
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    from pocketfusion.runtimes.executorch import ExecuTorchSession

    sess = ExecuTorchSession(path, threads)  # sets the shared threadpool, as the runtime adapter does
    unprofiled = _wall_ms(sess, feed, runs, warmup)
    program = Runtime.get().load_program(str(path), enable_etdump=True, debug_buffer_size=0)
    method = program.load_method("forward")
    inputs = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in sess.input_names]
    for _ in range(warmup + runs):
        method.execute(inputs)
    with tempfile.TemporaryDirectory(prefix="pf-etdump-") as tmp:
        program.write_etdump_result_to_file(str(Path(tmp) / "run.etdp"), str(Path(tmp) / "debug.bin"))
        with warnings.catch_warnings():  # "Output Buffer not found": no tensor debug data was asked for
            warnings.simplefilter("ignore")
            inspector = Inspector(etdump_path=str(Path(tmp) / "run.etdp"))
    per_op: dict[str, float] = defaultdict(float)
    nodes: dict[str, int] = defaultdict(int)
    execute: list[float] = []
    for block in inspector.event_blocks:
        for ev in block.events:
            raw = list(ev.perf_data.raw) if ev.perf_data is not None else []
            if ev.name == "Method::execute":
                execute = raw[warmup:] or raw
            elif raw and ev.name not in ("DELEGATE_CALL", "Program::load_method", "Method::init") and "#" in ev.name:
                op = re.sub(r"\s*#\d+$", "", ev.name)
                per_op[op] += statistics.median(raw[warmup:] or raw)
                nodes[op] += 1
    ops = dict(sorted(per_op.items(), key=lambda kv: -kv[1]))
    return {"median_wall_ms": float(np.median(unprofiled)), "profiled_wall_ms": float(np.median(execute)) if execute else float("nan"),
            "kernel_ms": sum(ops.values()), "ms_per_op_type": ops, "nodes_per_op_type": {k: nodes[k] for k in ops},
            "nodes": sum(nodes.values()), "calls": len(execute)}


def measure(export_dir: Path, *, threads: int, runs: int, runtime: str = "onnxruntime") -> dict:
    from pocketfusion import artifact
    m = artifact.load_manifest(export_dir)
    comp = m.component("unet", "onnx" if runtime == "onnxruntime" else "executorch")
    path = artifact.resolve_path(export_dir, comp.path)
    feed = artifact.read_golden(artifact.resolve_path(export_dir, comp.golden))[0]
    if runtime == "onnxruntime":
        p = profile(path, feed, threads=threads, runs=runs)
        compute = lambda op: op in COMPUTE_OPS  # noqa: E731
    else:
        p = profile_executorch(path, feed, threads=threads, runs=runs)
        compute = lambda op: op.startswith(_XNNPACK_COMPUTE)  # noqa: E731
    from pocketfusion.runtimes.bench import _macs

    macs = _macs(export_dir).get("unet", {}).get("macs", {}).get("total")  # PyTorch's count on the export's source, as bench's
    if not macs:
        raise SystemExit(f"error: {export_dir}: its source model is not on disk to count the U-Net's MACs")
    compute_ms = sum(v for k, v in p["ms_per_op_type"].items() if compute(k))
    p.update(runtime=runtime, macs=macs, compute_ms=compute_ms, compute_share=compute_ms / p["kernel_ms"],
             call_gflops=2 * macs / (p["median_wall_ms"] * 1e6), threads=threads, runs=runs)
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exports", nargs="+", help="export directories with an onnx/unet (executorch/unet with --runtime executorch)")
    ap.add_argument("--runtime", choices=("onnxruntime", "executorch"), default="onnxruntime")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--top", type=int, default=8, help="operator types listed per export")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = {}
    kinds = "Conv / MatMul / Gemm" if args.runtime == "onnxruntime" else "convolutions / GEMMs"
    for d in args.exports:
        r = out[d] = measure(Path(d), threads=args.threads, runs=args.runs, runtime=args.runtime)
        print(f"{d}: {r['median_wall_ms']:.3f} ms a call unprofiled ({r['macs'] / 1e6:.1f} MMAC: {r['call_gflops']:.1f} GFLOP/s), "
              f"{r['nodes']} kernels a call; profiled {r['profiled_wall_ms']:.3f} ms, {r['kernel_ms']:.3f} ms in kernels, of it "
              f"{kinds} {r['compute_ms']:.3f} ms = {100 * r['compute_share']:.0f} %")
        for op, ms in list(r["ms_per_op_type"].items())[: args.top]:
            print(f"    {op:<40} {r['nodes_per_op_type'][op]:4d} nodes {ms:8.3f} ms  {100 * ms / r['kernel_ms']:5.1f} %")
    if args.json:
        Path(args.json).write_text(json.dumps({"schema": "pocketfusion.unet-profile", "results": out}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0
