"""Each runtime scheduler against diffusers' own, end to end: images of the runtime pipeline on an export directory
against diffusers' pipeline on the export's source model, same prompts, seeds and steps (PSNR in dB per scheduler).

    python benchmarks/schedulers.py [EXPORT_DIR] [--models demo,sd21] [--runtime onnx,executorch,tflite] [--steps 20]
                                    [--prompts 4] [--work runs/scheduler-bench] [--json OUT]

Without EXPORT_DIR each of ``--models`` is exported once, to every runtime's target together, into ``--work``
(an export there of the same source and targets is reused): ``demo`` is the bundled demo model, ``sd21`` the
SD 2.1 architecture fixture (``testing.fixtures.save_tiny_pipeline(.., "sd21")``: linear projections, per-block
heads, upcast attention, random weights) with SD 2.1's own scheduler config (``pocketfusion/configs/sd21``:
DDIM, scaled_linear betas, v-prediction, leading spacing, steps_offset 1). With EXPORT_DIR, that export against
its source model. Both sides take the scheduler by name (``pocketfusion.scheduler_names``) built from the model's
scheduler config: the PyTorch side is diffusers' own pipeline class (``StableDiffusionPipeline``) with the diffusers
scheduler class, the runtime side ``runtimes.pipeline.RuntimePipeline`` with its numpy twin (``runtimes.schedulers``).
The images differ only by the runtime's arithmetic against PyTorch's (float32) and the schedulers' float rounding.
Core ML is not measured here: its runtime needs macOS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

MODELS = ("demo", "sd21")
BAR_DB = 35.0  # issue 13: every scheduler through every runtime at >= 35 dB against diffusers


def build_sd21(out_dir: str | Path) -> Path:
    """The SD 2.1 architecture fixture as a diffusers folder, with SD 2.1's scheduler config (v-prediction)."""
    from pocketfusion.single_file import CONFIGS
    from pocketfusion.testing.fixtures import save_tiny_pipeline

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    save_tiny_pipeline(out, "sd21")
    shutil.copyfile(CONFIGS / "sd21" / "scheduler" / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")
    return out


def source_path(name: str, work: Path) -> Path:
    """The model folder of ``--models`` entry ``name`` (the fixture is (re)built under ``work``)."""
    if name == "demo":
        from pocketfusion.checkpoint import DEMO_MODEL

        return Path(DEMO_MODEL)
    if name == "sd21":
        return build_sd21(work / "sd21")
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def export_once(source: Path, targets: tuple[str, ...], out: Path) -> Path:
    """``out``: an export of ``source`` to ``targets``, reused when one of the same source content is there."""
    from pocketfusion import artifact
    from pocketfusion.checkpoint import load_model
    from pocketfusion.export.api import export
    from pocketfusion.export.base import ExportConfig

    if (out / artifact.MANIFEST).is_file():
        m = artifact.load_manifest(out, verify=False)
        if m.source is not None and m.source.sha256 == artifact.content_hash(source) and set(targets) <= set(m.targets()):
            return out
    export(load_model(source), ExportConfig(targets=targets), out, progress=False)
    return out


def _row(images, ref, torch_s: float, seconds: float) -> dict:
    import numpy as np

    from pocketfusion.metrics import psnr

    values = [psnr(a, b) for a, b in zip(images, ref)]
    finite = [v for v in values if np.isfinite(v)]
    return {"psnr_db_mean": round(float(np.mean(finite)), 2) if finite else float("inf"),
            "psnr_db_min": round(float(min(values)), 2), "identical_images": len(values) - len(finite),
            "reference_std": round(float(np.mean([np.std(r) for r in ref])), 1),  # a flat image would make PSNR easy
            "runtime_s_per_image": round(seconds, 3), "pytorch_s_per_image": round(torch_s, 3)}


def measure_runtimes(export_dir: Path, runtimes: tuple[str, ...], names: tuple[str, ...], *, steps: int, n_prompts: int,
                     guidance: float, seed: int) -> dict:
    """Per runtime, per scheduler: PSNR (mean, min over the prompts) of the runtime's images against diffusers'
    pipeline on the export's source model, and seconds per image (diffusers' images made once per scheduler)."""
    from pocketfusion import artifact, backends
    from pocketfusion.checkpoint import load_model
    from pocketfusion.generate import GenerateConfig, generate_images
    from pocketfusion.runtimes.pipeline import RuntimePipeline
    from pocketfusion.suite import require_suite

    source = load_model(artifact.load_manifest(export_dir).source.path)
    prompts = require_suite(source, "benchmarks/schedulers.py").heldout(n_prompts)
    config = dict(source.components["scheduler"].config)
    refs = {}
    for name in names:
        refs[name] = generate_images(source, prompts, GenerateConfig(steps=steps, guidance=guidance, seed=seed, scheduler=name))
    out = {}
    for runtime in runtimes:
        rows = {}
        for name in names:
            pipe = RuntimePipeline(export_dir, runtime, scheduler=name)
            images, seconds = pipe.generate(prompts, steps=steps, guidance=guidance, seed=seed)
            rows[name] = _row(images, *refs[name], seconds)  # refs: (images, pytorch s/img)
        out[backends.canonical_runtime(runtime)] = {
            "psnr_db_min": min(r["psnr_db_min"] for r in rows.values()), "schedulers": rows}
    return {"source": str(source.path), "export": str(export_dir), "pipeline": source.class_name,
            "scheduler_config": {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"},
            "prompts": prompts, "runtimes": out}


def measure(export_dir: Path, runtime: str, names: tuple[str, ...], *, steps: int, n_prompts: int, guidance: float,
            seed: int) -> dict:
    """One runtime of ``measure_runtimes`` (the previous interface)."""
    res = measure_runtimes(export_dir, (runtime,), names, steps=steps, n_prompts=n_prompts, guidance=guidance, seed=seed)
    (rt, r), = res["runtimes"].items()
    return {"runtime": rt, "export": res["export"], "source": res["source"], "steps": steps, "guidance": guidance,
            "seed": seed, "prompts": res["prompts"], "schedulers": r["schedulers"]}


def main(argv: list[str] | None = None) -> int:
    from pocketfusion import backends
    from pocketfusion.scheduler_names import NAMES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir", nargs="?", default=None, help="an export directory (default: export each of --models)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"without EXPORT_DIR: comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--runtime", default="onnx", help="comma-separated runtimes (onnx, executorch, tflite)")
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
    runtimes = tuple(r.strip() for r in args.runtime.split(",") if r.strip())
    for r in runtimes:
        if r not in backends.RUNTIME_CHOICES:
            ap.error(f"unknown runtime {r!r}; known: {', '.join(backends.RUNTIME_CHOICES)}")
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if set(models) - set(MODELS):
        ap.error(f"unknown model(s) {sorted(set(models) - set(MODELS))}; known: {', '.join(MODELS)}")
    settings = dict(steps=args.steps, n_prompts=args.prompts, guidance=args.guidance, seed=args.seed)
    results = {}
    t0 = time.perf_counter()
    if args.export_dir:
        results[Path(args.export_dir).name] = measure_runtimes(Path(args.export_dir), runtimes, names, **settings)
    else:
        work = Path(args.work)
        targets = tuple(dict.fromkeys(backends.for_runtime(r).target for r in runtimes))
        for m in models:
            export_dir = export_once(source_path(m, work), targets, work / f"{m}-export")
            results[m] = measure_runtimes(export_dir, runtimes, names, **settings)
    print(f"PSNR against diffusers' pipeline, dB (mean / min over {args.prompts} prompts; {args.steps} steps)")
    for m, res in results.items():
        for rt, r in res["runtimes"].items():
            print(f"{m} / {rt}: min {r['psnr_db_min']:.2f}")
            for name, s in r["schedulers"].items():
                print(f"  {name:<16} {s['psnr_db_mean']:7.2f} {s['psnr_db_min']:7.2f}   "
                      f"runtime {s['runtime_s_per_image']:.3f} s/img, pytorch {s['pytorch_s_per_image']:.3f} s/img")
    if args.json:
        from pocketfusion.artifact import atomic_write_text

        out = {"bar_db": BAR_DB, "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "prompts": args.prompts,
               "schedulers": list(names), "not_measured": {"coreml": "Core ML's runtime needs macOS"},
               "wall_s": round(time.perf_counter() - t0, 1), "models": results}
        atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
