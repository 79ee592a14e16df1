"""Distillation at full size: iterations of ``distill``'s own losses and training loop on a full-size
SD-1.5-architecture U-Net (random weights, ~860 M parameters), each method in its own process.

    python benchmarks/distill_scale.py [--methods regression,lcm] [--iterations 2] [--batch-size 1]
        [--no-gradient-checkpointing] [--device cpu|cuda] [--json OUT]

The student is ``make_student`` of the teacher (the guidance projection added), trained by
``pocketfusion.training.train`` (AdamW, clipping) on ``methods.regression_loss`` /
``methods.lcm_loss`` over random teacher pairs at the real shapes (latents 4x64x64, 77x768 text
states): what a real run computes per iteration, minus the one-off teacher sampling. Reports seconds per
iteration (the first, which includes allocation, and the median of the rest), peak resident memory
of the process (ru_maxrss) and the memory the weights, gradients and optimizer state need by count.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(method: str, iterations: int, batch: int, checkpointing: bool, device: str, size: str = "full") -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from pocketfusion.compress.distill.config import DistillConfig
    from pocketfusion.compress.distill.methods import lcm_loss, regression_loss
    from pocketfusion.compress.distill.student import Schedule, Shadow, lcm_timesteps, make_student
    from pocketfusion.compress.distill.teacher import Conditioning, Pairs
    from pocketfusion.demo import configs
    from pocketfusion.testing.fixtures import FULL_CONFIGS, TINY_CONFIGS
    from pocketfusion.training import TrainConfig, train

    t0 = time.perf_counter()
    torch.manual_seed(0)
    config = (FULL_CONFIGS if size == "full" else TINY_CONFIGS)["sd15"]
    teacher = UNet2DConditionModel(**config).eval().requires_grad_(False).to(device)
    student = make_student(teacher, 256).to(device)
    if checkpointing:
        student.enable_gradient_checkpointing()
    build_s = time.perf_counter() - t0
    cfg = DistillConfig(steps=4, method=method, batch_size=batch, iterations=iterations, checkpoint_every=0,
                        gradient_checkpointing=checkpointing, device=device)
    n = max(8, batch)
    g = torch.Generator().manual_seed(0)
    shape = (n, 4, config["sample_size"], config["sample_size"])
    dim = config["cross_attention_dim"]
    ts = lcm_timesteps(cfg.steps, cfg.teacher_steps)
    pairs = Pairs(torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.arange(n) % 4, torch.full((n,), 4.0),
                  states=torch.randn((n, len(ts) - 1, *shape[1:]), generator=g), state_timesteps=tuple(ts[1:]))
    cond, uncond = Conditioning(torch.randn((4, 77, dim), generator=g)), Conditioning(torch.zeros((1, 77, dim)))
    schedule = Schedule(dict(configs.SCHEDULER), cfg.timestep_scaling)
    if method == "lcm":
        shadow = Shadow(student)
        loss_fn, modules = lcm_loss(student, teacher, shadow, schedule, pairs, cond, uncond, cfg), {"student": student, "target": shadow}
    else:
        loss_fn, modules = regression_loss(student, schedule, pairs, cond, cfg), {"student": student}
    result = train(modules, loss_fn, TrainConfig(iterations=iterations, lr=cfg.lr, grad_clip=cfg.grad_clip, device=device,
                                                 checkpoint_every=0, log_every=1), progress=False)
    first_s, per_iteration_s = result.iteration_seconds()
    params = sum(p.numel() for p in student.parameters())
    by_count = {"teacher_fp32": params * 4, "student_fp32": params * 4, "grads": params * 4, "adamw_state": params * 8,
                "ema_target": params * 4 if method == "lcm" else 0}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device == "cuda":
        peak_gpu = torch.cuda.max_memory_allocated() / 2**30
    return {"method": method, "size": size, "iterations": iterations, "batch_size": batch, "gradient_checkpointing": checkpointing,
            "device": device, "params": params, "build_s": round(build_s, 1), "first_iteration_s": first_s,
            "seconds_per_iteration": per_iteration_s,
            "losses": result.losses, "peak_rss_gib": round(peak, 2),
            **({"peak_gpu_gib": round(peak_gpu, 2)} if device == "cuda" else {}),
            "state_by_count_bytes": by_count, "state_total_by_count_gib": round(sum(by_count.values()) / 2**30, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="regression,lcm")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="full", choices=["full", "tiny"], help="tiny: the test fixture's U-Net (a smoke run)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    ckpt = not args.no_gradient_checkpointing
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.iterations, args.batch_size, ckpt, args.device, args.size)), flush=True)
        return 0
    results = []
    for method in args.methods.split(","):
        cmd = [sys.executable, "-m", "pocketfusion.benchmarks.distill_scale", "--child", method, "--iterations", str(args.iterations),
               "--batch-size", str(args.batch_size), "--device", args.device, "--size", args.size]
        cmd += ["--no-gradient-checkpointing"] if not ckpt else []
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
            res = {"method": method, "status": "failed", "returncode": p.returncode, "reason": tail}
        else:
            res = json.loads(line[7:])
        results.append(res)
        if "seconds_per_iteration" in res:
            print(f"{method:<11} {res['seconds_per_iteration']:7.1f} s/iteration (first {res['first_iteration_s']:.1f} s), "
                  f"peak RSS {res['peak_rss_gib']:.1f} GiB (weights+grads+AdamW{'+EMA target' if method == 'lcm' else ''} "
                  f"{res['state_total_by_count_gib']:.1f} GiB by count), batch {res['batch_size']}, "
                  f"gradient checkpointing {'on' if res['gradient_checkpointing'] else 'off'}")
        else:
            print(f"{method:<11} failed (exit {res['returncode']}): {res['reason']}")
    if args.json:
        from pathlib import Path

        from pocketfusion.artifact import atomic_write_text
        from pocketfusion.runtimes.bench import host_info

        atomic_write_text(Path(args.json), json.dumps({"host": host_info(measure_peak=False), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
