"""The main job, end to end, on one model; writes one artifact directory.

Today: load → generate a showcase grid → evaluate prompt accuracy on the held-out prompts →
time one image → write ``grid.png``, ``eval.png``, ``eval.json`` and ``manifest.json``.
Later stages (compress → export → bench) extend this same job.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pocketfusion.errors import UserError


@dataclass(frozen=True)
class RunConfig:
    steps: int = 50
    guidance: float = 4.0
    seed: int = 0
    eval_prompts: int | None = None

    def __post_init__(self) -> None:
        from pocketfusion.generate import GenerateConfig

        if self.eval_prompts is not None and self.eval_prompts < 1:
            raise UserError(f"--prompts must be >= 1, got {self.eval_prompts}")
        GenerateConfig(steps=self.steps, guidance=self.guidance, seed=self.seed)  # validates

    def to_dict(self) -> dict:
        return asdict(self)


def run(model, cfg: RunConfig, out: Path, *, showcase: Sequence[str]) -> str:
    """Run the job and write ``out`` atomically; returns a human-readable summary."""
    from pocketfusion import artifact
    from pocketfusion.generate import GenerateConfig, evaluate, generate_images, grid, save_png, time_one_image
    from pocketfusion.info import describe

    model.require_pipeline()
    gen = GenerateConfig(steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed)
    source = {"path": str(Path(model.path).resolve()), "sha256": artifact.content_hash(model.path)}
    with artifact.staged_dir(out) as tmp:
        images, _ = generate_images(model, list(showcase), gen)
        save_png(grid(images, cols=3), tmp / "grid.png")
        result = evaluate(model, gen, cfg.eval_prompts, progress=True)
        save_png(grid(result.pop("images"), cols=20), tmp / "eval.png")
        per_image = time_one_image(model, gen, showcase[0])
        info = describe(model)
        metrics = {
            "prompt_accuracy": result["per_attribute"],
            "all_attributes_correct": result["all_correct"],
            "eval_prompts": result["n"],
            "seconds_per_image_batch1": per_image,
            "seconds_per_image_batched": result["seconds_per_image_batched"],
            "macs_per_call": {k: v["macs"]["total"] for k, v in info["components"].items()},
            "parameters": {k: v["parameters"] for k, v in info["components"].items()},
        }
        artifact.atomic_write_text(tmp / "eval.json", json.dumps(result, indent=2) + "\n")
        artifact.write_manifest(tmp, stage="run", settings=cfg.to_dict(), source=source, metrics=metrics)
    lines = [f"wrote {out}/ (grid.png, eval.png, eval.json, manifest.json)"]
    for attr, acc in metrics["prompt_accuracy"].items():
        lines.append(f"  {attr:<11} {acc:6.1%}")
    lines.append(f"  all five    {metrics['all_attributes_correct']:6.1%}  over {metrics['eval_prompts']} held-out prompts")
    lines.append(f"  {per_image:.2f} s per {cfg.steps}-step CFG image (batch 1, this machine)")
    return "\n".join(lines)
