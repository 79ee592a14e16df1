"""The demo's distilled students: measure a model against the 50-step teacher, and ship it.

    python -m pocketfusion.demo.students measure MODEL [--steps N[,N...]] [--prompts 240] [--json OUT]
    python -m pocketfusion.demo.students ship SRC --name demo-4step [--steps 4,2,1] [--prompts 240]
    python -m pocketfusion.demo.students make demo-4step [--work runs/students]   # train (RECIPES), measure, ship
    python -m pocketfusion.demo.students make demo-tiny-decoder                    # the compact VAE (pocketfusion decoder)

``make`` is the one command that reproduces a shipped student: ``pocketfusion distill`` (``pocketfusion decoder``
for ``demo-tiny-decoder``) on the bundled teacher with the recipe below (seed 0; resumable: run it again after an
interruption), then ``ship``.

``measure`` generates the held-out prompts at the model's own step count (or each of ``--steps``;
guidance 4.0, seed 0, image i at seed i), and reports prompt accuracy per attribute and all five at
once, and the distribution check (Fréchet distance on the shapes classifier's features against
renders of the same prompts; diversity across seeds for fixed prompts). ``ship`` copies a distilled
folder to the bundled name's place (``pocketfusion.checkpoint.BUNDLED``) with those figures in its
manifest's ``metrics["evaluation"]`` (the model's own step count; every step count measured under
``evaluation["by_steps"]``, and ``vs_teacher``: the all-five ratio against the bundled teacher's
shipped figure); for ``demo`` (the teacher) only its manifest is rewritten.
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


def measure_steps(model, steps: list[int], *, n_prompts: int | None = None, progress: bool = True) -> dict:
    """``measure`` at each step count; the model's own (or the first) at the top level, all under ``by_steps``."""
    from pocketfusion.generate import default_steps

    own = default_steps(model)
    runs = {n: measure(model, steps=n, n_prompts=n_prompts, progress=progress) for n in steps}
    top = runs.get(own) or runs[steps[0]]
    return {**top, "by_steps": {str(n): {k: v for k, v in r.items() if k != "by_steps"} for n, r in runs.items()}}


def against_teacher(evaluation: dict) -> dict:
    """All-five accuracy per step count as a fraction of the bundled teacher's shipped figure (same prompts, seeds)."""
    from pocketfusion import artifact
    from pocketfusion.checkpoint import BUNDLED

    ref = artifact.load_manifest(BUNDLED["demo"]).metrics.get("evaluation")
    if not ref or ref.get("prompts") != evaluation.get("prompts"):
        return {}
    out = {"teacher_all_correct": ref["all_correct"], "teacher_steps": ref["steps"]}
    for n, r in (evaluation.get("by_steps") or {str(evaluation["steps"]): evaluation}).items():
        out[f"all_correct_ratio_{n}step"] = round(r["all_correct"] / ref["all_correct"], 4)
    return out


def ship(src: Path, name: str, evaluation: dict) -> Path:
    """Copy ``src`` to the bundled model ``name``'s folder with ``evaluation`` in its manifest."""
    from pocketfusion import artifact
    from pocketfusion.checkpoint import BUNDLED

    dest = BUNDLED[name]
    m = artifact.load_manifest(src)
    if name != "demo" and (ratio := against_teacher(evaluation)):
        evaluation = dict(evaluation, vs_teacher=ratio)
    metrics = dict(m.metrics, evaluation=evaluation)
    settings = dict(m.settings)
    if name in RECIPES:  # the one command (its seed: settings["seed"]) that makes these weights
        stage, args = _recipe(name)
        r = RECIPES[name]
        then = f" && pocketfusion decoder OUT --from {r['decoder_from']}" if "decoder_from" in r else ""
        then += "".join(f" && the same with --iterations {n} --resume" for n in r.get("then_resume_to", []))
        settings["command"] = (f"python -m pocketfusion.demo.students make {name}  # = pocketfusion {stage} {r.get('input', 'demo')} "
                               + " ".join(args) + then)
    kw = dict(stage=m.stage, settings=settings, source=m.source, components=m.components, calibration=m.calibration,
              sampler=m.sampler, metrics=metrics, notes=m.notes)
    if Path(src).resolve() == dest.resolve():  # already in place (the teacher): the manifest only
        artifact.write_manifest(dest, **kw)
        return dest
    with artifact.staged_dir(dest) as tmp:
        for item in Path(src).iterdir():
            if item.name == artifact.MANIFEST:
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        artifact.write_manifest(tmp, **kw)
    return dest


# The shipped students: the DistillConfig each was trained with, and the step counts measured when shipping.
RECIPES: dict[str, dict] = {
    "demo-4step": {"distill": ["--steps", "4", "--method", "regression", "--pairs", "2048", "--iterations", "3000", "--batch-size", "64"],
                   "measure": [4, 2, 1]},
    "demo-1step": {"distill": ["--steps", "1", "--method", "regression", "--pairs", "2048", "--iterations", "2000", "--batch-size", "64"],
                   "measure": [1]},
    # the teacher's U-Net and sampler with a compact VAE, measured at the teacher's 50 steps: the original AutoencoderKL
    # pruned to 6/12/16/16 channels a stage (SnapFusion's pruned decoder; 2 GroupNorm groups), wider at the two
    # high-resolution stages than at the two low ones, where onnxruntime's NCHWc convolutions pad to blocks of 16 on
    # AVX-512 (so 16 costs what 8 would); the loss and EMA are DecoderConfig's defaults (MSE + 1.0 L1 + 0.5 edge L1,
    # EMA 0.995). Before it (2026-12-02): --keep 0.4 (6/12/24/24: 35.3 dB, but 2.8x on onnxruntime and ExecuTorch); the
    # AutoencoderTiny (--kind tiny --channels 24 --iterations 3400 --lr 2e-3) lost 8 points of accuracy.
    "demo-tiny-decoder": {"decoder": ["--kind", "pruned", "--widths", "6,12,16,16", "--pairs", "1024", "--iterations", "3000",
                                      "--batch-size", "32", "--lr", "1e-3", "--seed", "0"],
                          "measure": [50]},
}


