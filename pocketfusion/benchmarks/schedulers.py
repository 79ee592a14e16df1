"""Each runtime scheduler against diffusers' own, end to end: images of the runtime pipeline on an export directory
against diffusers' pipeline on the export's source model, same prompts, seeds and steps (PSNR in dB per scheduler).

    python benchmarks/schedulers.py [EXPORT_DIR] [--runtime onnx] [--steps 20] [--prompts 4] [--json OUT]

Without EXPORT_DIR the bundled demo model is exported to ONNX first (into ``--work``). Both sides take the
scheduler by name (``pocketfusion.scheduler_names``): the PyTorch pipeline the diffusers class built from the
model's scheduler config, the runtime pipeline its numpy twin (``runtimes.schedulers``). The images differ only
by the runtime's arithmetic (ONNX Runtime against PyTorch, float32) and the schedulers' float rounding.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def measure(export_dir: Path, runtime: str, names: tuple[str, ...], *, steps: int, n_prompts: int, guidance: float,
            seed: int) -> dict:
    """PSNR (mean, min over the prompts) of the runtime's images against PyTorch's, and seconds per image, per scheduler."""
    import numpy as np

    from pocketfusion import artifact
    from pocketfusion.checkpoint import load_model
    from pocketfusion.generate import GenerateConfig, generate_images
    from pocketfusion.metrics import psnr
    from pocketfusion.runtimes.pipeline import RuntimePipeline
    from pocketfusion.suite import require_suite

    source = load_model(artifact.load_manifest(export_dir).source.path)
    prompts = require_suite(source, "benchmarks/schedulers.py").heldout(n_prompts)
    rows = {}
    for name in names:
        cfg = GenerateConfig(steps=steps, guidance=guidance, seed=seed, scheduler=name)
        pipe = RuntimePipeline(export_dir, runtime, scheduler=name)
        t0 = time.perf_counter()
        images = [pipe(p, steps=steps, guidance=guidance, seed=seed + i) for i, p in enumerate(prompts)]
        runtime_s = (time.perf_counter() - t0) / len(prompts)
        ref, torch_s = generate_images(source, prompts, cfg)
        values = [psnr(a, b) for a, b in zip(images, ref)]
        finite = [v for v in values if np.isfinite(v)]
        rows[name] = {"psnr_db_mean": round(float(np.mean(finite)), 2) if finite else float("inf"),
                      "psnr_db_min": round(float(min(values)), 2), "identical_images": len(values) - len(finite),
                      "runtime_s_per_image": round(runtime_s, 3), "pytorch_s_per_image": round(torch_s, 3)}
    return {"runtime": runtime, "export": str(export_dir), "source": str(source.path), "steps": steps, "guidance": guidance,
            "seed": seed, "prompts": prompts, "schedulers": rows}


def main(argv: list[str] | None = None) -> int:
    from pocketfusion.scheduler_names import NAMES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir", nargs="?", default=None, help="an export directory (default: export the demo model to ONNX)")
    ap.add_argument("--runtime", default="onnx")
    ap.add_argument("--schedulers", default=",".join(NAMES), help="comma-separated names (default: all)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=4, help="held-out prompts of the model's suite (default 4)")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/scheduler-bench")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    names = tuple(n.strip() for n in args.schedulers.split(",") if n.strip())
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        ap.error(f"unknown scheduler(s) {unknown}; known: {', '.join(NAMES)}")
    export_dir = Path(args.export_dir) if args.export_dir else None
    if export_dir is None:
        from pocketfusion.checkpoint import load_model
        from pocketfusion.export.api import export
        from pocketfusion.export.base import ExportConfig

        export_dir = Path(args.work) / "demo-onnx"
        export(load_model(None), ExportConfig(targets=("onnx",)), export_dir, progress=False)
    out = measure(export_dir, args.runtime, names, steps=args.steps, n_prompts=args.prompts, guidance=args.guidance, seed=args.seed)
    print(f"{'scheduler':<16} {'PSNR mean':>9} {'PSNR min':>9}  runtime s/img  pytorch s/img   ({args.runtime}, {args.steps} steps)")
    for name, r in out["schedulers"].items():
        print(f"{name:<16} {r['psnr_db_mean']:9.2f} {r['psnr_db_min']:9.2f}  "
              f"{r['runtime_s_per_image']:13.3f}  {r['pytorch_s_per_image']:13.3f}")
    if args.json:
        from pocketfusion.artifact import atomic_write_text

        atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
