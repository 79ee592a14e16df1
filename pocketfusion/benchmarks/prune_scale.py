"""Pruning at full size: the latency table of a full-size SD-1.5-architecture U-Net (random weights, 64x64
latent, batch 2, 77x768 context) on a runtime of this host, and KD recovery steps on it; each in its own process.

    python benchmarks/prune_scale.py [--parts table,kd] [--runtime onnxruntime] [--iterations 2] [--size full|tiny] [--json OUT]

``table``: every unit (ResNet, attention, the mid-block) exported and timed alone at its real input shapes
(``export.latency.unit_table_alone``: 40-odd small exports instead of one 3.4 GB export per unit), plus the whole
U-Net exported and timed once for the base latency; wall time and peak RSS. ``kd``: iterations of ``prune``'s own
recovery loss (task + output KD + feature KD over every stage) and training loop, the teacher frozen, the student
with the mid-block and one ResNet + attention pair per up stage removed (BK-SDM-small's cut), gradient
checkpointing, batch 1: seconds per iteration and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _unet(size: str):
    import torch
    from diffusers import UNet2DConditionModel

    from pocketfusion.testing.fixtures import FULL_CONFIGS, TINY_CONFIGS

    torch.manual_seed(0)
    return UNet2DConditionModel(**(FULL_CONFIGS if size == "full" else TINY_CONFIGS)["sd15"]).eval()


def table(runtime: str, size: str, runs: int, rounds: int) -> dict:
    from pocketfusion.export.latency import measure_variants, unit_table_alone

    t0 = time.perf_counter()
    unet = _unet(size)
    seq = 77 if size == "full" else 16
    tab = unit_table_alone(unet, runtime, seq_len=seq, runs=runs, rounds=rounds, progress=True)
    t1 = time.perf_counter()
    full = measure_variants(unet, {"full": []}, runtime, seq_len=seq, runs=max(2, runs // 2), rounds=1, warmup=1)["full"]
    tab["base_ms"] = full["median_ms"]
    units = sorted(tab["units"].items(), key=lambda kv: -kv[1]["ms"])
    return {"part": "table", "size": size, "runtime": runtime, "units": len(tab["units"]), "base_ms": full["median_ms"],
            "units_total_ms": tab["shapes"]["units_total_ms"], "table_wall_s": tab["wall_s"],
            "full_export_and_timing_s": round(time.perf_counter() - t1, 1), "wall_s": round(time.perf_counter() - t0, 1),
            "slowest_units": [{"unit": n, "ms": round(u["ms"], 3)} for n, u in units[:8]],
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), "table": tab}


def kd(size: str, iterations: int) -> dict:
    import copy

    import torch

    from pocketfusion import pruning
    from pocketfusion.compress.distill.student import Schedule
    from pocketfusion.compress.distill.teacher import Conditioning, Pairs
    from pocketfusion.compress.prune.config import PruneConfig
    from pocketfusion.compress.prune.stage import _Data, _kd_loss, preset_units
    from pocketfusion.demo import configs
    from pocketfusion.training import TrainConfig, train

    t0 = time.perf_counter()
    teacher = _unet(size).requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    pruning.remove(student, preset_units(teacher, "bk-sdm-small"))
    student.enable_gradient_checkpointing()
    cfg = PruneConfig(batch_size=1, recovery_iterations=iterations, checkpoint_every=0)
    c = teacher.config
    n, g = 8, torch.Generator().manual_seed(0)
    shape = (n, 4, c.sample_size, c.sample_size)
    data = _Data.__new__(_Data)  # the real sampler of training inputs, over random teacher samples at the real shapes
    data.pairs = Pairs(torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.arange(n) % 4, torch.full((n,), 4.0))
    data.cond = Conditioning(torch.randn((4, 77 if size == "full" else 16, c.cross_attention_dim), generator=g))
    data.uncond = Conditioning(torch.zeros((1, data.cond.hidden.shape[1], c.cross_attention_dim)))
    data.schedule, data.cfg = Schedule(dict(configs.SCHEDULER), 1.0), cfg
    loss = _kd_loss(student, teacher, data, cfg, weights=(1.0, 1.0, 1.0))
    build_s = time.perf_counter() - t0
    res = train({"unet": student}, loss, TrainConfig(iterations=iterations, lr=cfg.lr, grad_clip=1.0, checkpoint_every=0, log_every=1),
                progress=False)
    first_s, per_iteration_s = res.iteration_seconds()
    return {"part": "kd", "size": size, "iterations": iterations, "batch_size": 1, "gradient_checkpointing": True,
            "teacher_params": sum(p.numel() for p in teacher.parameters()), "student_params": sum(p.numel() for p in student.parameters()),
            "build_s": round(build_s, 1), "first_iteration_s": first_s,
            "seconds_per_iteration": per_iteration_s,
            "losses": res.losses, "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="table,kd")
    ap.add_argument("--runtime", default="onnxruntime")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", default="full", choices=["full", "tiny"], help="tiny: the test fixture's U-Net (a smoke run)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        out = table(a.runtime, a.size, a.runs, a.rounds) if a.child == "table" else kd(a.size, a.iterations)
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    results = []
    for part in a.parts.split(","):
        cmd = [sys.executable, "-m", "pocketfusion.benchmarks.prune_scale", "--child", part, "--runtime", a.runtime, "--iterations",
               str(a.iterations), "--runs", str(a.runs), "--rounds", str(a.rounds), "--size", a.size]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        res = json.loads(line[7:]) if line else {"part": part, "status": "failed", "returncode": p.returncode,
                                                  "reason": (p.stderr.strip().splitlines() or ["no output"])[-1]}
        results.append(res)
        if part == "table" and line:
            print(f"table ({a.runtime}, {a.size}): {res['units']} units in {res['table_wall_s']:.0f} s "
                  f"(+ {res['full_export_and_timing_s']:.0f} s for the whole U-Net: {res['base_ms']:.1f} ms/call, units alone sum to "
                  f"{res['units_total_ms']:.1f} ms); peak RSS {res['peak_rss_gib']:.1f} GiB")
        elif part == "kd" and line:
            print(f"kd ({a.size}): {res['seconds_per_iteration']:.1f} s/iteration (first {res['first_iteration_s']:.1f} s), "
                  f"peak RSS {res['peak_rss_gib']:.1f} GiB, batch 1, gradient checkpointing")
        else:
            print(f"{part} failed (exit {res['returncode']}): {res['reason']}")
    if a.json:
        from pathlib import Path

        from pocketfusion.artifact import atomic_write_text
        from pocketfusion.runtimes.bench import host_info

        atomic_write_text(Path(a.json), json.dumps({"host": host_info(measure_peak=False), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