# pruned (ONNX Runtime latency table, search to half the U-Net's per-call latency), KD-recovered; the teacher's sampler
RECIPES["demo-pruned"] = {"prune": ["--runtime", "onnxruntime", "--latency-budget", "0.55", "--pairs", "2048", "--robust-iterations",
                                    "300", "--iterations", "12000", "--batch-size", "32", "--seed", "0", "--keep-work"],
                          # the shipped one (2026-12-02): 2,048 teacher samples, 12,000 recovery iterations, resumed to
                          # 24,000 (the resume keeps the search and continues the recovery with a cosine schedule over the
                          # new total). The one before it (512 samples, 3,000 -> 6,000 -> 12,000) scored 81.25 %.
                          "then_resume_to": [24000],
                          "measure": [50]}
# the full combination: demo-pruned distilled to 4 steps by the unpruned teacher, then the compact VAE of demo-tiny-decoder
RECIPES["demo-mobile"] = {"input": "demo-pruned",
                          "distill": ["--steps", "4", "--method", "regression", "--teacher", "demo", "--pairs", "1024",
                                      "--iterations", "1500", "--batch-size", "64", "--seed", "0"],
                          "decoder_from": "demo-tiny-decoder", "measure": [4, 2, 1]}


def _recipe(name: str) -> tuple[str, list[str]]:
    """(the ``pocketfusion`` subcommand, its arguments) that trains the bundled model ``name``."""
    stage = next(s for s in ("decoder", "prune", "distill") if s in RECIPES[name])
    return stage, RECIPES[name][stage]


def make(name: str, work: Path, *, progress: bool = True) -> Path:
    """Train the bundled student ``name`` from the bundled teacher by its recipe (``pocketfusion distill``, in a
    child process; resumed when a checkpoint of it is there), measure it and ship it."""
    import subprocess
    import sys

    from pocketfusion.checkpoint import load_model

    out = Path(work) / name
    recipe = RECIPES[name]
    if not (out / "manifest.json").is_file():
        stage, args = _recipe(name)
        every = "250" if stage == "distill" else "100"
        cmd = [sys.executable, "-m", "pocketfusion", stage, recipe.get("input", "demo"), *args, "--checkpoint-every", every,
               "-o", str(out)]
        if (out.parent / f".{out.name}.{stage}-work").is_dir():
            cmd.append("--resume")
        print(" ".join(cmd[1:]), flush=True)
        if (rc := subprocess.run(cmd).returncode) != 0:
            raise SystemExit(rc)
        for total in recipe.get("then_resume_to", []):  # more recovery on the same search, from the kept work directory
            i = cmd.index("--iterations")
            cmd = [*cmd[:i + 1], str(total), *[c for c in cmd[i + 2:] if c != "--resume"], "--resume"]
            print(" ".join(cmd[1:]), flush=True)
            if (rc := subprocess.run(cmd).returncode) != 0:
                raise SystemExit(rc)
    if "decoder_from" in recipe:  # the compact VAE its original already has (pocketfusion decoder --from)
        final = Path(work) / f"{name}-vae"
        if not (final / "manifest.json").is_file():
            cmd = [sys.executable, "-m", "pocketfusion", "decoder", str(out), "--from", recipe["decoder_from"], "-o", str(final)]
            print(" ".join(cmd[1:]), flush=True)
            if (rc := subprocess.run(cmd).returncode) != 0:
                raise SystemExit(rc)
        out = final
    ev = measure_steps(load_model(out), recipe["measure"], progress=progress)
    return ship(out, name, ev)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make")
    p.add_argument("name", choices=list(RECIPES))
    p.add_argument("--work", default="runs/students", help="where the student is trained (default runs/students)")
    for cmd in ("measure", "ship"):
        p = sub.add_parser(cmd)
        p.add_argument("model")
        p.add_argument("--steps", default=None, help="step count(s), comma-separated (default: the model's own)")
        p.add_argument("--prompts", type=int, default=None, help="held-out prompts (default: all 240)")
        p.add_argument("--json", default=None)
        if cmd == "ship":
            from pocketfusion.checkpoint import BUNDLED

            p.add_argument("--name", required=True, choices=list(BUNDLED))
    args = ap.parse_args(argv)
    from pocketfusion.checkpoint import load_model

    if args.cmd == "make":
        print(f"shipped {make(args.name, Path(args.work))}")
        return 0
    model = load_model(args.model)
    steps = [int(n) for n in args.steps.split(",")] if args.steps else None
    ev = measure_steps(model, steps, n_prompts=args.prompts) if steps else measure(model, n_prompts=args.prompts)
    print(json.dumps(ev, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(ev, indent=2) + "\n")
    if args.cmd == "ship":
        print(f"shipped {ship(Path(model.path), args.name, ev)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
