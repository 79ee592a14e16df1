"""Peer comparison: per-call U-Net latency of pocketfusion's exports vs optimum's ONNX and PyTorch eager.

    python benchmarks/peers.py [--model DIR] [--runs 30] [--rounds 5] [--threads 2] [--json out.json]

On the demo model's U-Net (batch 2, the CFG pair), in one process, measured interleaved (round
robin, ``--rounds`` rounds of ``--runs`` calls each) because this machine's speed drifts:

* pocketfusion's export to every target of the backend registry whose runtime runs here
  (ONNX in onnxruntime, ExecuTorch .pte with XNNPACK and rewrites on, TFLite in LiteRT);
* ``optimum-cli export onnx --task text-to-image`` run in onnxruntime;
* PyTorch eager.

Prints a table of medians and ratios to PyTorch eager; writes JSON with every sample.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pocketfusion import artifact, backends
from pocketfusion.runtimes.timing import interleaved_latency

EAGER = "pytorch eager"
OPTIMUM = "optimum onnx (ORT)"


def optimum_unet(model_dir: Path, work: Path, threads: int):
    """``optimum-cli export onnx`` of the pipeline; returns (feed -> U-Net output, export seconds)."""
    out = work / "optimum"
    exe = Path(sys.executable).with_name("optimum-cli")
    cmd = [str(exe), "export", "onnx", "--model", str(model_dir), "--task", "text-to-image", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    return optimum_runner(out / "unet" / "model.onnx", threads), seconds


def optimum_runner(path: Path, threads: int):
    """An onnxruntime session of optimum's U-Net export at ``path``, as a function of one of our U-Net feeds."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    int64 = "int64" in next(i.type for i in sess.get_inputs() if i.name == "timestep")
    return lambda feed: sess.run(None, optimum_feed(feed, int64))[0]


def optimum_feed(feed: dict, timestep_int64: bool) -> dict:
    """One of our U-Net feeds as optimum's U-Net export takes it: the timestep a scalar shared by the CFG pair,
    int64 or float as its graph declares."""
    t = np.asarray(feed["timestep"][0])
    return {"sample": feed["sample"], "encoder_hidden_states": feed["encoder_hidden_states"],
            "timestep": t.astype(np.int64) if timestep_int64 else t.astype(np.float32)}


def export_runners(model, exp: Path, threads: int) -> tuple[dict, dict, artifact.Manifest, float]:
    """pocketfusion's U-Net exported to every target that runs here; returns (runners by name, the
    golden feed they run, the export manifest, export seconds)."""
    from pocketfusion.export.api import export
    from pocketfusion.export.base import ExportConfig
    from pocketfusion.runtimes.base import load_session

    targets = tuple(t for t in backends.TARGETS if backends.backend(t).runs_on_linux)
    t0 = time.perf_counter()
    m = export(model, ExportConfig(targets=targets, components=("unet",)), exp, progress=False)
    seconds = time.perf_counter() - t0
    comps = [m.component("unet", t) for t in targets]
    feed = artifact.read_golden(artifact.resolve_path(exp, comps[0].golden), index=1)[0]
    runners = {}
    for c in comps:
        s = load_session(artifact.resolve_path(exp, c.path), backends.backend(c.target).runtime, threads=threads)
        runners[f"pocketfusion {c.target}"] = lambda s=s: s.run(feed)
    return runners, feed, m, seconds


def eager_runner(unet, feed: dict):
    import torch

    args = (torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"]), torch.from_numpy(feed["encoder_hidden_states"]))

    def eager():
        with torch.no_grad():
            return unet(*args, return_dict=False)[0]

    return eager


def print_table(lat: dict[str, dict], a) -> None:
    base, opt = lat[EAGER]["median_ms"], lat[OPTIMUM]["median_ms"]
    print(f"demo U-Net, batch 2, {a.threads} threads, {a.rounds}x{a.runs} interleaved calls each, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'runner':<24} {'median ms':>10} {'p90 ms':>8} {'vs eager':>9} {'vs optimum':>11}")
    for k, v in lat.items():
        med = v["median_ms"]
        print(f"{k:<24} {med:10.2f} {v['p90_ms']:8.2f} {base / med:8.2f}x {opt / med:10.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/peers.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    import torch

    from pocketfusion.checkpoint import DEMO_MODEL, load_model

    torch.set_num_threads(a.threads)
    model_dir = a.model or DEMO_MODEL
    model = load_model(model_dir)
    work = Path(tempfile.mkdtemp(prefix="pf-peers-"))
    try:
        runners, feed, m, export_s = export_runners(model, work / "export", a.threads)
        n_targets = len(runners)
        opt_run, opt_s = optimum_unet(model_dir, work, a.threads)
        runners[OPTIMUM] = lambda: opt_run(feed)
        runners[EAGER] = eager_runner(model.components["unet"], feed)
        lat = interleaved_latency(runners, runs=a.runs, rounds=a.rounds)
        print_table(lat, a)
        med = {k: v["median_ms"] for k, v in lat.items()}
        et = m.find("unet", "executorch")
        result = {
            "model": str(model_dir), "threads": a.threads, "runs": a.runs, "rounds": a.rounds,
            "median_ms": med, "speedup_vs_eager": {k: med[EAGER] / v for k, v in med.items()},
            "speedup_vs_optimum": {k: med[OPTIMUM] / v for k, v in med.items()},
            "export_seconds": {f"pocketfusion ({n_targets} targets, unet)": export_s, "optimum-cli (whole pipeline)": opt_s},
            "samples_ms": {k: v["samples_ms"] for k, v in lat.items()},
            "delegation": m.metrics.get("components", {}).get(et.key, {}).get("delegation") if et else None,
        }
        if a.json:
            a.json.write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0
