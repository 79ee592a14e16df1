"""Measure the demo LoRA: concept accuracy (the new position read back on held-out ``north`` prompts) and base prompt
accuracy (held-out base prompts, read with the base metric), for the base model and with the LoRA merged."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def merged_model(lora: str | Path, *, model: str | Path | None = None, scale: float = 1.0):
    """The demo model (or ``model``) with ``lora`` fused at ``scale`` by diffusers (``load_lora_weights`` + ``fuse_lora``).

    The core may not import ``compress``; ``pocketfusion lora`` / ``--lora`` (``compress.lora``) fuse the same weights
    (``tests/demo/test_demo_lora.py`` compares them). Needs ``peft`` (diffusers' LoRA loading).
    """
    from pocketfusion.backends import require
    from pocketfusion.checkpoint import DEMO_MODEL, build_pipeline, load_model

    require("peft", "dev")
    m = load_model(model if model is not None else DEMO_MODEL)
    pipe = build_pipeline(m)  # shares m's component objects: fusing changes them in place
    lora = Path(lora)
    folder, name = (lora, "pytorch_lora_weights.safetensors") if lora.is_dir() else (lora.parent, lora.name)
    pipe.load_lora_weights(str(folder), weight_name=name, adapter_name="demo")  # weight_name: works offline too
    pipe.fuse_lora(lora_scale=scale, adapter_names=["demo"])
    pipe.unload_lora_weights()  # drops the LoRA layers, keeps the fused weights
    return m


def base_subset(n: int) -> list:
    """``n`` held-out base scenes, evenly spaced over the 240 of ``split_scenes``."""
    from pocketfusion.demo.scenes import split_scenes

    _, held = split_scenes()
    n = max(1, min(n, len(held)))
    return [held[round(i * len(held) / n)] for i in range(n)]


def score(model, *, n_base: int = 60, steps: int | None = None, guidance: float = 4.0, seed: int = 0) -> dict:
    """Concept and base prompt accuracy of a loaded demo-compatible ``model``.

    Returns ``{"concept": {...}, "base": {...}, "seconds": s}``: ``concept`` on the held-out LoRA prompts
    (``scenes.split_lora_scenes``; positions read with the LoRA's, ``accuracy`` = the position attribute),
    ``base`` on ``n_base`` held-out base prompts read with the base metric (as every recorded figure).
    ``model`` may also be a ``runtimes.pipeline.RuntimePipeline`` (an export directory in a runtime): image ``i`` at
    seed ``seed + i`` either way. ``steps``: default the model's own (50 for the teacher, 4 for the 4-step student).
    """
    from pocketfusion.demo.metrics import prompt_accuracy
    from pocketfusion.demo.scenes import split_lora_scenes
    from pocketfusion.generate import GenerateConfig, generate_images

    t0 = time.perf_counter()
    _, concept_scenes = split_lora_scenes()
    base_scenes = base_subset(n_base)
    prompts = [s.prompt for s in concept_scenes + base_scenes]
    if hasattr(model, "sessions"):  # a RuntimePipeline
        steps = steps or model.sampler.default_steps
        images = [model(p, steps=steps, guidance=guidance, seed=seed + i) for i, p in enumerate(prompts)]
    else:
        from pocketfusion.generate import default_steps

        steps = steps or default_steps(model)
        images, _ = generate_images(model, prompts, GenerateConfig(steps=steps, guidance=guidance, seed=seed, batch_size=32))
    c = prompt_accuracy(images[: len(concept_scenes)], concept_scenes, lora=True)
    b = prompt_accuracy(images[len(concept_scenes) :], base_scenes)
    positions: dict[str, int] = {}
    for p in c["predictions"]:
        positions[p["read"]["position"]] = positions.get(p["read"]["position"], 0) + 1
    return {
        "concept": {"n": c["n"], "accuracy": c["per_attribute"]["position"], "per_attribute": c["per_attribute"],
                    "all_correct": c["all_correct"], "positions_read": dict(sorted(positions.items()))},
        "base": {"n": b["n"], "per_attribute": b["per_attribute"], "all_correct": b["all_correct"]},
        "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
    }


def measure_lora(lora: str | Path, *, model: str | Path | None = None, scale: float = 1.0, n_base: int = 60, steps: int = 50,
                 guidance: float = 4.0, seed: int = 0, write: bool = False) -> dict:
    """Score the base model and the model with ``lora`` merged at ``scale`` (``score``); same prompts and seeds.

    Args:
        lora: the LoRA file (or a folder with ``pytorch_lora_weights.safetensors``).
        model: the base model (default: the demo model).
        scale: the LoRA's merge scale.
        n_base, steps, guidance, seed: as ``score``.
        write: merge the figures into the JSON beside the file (``north.safetensors`` -> ``north.json``) under
            ``"measured"``.

    Returns:
        ``{"settings": {...}, "base_model": score, "with_lora": score}``.

    Example:
        >>> measure_lora("pocketfusion/demo/lora/north.safetensors")["with_lora"]["concept"]["accuracy"]  # doctest: +SKIP
    """
    from pocketfusion.checkpoint import DEMO_MODEL, load_model

    lora = Path(lora)
    file = lora / "pytorch_lora_weights.safetensors" if lora.is_dir() else lora
    settings = {"lora_sha256": hashlib.sha256(file.read_bytes()).hexdigest(), "scale": scale, "n_base": n_base, "steps": steps,
                "guidance": guidance, "seed": seed, "metric": "pocketfusion.demo.metrics.prompt_accuracy"}
    res = {"settings": settings, "base_model": score(load_model(model if model is not None else DEMO_MODEL), n_base=n_base,
                                                     steps=steps, guidance=guidance, seed=seed)}
    logger.info("base model: concept %.3f, base all-correct %.3f", res["base_model"]["concept"]["accuracy"],
                res["base_model"]["base"]["all_correct"])
    res["with_lora"] = score(merged_model(file, model=model, scale=scale), n_base=n_base, steps=steps, guidance=guidance, seed=seed)
    logger.info("with LoRA: concept %.3f, base all-correct %.3f", res["with_lora"]["concept"]["accuracy"],
                res["with_lora"]["base"]["all_correct"])
    if write:
        record = file.with_suffix(".json")
        data = json.loads(record.read_text()) if record.is_file() else {}
        data["measured"] = res
        record.write_text(json.dumps(data, indent=1) + "\n")
    return res
