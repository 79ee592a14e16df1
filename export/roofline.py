"""Probes of a runtime's own kernels, for the bench's roofline (``pocketfusion.runtimes.roofline``).

The compute ceiling of a runtime is what *its* kernels reach, at the shapes the model uses: a GEMM
(``nn.Linear``) and a 3x3 convolution at a component's largest such layer (``pocketfusion.macs.layer_profile``),
exported through the project's own exporters (``export.latency.module_spec``: the same tiny specs the
per-unit latency table exports) and timed through the runtime's own session, fp32 and int8:

==============  ============================================================================
runtime         int8 path probed
==============  ============================================================================
onnxruntime     ``quantize_dynamic`` of the fp32 probe: DynamicQuantizeLinear + MatMulInteger / ConvInteger
executorch      a W8 grid (``compress.quant.grid.rtn_grid``) lowered by the exporter: XNNPACK qd8 (dynamic int8
                activations, int8 per-channel weights)
litert          ai-edge-quantizer's ``dynamic_wi8_afp32`` on the fp32 probe: XNNPACK dynamic-range kernels
==============  ============================================================================

A layer of few MACs takes a few tens of microseconds, about the cost of one ``session.run`` from Python, so
a probe chains ``depth`` such layers (alternating ``K→N`` and ``N→K``: the same MACs each, activations passed
on in cache as in the model) until a call holds about ``TARGET_MACS``. Each probe is timed best of its runs
(a peak, not a typical figure). Plus a bandwidth probe in the runtime: a large element-wise ``Add``
(read 2, write 1 tensors of ``BANDWIDTH_ELEMENTS`` floats).

Runs in its own process (``python -m pocketfusion.export.roofline JSON``, one per runtime, started by the bench:
``runtimes`` imports no exporter), printing one line ``RESULT {json}``.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pocketfusion import backends

TARGET_MACS = 50_000_000  # per probe call: a few ms on a laptop core, the Python call overhead below 2 %
MAX_DEPTH = 32
BANDWIDTH_ELEMENTS = 16 << 20  # 64 MiB per fp32 tensor: beyond the last-level cache
_MIN_SECONDS = 0.25
_MAX_RUNS = 50


def _holder(layers):
    import torch

    class Holder(torch.nn.Module):  # the grid's source module: its layers are ``layers.0``, ``layers.1``, ...
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(layers)

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Holder()

        def forward(self, x):
            for layer in self.net.layers:
                x = layer(x)
            return x

    return Probe().eval()


def depth_for(macs: int) -> int:
    """Layers chained in one probe call of a layer of ``macs`` MACs."""
    return max(1, min(MAX_DEPTH, math.ceil(TARGET_MACS / max(macs, 1))))


def gemm_probe(shape: dict):
    """``(module, inputs, macs per call)``: ``depth`` linear layers at ``(1, m, k)``, alternating k→n, n→k."""
    import torch

    m, k, n = shape["m"], shape["k"], shape["n"]
    d = depth_for(m * k * n)
    g = torch.Generator().manual_seed(0)
    layers = [torch.nn.Linear(k, n) if i % 2 == 0 else torch.nn.Linear(n, k) for i in range(d)]
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5, generator=g)
    return _holder(layers), (torch.randn(1, m, k, generator=g),), m * k * n * d


def conv_probe(shape: dict):
    """``(module, inputs, macs per call)``: ``depth`` 3x3 convolutions at the layer's input, alternating
    ``Cin→Cout``, ``Cout→Cin`` (stride 1: a chain keeps its spatial size)."""
    import torch

    b, ci, co, h, w = shape["batch"], shape["in_channels"], shape["out_channels"], shape["height"], shape["width"]
    macs = b * h * w * ci * co * 9
    d = depth_for(macs)
    g = torch.Generator().manual_seed(0)
    layers = [torch.nn.Conv2d(ci, co, 3, padding=1) if i % 2 == 0 else torch.nn.Conv2d(co, ci, 3, padding=1) for i in range(d)]
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=(layer.in_channels * 9) ** -0.5, generator=g)
    return _holder(layers), (torch.randn(b, ci, h, w, generator=g),), macs * d


def _add_probe():
    import torch

    class Add(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Identity()  # the spec's (empty) source module

        def forward(self, a, b):
            return a + b

    g = torch.Generator().manual_seed(0)
    xs = (torch.randn(BANDWIDTH_ELEMENTS, generator=g), torch.randn(BANDWIDTH_ELEMENTS, generator=g))
    return Add().eval(), xs


def _best_ms(session, feed) -> tuple[float, int]:
    session.run(feed)
    session.run(feed)
    best, runs, t_end = float("inf"), 0, time.perf_counter() + _MIN_SECONDS
    while runs < 5 or (runs < _MAX_RUNS and time.perf_counter() < t_end):
        t = time.perf_counter()
        session.run(feed)
        best = min(best, time.perf_counter() - t)
        runs += 1
    return best * 1e3, runs


def _int8_onnx(src: Path, out: Path) -> str:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
    return "quantize_dynamic: DynamicQuantizeLinear + MatMulInteger / ConvInteger (int8 weights per tensor)"


def _int8_tflite(src: Path, out: Path) -> str:
    import contextlib
    import io

    from ai_edge_quantizer import quantizer, recipe

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        q = quantizer.Quantizer(str(src))
        q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
        q.quantize().export_model(str(out), overwrite=True)
    io_json = Path(str(src) + ".io.json")
    if io_json.is_file():
        shutil.copy(io_json, str(out) + ".io.json")
    return "ai-edge-quantizer dynamic_wi8_afp32: XNNPACK dynamic-range kernels (int8 weights per channel, int8 activations)"


def _export(spec, target: str, path: Path, *, grid=None) -> None:
    from pocketfusion.export.base import ExportConfig

    spec.grid = grid
    cfg = ExportConfig(targets=(target,), components=("unet",), check_parity=False, executorch_profile_runs=0)
    backends.exporter(target).export_component(spec, path, cfg)


def _probe_one(runtime: str, kind: str, shape: dict, tmp: Path, threads: int | None, precisions) -> dict:
    """GFLOP/s of one kernel kind (``gemm`` / ``conv``) at ``shape``, per precision."""
    from pocketfusion.export.latency import module_spec
    from pocketfusion.runtimes.base import load_session

    target = backends.for_runtime(runtime).target
    module, xs, macs = (gemm_probe if kind == "gemm" else conv_probe)(shape)
    spec = module_spec(f"probe_{kind}", module, xs, source="net")
    feed = spec.golden[0]
    ext = backends.backend(target).extension
    out: dict = {"macs": int(macs), "depth": len(module.net.layers)}
    tmp.mkdir(parents=True, exist_ok=True)
    fp32 = tmp / f"{kind}{ext}"
    _export(spec, target, fp32)
    for prec in precisions:
        try:
            if prec == "fp32":
                path, how = fp32, "fp32"
            else:
                path = tmp / f"{kind}.int8{ext}"
                if runtime == "onnxruntime":
                    how = _int8_onnx(fp32, path)
                elif runtime == "litert":
                    how = _int8_tflite(fp32, path)
                elif runtime == "executorch":
                    from pocketfusion.compress.quant.grid import rtn_grid

                    grid = rtn_grid(module.net, 8)  # in place: the probe's weights go on the int8 grid
                    _export(spec, target, path, grid=grid)
                    how = "W8 grid lowered by the exporter: XNNPACK qd8 (int8 weights per channel, dynamic int8 activations)"
                else:
                    continue
            session = load_session(path, runtime, threads=threads)
            ms, runs = _best_ms(session, feed)
            out[prec] = {"gflops": 2 * macs / (ms / 1e3) / 1e9, "best_ms": ms, "runs": runs, "path": how}
            out["device"] = session.device
            del session
        except Exception as e:  # an int8 path this runtime's version lacks costs its figure, not the bench
            out[prec] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    return out


def _bandwidth(runtime: str, tmp: Path, threads: int | None) -> dict:
    from pocketfusion.export.latency import module_spec
    from pocketfusion.runtimes.base import load_session

    target = backends.for_runtime(runtime).target
    module, xs = _add_probe()
    spec = module_spec("probe_add", module, xs, source="net")
    path = tmp / f"add{backends.backend(target).extension}"
    try:
        _export(spec, target, path)
        session = load_session(path, runtime, threads=threads)
        ms, runs = _best_ms(session, spec.golden[0])
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    moved = 3 * BANDWIDTH_ELEMENTS * 4
    return {"gbs": moved / (ms / 1e3) / 1e9, "best_ms": ms, "runs": runs, "bytes": moved, "device": session.device,
            "op": "element-wise Add of two fp32 tensors (2 read, 1 written; the adapter's copies count against it)"}


def probe(runtime: str, shapes: dict, *, threads: int | None = None, precisions=("fp32", "int8"), bandwidth: bool = True) -> dict:
    """Probe ``runtime``'s kernels at ``shapes``: ``{key: {"gemm": {m, k, n} | None, "conv": {...} | None}}``.

    Returns ``{"runtime", "threads", "device", "shapes": {key: {"gemm": {"fp32": {"gflops", ...}, "int8": {...},
    "macs", "depth"}, "conv": {...}}}, "bandwidth": {"gbs", ...}}``. Identical shapes are probed once.
    """
    runtime = backends.canonical_runtime(runtime)
    tmp = Path(tempfile.mkdtemp(prefix=".pocketfusion-roofline-"))
    done: dict[str, dict] = {}
    out: dict = {"runtime": runtime, "threads": threads, "shapes": {}}
    try:
        for key, kinds in shapes.items():
            res = {}
            for kind in ("gemm", "conv"):
                shape = kinds.get(kind)
                if not shape:
                    continue
                sig = kind + json.dumps({k: shape[k] for k in sorted(shape) if k != "macs"})
                if sig not in done:
                    done[sig] = _probe_one(runtime, kind, shape, tmp / f"p{len(done)}", threads, precisions)
                res[kind] = done[sig]
                out["device"] = done[sig].get("device", out.get("device"))
            out["shapes"][key] = res
        if bandwidth:
            out["bandwidth"] = _bandwidth(runtime, tmp, threads)
            out.setdefault("device", out["bandwidth"].get("device"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> int:
    job = json.loads(sys.argv[1])
    if job.get("threads"):
        import os

        os.environ.setdefault("OMP_NUM_THREADS", str(job["threads"]))
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    res = probe(job["runtime"], job["shapes"], threads=job.get("threads"), precisions=tuple(job.get("precisions", ("fp32", "int8"))),
                bandwidth=job.get("bandwidth", True))
    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
