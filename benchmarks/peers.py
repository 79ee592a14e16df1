"""Peer comparison: per-call U-Net latency of pocketfusion's exports vs optimum's ONNX and PyTorch eager.

    python benchmarks/peers.py [--model DIR] [--runs 30] [--rounds 5] [--threads 2] [--json out.json]

On the demo model's U-Net (batch 2, the CFG pair), in one process, measured interleaved (round
robin, ``--rounds`` rounds of ``--runs`` calls each) because this machine's speed drifts:

* pocketfusion ExecuTorch (.pte, XNNPACK, rewrites on), TFLite (LiteRT), ONNX (onnxruntime);
* ``optimum-cli export onnx --task text-to-image`` run in onnxruntime;
* PyTorch eager.

Prints a table of medians and ratios to PyTorch eager; writes JSON with every sample.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _optimum_unet(model_dir: Path, work: Path, threads: int):
    import onnxruntime as ort

    out = work / "optimum"
    exe = Path(sys.executable).with_name("optimum-cli")
    cmd = [str(exe), "export", "onnx", "--model", str(model_dir), "--task", "text-to-image", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(out / "unet" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in sess.get_inputs()}

    def run(feed):
        f = {"sample": feed["sample"], "encoder_hidden_states": feed["encoder_hidden_states"]}
        t = np.asarray(feed["timestep"][0])  # optimum exports the timestep as a scalar shared by the CFG pair
        f["timestep"] = t.astype(np.int64) if "int64" in types["timestep"] else t.astype(np.float32)
        return sess.run(None, f)[0]

    return run, seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    import torch

    from pocketfusion import artifact
    from pocketfusion.checkpoint import DEMO_MODEL, load_model
    from pocketfusion.export.api import export_model
    from pocketfusion.export.base import ExportConfig
    from pocketfusion.runtimes.base import load_session

    torch.set_num_threads(a.threads)
    model_dir = a.model or DEMO_MODEL
    model = load_model(model_dir)
    work = Path(tempfile.mkdtemp(prefix="pf-peers-"))
    try:
        exp = work / "export"
        t0 = time.perf_counter()
        m = export_model(model, ExportConfig(targets=("executorch", "tflite", "onnx"), components=("unet",)), exp, progress=False)
        export_s = time.perf_counter() - t0
        comps = m.metrics["components"]
        feed = artifact.read_golden(exp, "unet", index=1)[0]
        runners = {}
        for target, runtime in (("executorch", "executorch"), ("tflite", "litert"), ("onnx", "onnxruntime")):
            s = load_session(exp / comps[f"{target}/unet"]["path"], runtime, threads=a.threads)
            runners[f"pocketfusion {target}"] = (lambda s=s: s.run(feed))
        opt_run, opt_s = _optimum_unet(model_dir, work, a.threads)
        runners["optimum onnx (ORT)"] = lambda: opt_run(feed)
        unet = model.components["unet"]
        args = (torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"]), torch.from_numpy(feed["encoder_hidden_states"]))

        def eager():
            with torch.no_grad():
                return unet(*args, return_dict=False)[0]

        runners["pytorch eager"] = eager
        for fn in runners.values():  # warm-up
            for _ in range(3):
                fn()
        samples = {k: [] for k in runners}
        for _ in range(a.rounds):
            for name, fn in runners.items():
                for _ in range(a.runs):
                    t = time.perf_counter()
                    fn()
                    samples[name].append((time.perf_counter() - t) * 1e3)
        med = {k: statistics.median(v) for k, v in samples.items()}
        base = med["pytorch eager"]
        opt = med["optimum onnx (ORT)"]
        print(f"demo U-Net, batch 2, {a.threads} threads, {a.rounds}x{a.runs} interleaved calls each, {platform.processor() or platform.machine()}")
        print(f"{'runner':<24} {'median ms':>10} {'p90 ms':>8} {'vs eager':>9} {'vs optimum':>11}")
        for k, v in samples.items():
            p90 = float(np.percentile(v, 90))
            print(f"{k:<24} {med[k]:10.2f} {p90:8.2f} {base / med[k]:8.2f}x {opt / med[k]:10.2f}x")
        result = {
            "model": str(model_dir), "threads": a.threads, "runs": a.runs, "rounds": a.rounds,
            "median_ms": med, "speedup_vs_eager": {k: base / v for k, v in med.items()},
            "speedup_vs_optimum": {k: opt / v for k, v in med.items()},
            "export_seconds": {"pocketfusion (3 targets, unet)": export_s, "optimum-cli (whole pipeline)": opt_s},
            "samples_ms": samples,
            "delegation": comps["executorch/unet"].get("delegation"),
        }
        if a.json:
            a.json.write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
