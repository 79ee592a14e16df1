"""Peers at full size: per-call latency of pocketfusion's export of the full-size SD-1.5-architecture U-Net (random
weights, seed 0, ~860 M parameters) against optimum's ONNX export of the same U-Net, in the same onnxruntime.

    python benchmarks/peers_scale.py [--targets onnx[,tflite,executorch]] [--family sd15] [--threads 2] [--runs 3]
        [--rounds 3] [--work runs/peers-scale] [--profile] [--json OUT]

Each export runs in its own child process (``python -m pocketfusion.benchmarks.peers_scale ours|optimum TARGET
FAMILY OUT``), so its peak RAM is its own and the parent never holds two exporters' copies of the weights:

* ours: ``pocketfusion``'s exporter for TARGET on the U-Net alone (``export.components.unet_spec``, batch 2, 77
  tokens, 64² latent), as ``pocketfusion export`` runs it (parity not re-checked here: ``benchmarks/scale.py`` does);
* optimum: ``optimum.exporters.onnx.export`` with the U-Net config ``optimum-cli export onnx --task text-to-image``
  builds for a Stable Diffusion pipeline's U-Net (``get_diffusion_models_for_export``), at optimum's default opset.

Then one process loads every export (``runtimes.base.load_session`` for ours, an onnxruntime ``InferenceSession``
with the same thread count for optimum's), checks that each gives the same output as optimum's on one golden input
(same weights: a relative error above ``AGREEMENT`` ends the run), and times them interleaved
(``runtimes.timing.interleaved_latency``:
warm-up, then ``--rounds`` round-robin rounds of ``--runs`` calls each). Exports are kept in ``--work`` and reused
when there (delete the folder to export again).

``--profile`` then profiles the two ONNX graphs one after the other with onnxruntime's own per-node profiler
(``benchmarks.unet_profile.profile``: kernel time per operator type, and the share of the call in the compute-bound
Conv / Gemm / MatMul / attention kernels): where a call's time goes in each graph, so what a graph change can gain.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pocketfusion.benchmarks.peers import OPTIMUM
from pocketfusion.benchmarks.scale import peak_rss_gib

SEQ_LEN = 77
ATTENTION_OPS = ("MultiHeadAttention", "Softmax")  # the attention's score kernels, beside unet_profile's GEMM / conv ones
AGREEMENT = 1e-4  # largest relative error of ours against optimum's output (same weights) before the timing is refused


def _unet(family: str):
    from pocketfusion.benchmarks.scale import _build_unet

    return _build_unet(family, "fp32", "none", 32)[0]


def export_ours(target: str, family: str, out: Path) -> dict:
    """pocketfusion's ``target`` export of the full-size U-Net into ``out`` (with the golden feed it was traced on)."""
    from pocketfusion import backends
    from pocketfusion.export.base import ExportConfig
    from pocketfusion.export.components import unet_spec

    unet = _unet(family)
    spec = unet_spec(unet, seq_len=SEQ_LEN)
    spec.golden = spec.golden[:1]
    np.savez(out / "feed.npz", **spec.golden[0])
    path = out / f"unet{backends.backend(target).extension}"
    t0 = time.perf_counter()
    backends.exporter(target).export_component(spec, path, ExportConfig(targets=(target,), check_parity=False))
    return {"path": path.name, "export_seconds": time.perf_counter() - t0}


def export_optimum(family: str, out: Path) -> dict:
    """optimum's ONNX export of the same U-Net (the config its text-to-image export gives a pipeline's U-Net)."""
    from optimum.exporters.onnx import export
    from optimum.exporters.tasks import TasksManager
    from optimum.exporters.utils import _get_diffusers_submodel_type

    unet = _unet(family)
    # what get_diffusion_models_for_export sets on a Stable Diffusion pipeline's U-Net before building its config
    unet.config.requires_aesthetics_score = False
    unet.config.time_cond_proj_dim = None
    unet.config.text_encoder_projection_dim = unet.config.cross_attention_dim
    unet.config.export_model_type = _get_diffusers_submodel_type(unet)
    ctor = TasksManager.get_exporter_config_constructor(model=unet, exporter="onnx", library_name="diffusers",
                                                        task="semantic-segmentation")
    cfg = ctor(unet.config, int_dtype="int64", float_dtype="fp32")
    t0 = time.perf_counter()
    export(model=unet, config=cfg, output=out / "model.onnx", opset=cfg.DEFAULT_ONNX_OPSET)
    return {"path": "model.onnx", "export_seconds": time.perf_counter() - t0, "opset": cfg.DEFAULT_ONNX_OPSET}


def child(argv: list[str]) -> dict:
    """``ours TARGET FAMILY OUT`` or ``optimum onnx FAMILY OUT``: one export in this process."""
    who, target, family, out = argv[0], argv[1], argv[2], Path(argv[3])
    out.mkdir(parents=True, exist_ok=True)
    res = export_ours(target, family, out) if who == "ours" else export_optimum(family, out)
    return {**res, "peak_rss_gib": peak_rss_gib()}


