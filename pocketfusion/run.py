"""The main job, end to end, on one model; writes one artifact directory.

load → generate a showcase grid → evaluate prompt accuracy on the held-out prompts → time one
image → export every component to each target whose backend is installed (parity measured) →
write ``grid.png``, ``eval.png``, ``eval.json``, ``export/`` and ``manifest.json``.
Targets whose backend is missing are listed in the manifest with the extra that installs them.
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
    targets: tuple[str, ...] | None = None  # None: every target whose backend is installed

    def __post_init__(self) -> None:
        from pocketfusion.generate import GenerateConfig

        if self.eval_prompts is not None and self.eval_prompts < 1:
            raise UserError(f"--prompts must be >= 1, got {self.eval_prompts}")
        GenerateConfig(steps=self.steps, guidance=self.guidance, seed=self.seed)  # validates
        from pocketfusion.export.base import TARGETS

        bad = [t for t in self.targets or () if t not in TARGETS]
        if bad:
            raise UserError(f"unknown target {', '.join(bad)}; available: {', '.join(TARGETS)}")

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
        exported = _export(model, cfg, tmp / "export")
        if exported is not None:
            metrics["export"] = exported
        artifact.atomic_write_text(tmp / "eval.json", json.dumps(result, indent=2) + "\n")
        artifact.write_manifest(tmp, stage="run", settings=cfg.to_dict(), source=source, metrics=metrics)
    lines = [f"wrote {out}/ (grid.png, eval.png, eval.json, manifest.json)"]
    for attr, acc in metrics["prompt_accuracy"].items():
        lines.append(f"  {attr:<11} {acc:6.1%}")
    lines.append(f"  all five    {metrics['all_attributes_correct']:6.1%}  over {metrics['eval_prompts']} held-out prompts")
    lines.append(f"  {per_image:.2f} s per {cfg.steps}-step CFG image (batch 1, this machine)")
    for key, e in metrics.get("export", {}).get("components", {}).items():
        p = e.get("parity", {})
        err = f"rel err {p['rel']:.1e}" if "rel" in p else f"parity: {p.get('status', 'skipped')}"
        lines.append(f"  export {key:<24} {e['size_bytes'] / 1e6:7.2f} MB  {err}")
    for target, why in metrics.get("export", {}).get("skipped", {}).items():
        lines.append(f"  export {target}: skipped ({why})")
    return "\n".join(lines)


_BACKENDS = {"onnx": ("onnxruntime", "onnx"), "executorch": ("executorch", "executorch"),
             "tflite": ("litert_torch", "tflite"), "coreml": ("coremltools", "coreml")}


def _export(model, cfg: RunConfig, out: Path) -> dict | None:
    import importlib.util

    from pocketfusion.export.api import export_model
    from pocketfusion.export.base import TARGETS, ExportConfig

    wanted = cfg.targets if cfg.targets is not None else TARGETS
    skipped = {t: f"not installed: pip install 'pocketfusion[{_BACKENDS[t][1]}]'" for t in wanted
               if importlib.util.find_spec(_BACKENDS[t][0]) is None}
    targets = tuple(t for t in wanted if t not in skipped)
    if not targets:
        return {"components": {}, "skipped": skipped}
    manifest = export_model(model, ExportConfig(targets=targets), out)
    return {"components": manifest.metrics["components"], "skipped": skipped}
