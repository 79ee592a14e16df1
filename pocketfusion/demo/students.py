"""The demo's distilled students: measure a model against the 50-step teacher, and ship it.

    python -m pocketfusion.demo.students measure MODEL [--steps N] [--prompts 240] [--json OUT]
    python -m pocketfusion.demo.students ship SRC --name demo-4step [--prompts 240]

``measure`` generates the held-out prompts at the model's own step count (guidance 4.0, seed 0,
image i at seed i), and reports prompt accuracy per attribute and all five at once, and the
distribution check (Fréchet distance on the shapes classifier's features against renders of the
same prompts; diversity across seeds for fixed prompts). ``ship`` copies a distilled folder to the
bundled name's place (``pocketfusion.checkpoint.BUNDLED``) with those figures in its manifest's
``metrics["evaluation"]``; for ``demo`` (the teacher) only its manifest is rewritten.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def measure(model, *, steps: int | None = None, n_prompts: int | None = None, guidance: float = 4.0, seed: int = 0,
            progress: bool = True) -> dict:
    """Prompt accuracy and the distribution check of ``model`` on the demo's held-out prompts, at its own step count."""
    import time

    from pocketfusion.demo import distribution
    from pocketfusion.demo.suite import demo_suite
    from pocketfusion.generate import GenerateConfig, default_steps, generate_images

    suite = demo_suite()
    steps = steps or default_steps(model)
    cfg = GenerateConfig(steps=steps, guidance=guidance, seed=seed)
    prompts = suite.heldout(n_prompts)
    t0 = time.perf_counter()
    images, _ = generate_images(model, prompts, cfg, progress=progress)
    seconds = time.perf_counter() - t0
    result = suite.evaluate(images, prompts)
    chosen = distribution.diversity_prompts(distribution.DIVERSITY_PROMPTS)
    seeds_images = {p: generate_images(model, [p] * distribution.DIVERSITY_SEEDS, cfg)[0] for p in chosen}
    dist = suite.measure_distribution(images, prompts, seeds_images=seeds_images)
    return {"steps": steps, "guidance": guidance, "seed": seed, "prompts": len(prompts),
            "per_attribute": result["per_attribute"], "all_correct": result["all_correct"], **dist,
            "generate_seconds": round(seconds, 1)}


def ship(src: Path, name: str, evaluation: dict) -> Path:
    """Copy ``src`` to the bundled model ``name``'s folder with ``evaluation`` in its manifest."""
    from pocketfusion import artifact
    from pocketfusion.checkpoint import BUNDLED

    dest = BUNDLED[name]
    m = artifact.load_manifest(src)
    metrics = dict(m.metrics, evaluation=evaluation)
    if Path(src).resolve() == dest.resolve():  # the teacher: figures only
        artifact.write_manifest(dest, stage=m.stage, settings=m.settings, source=m.source, components=m.components,
                                calibration=m.calibration, sampler=m.sampler, metrics=metrics, notes=m.notes)
        return dest
    with artifact.staged_dir(dest) as tmp:
        for item in Path(src).iterdir():
            if item.name == artifact.MANIFEST:
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        artifact.write_manifest(tmp, stage=m.stage, settings=m.settings, source=m.source, components=m.components,
                                calibration=m.calibration, sampler=m.sampler, metrics=metrics, notes=m.notes)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in ("measure", "ship"):
        p = sub.add_parser(cmd)
        p.add_argument("model")
        p.add_argument("--steps", type=int, default=None)
        p.add_argument("--prompts", type=int, default=None, help="held-out prompts (default: all 240)")
        p.add_argument("--json", default=None)
        if cmd == "ship":
            p.add_argument("--name", required=True, choices=["demo", "demo-4step", "demo-1step"])
    args = ap.parse_args(argv)
    from pocketfusion.checkpoint import load_model

    model = load_model(args.model)
    ev = measure(model, steps=args.steps, n_prompts=args.prompts)
    print(json.dumps(ev, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(ev, indent=2) + "\n")
    if args.cmd == "ship":
        print(f"shipped {ship(Path(model.path), args.name, ev)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