def _run_child(who: str, target: str, family: str, out: Path, timeout: int) -> dict:
    done = out / "result.json"
    if done.is_file():
        return {**json.loads(done.read_text()), "reused": True}
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pocketfusion.benchmarks.peers_scale", who, target, family, str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"error: {who} {target} export failed: {(p.stderr.strip().splitlines() or ['?'])[-1][:300]}")
    res = next(json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT "))
    res["wall_seconds"] = time.perf_counter() - t0
    done.write_text(json.dumps(res, indent=2) + "\n")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/peers_scale.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="onnx", help="pocketfusion targets to time (of onnx, tflite, executorch)")
    ap.add_argument("--family", default="sd15")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per export")
    ap.add_argument("--work", type=Path, default=Path("runs/peers-scale"))
    ap.add_argument("--profile", action="store_true", help="then onnxruntime's per-operator profile of both ONNX graphs")
    ap.add_argument("--profile-runs", type=int, default=2, help="profiled calls per graph (after one warm-up)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    from pocketfusion import backends
    from pocketfusion.benchmarks.peers import optimum_runner
    from pocketfusion.runtimes.base import load_session
    from pocketfusion.runtimes.timing import interleaved_latency

    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    if bad := [t for t in targets if t not in backends.TARGETS or not backends.backend(t).runs_on_linux]:
        ap.error(f"--targets {bad}: not a target that runs here")
    exports = {"optimum": _run_child("optimum", "onnx", a.family, a.work / "optimum", a.timeout)}
    for t in targets:
        exports[t] = _run_child("ours", t, a.family, a.work / f"ours-{t}", a.timeout)
    feed = dict(np.load(a.work / f"ours-{targets[0]}" / "feed.npz"))
    opt = optimum_runner(a.work / "optimum" / exports["optimum"]["path"], a.threads)
    runners = {OPTIMUM: lambda: opt(feed)}
    ref = opt(feed)
    agreement = {}
    for t in targets:
        s = load_session(a.work / f"ours-{t}" / exports[t]["path"], backends.backend(t).runtime, threads=a.threads)
        got = next(iter(s.run(feed).values()))
        agreement[t] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
        if agreement[t] > AGREEMENT:
            raise SystemExit(f"error: pocketfusion {t} and optimum disagree (relative error {agreement[t]:.2e} > {AGREEMENT:g}): "
                             "not timing different functions")
        runners[f"pocketfusion {t}"] = lambda s=s: s.run(feed)
    lat = interleaved_latency(runners, runs=a.runs, rounds=a.rounds, warmup=1, progress=True)
    med = {k: v["median_ms"] for k, v in lat.items()}
    print(f"full-size {a.family} U-Net, batch 2, 64² latent, {a.threads} threads, {a.rounds}x{a.runs} interleaved calls each, "
          f"{platform.processor() or platform.machine()}")
    for k, v in med.items():
        print(f"{k:<26} {v:10.0f} ms  {med[OPTIMUM] / v:5.2f}x optimum's speed")
    result = {"family": a.family, "threads": a.threads, "runs": a.runs, "rounds": a.rounds, "median_ms": med,
              "speedup_vs_optimum": {k: med[OPTIMUM] / v for k, v in med.items()}, "rel_max_vs_optimum": agreement,
              "exports": exports, "samples_ms": {k: v["samples_ms"] for k, v in lat.items()},
              "peak_rss_gib_timing": peak_rss_gib(), "host": platform.processor() or platform.machine()}
    if a.profile and "onnx" in targets:
        del runners, opt, s  # one graph's session at a time from here
        result["profile"] = profile_onnx(a.work / "optimum" / exports["optimum"]["path"], a.work / "ours-onnx" / exports["onnx"]["path"],
                                         feed, threads=a.threads, runs=a.profile_runs)
    if a.json:
        from pocketfusion.artifact import atomic_write_text

        atomic_write_text(a.json, json.dumps(result, indent=2) + "\n")
    return 0


def profile_onnx(optimum_path: Path, ours_path: Path, feed: dict, *, threads: int, runs: int) -> dict:
    """onnxruntime's per-operator profile of optimum's and our ONNX graph (``unet_profile.profile``), printed."""
    import gc

    import onnx

    from pocketfusion.benchmarks.peers import optimum_feed
    from pocketfusion.benchmarks.unet_profile import COMPUTE_OPS, profile

    g = onnx.load(str(optimum_path), load_external_data=False).graph
    int64 = next(i for i in g.input if i.name == "timestep").type.tensor_type.elem_type == onnx.TensorProto.INT64
    del g
    out = {}
    for name, path, f in ((OPTIMUM, optimum_path, optimum_feed(feed, int64)), ("pocketfusion onnx", ours_path, feed)):
        r = profile(Path(path), f, threads=threads, runs=runs, warmup=1)
        gc.collect()
        ops = r["ms_per_op_type"]
        compute = sum(v for k, v in ops.items() if k in COMPUTE_OPS or k in ATTENTION_OPS)
        r["compute_share"] = compute / r["kernel_ms"]
        out[name] = r
        print(f"{name}: {r['nodes']} nodes, kernels {r['kernel_ms']:.0f} ms a profiled call, {100 * r['compute_share']:.0f} % in "
              f"Conv / Gemm / MatMul / attention; unprofiled {r['median_wall_ms']:.0f} ms")
        for k, v in list(ops.items())[:8]:
            print(f"    {k:<22} {v:9.0f} ms  {100 * v / r['kernel_ms']:4.1f} %  x{r['nodes_per_op_type'][k]}")
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("ours", "optimum"):
        print("RESULT " + json.dumps(child(sys.argv[1:])), flush=True)
    else:
        raise SystemExit(main())
