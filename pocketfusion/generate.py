"""Text to image through a loaded checkpoint (PyTorch), and prompt accuracy on a model's prompt suite."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from pocketfusion.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 4.0


@dataclass(frozen=True)
class GenerateConfig:
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    batch_size: int = 16
    scheduler: str | None = None  # a ``scheduler_names.NAMES`` entry built from the model's scheduler config; None: its own

    def __post_init__(self) -> None:
        if self.scheduler is not None:
            from pocketfusion.scheduler_names import check_name

            check_name(self.scheduler)
        if not 1 <= self.steps <= 1000:
            raise UserError(f"--steps must be in 1..1000, got {self.steps}")
        if not 0.0 <= self.guidance <= 50.0:
            raise UserError(f"--guidance must be in 0..50, got {self.guidance}")
        if self.batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def default_steps(model_or_dir) -> int:
    """The step count a model (or an export directory) was made for: its manifest's sampler, else 50."""
    from pathlib import Path

    from pocketfusion import artifact

    if model_or_dir is None:
        from pocketfusion.checkpoint import DEMO_MODEL

        model_or_dir = DEMO_MODEL
    if isinstance(model_or_dir, (str, Path)):
        from pocketfusion.checkpoint import resolve_model_path

        root = resolve_model_path(model_or_dir)
        if (root / artifact.MANIFEST).is_file():
            m = artifact.load_manifest(root, verify=False)
            return m.sampler.default_steps if m.sampler is not None else DEFAULT_STEPS
        return DEFAULT_STEPS
    if model_or_dir.kind != "pipeline":
        return DEFAULT_STEPS
    from pocketfusion.checkpoint import sampler_of

    return sampler_of(model_or_dir).default_steps


def with_scheduler(model, name: str | None):
    """``model`` with its scheduler replaced by the diffusers scheduler ``name`` built from the model's own
    scheduler config (``scheduler_names``); ``model`` itself when ``name`` is None. The model is not changed.

    Raises:
        UserError: an unknown name, or a bare component (no scheduler).
    """
    import dataclasses

    from pocketfusion.scheduler_names import check_name, diffusers_scheduler

    if name is None:
        return model
    check_name(name)
    model.require_pipeline()
    sched = diffusers_scheduler(model.components["scheduler"].config, name)
    return dataclasses.replace(model, components={**model.components, "scheduler": sched})


def generate_images(model, prompts: Sequence[str], cfg: GenerateConfig, *, progress: bool = False) -> tuple[list[np.ndarray], float]:
    """Generate one image per prompt; returns (uint8 HWC images, seconds per image).

    Image ``i`` uses seed ``cfg.seed + i`` whatever the batching, so a prompt's image does not
    depend on which other prompts share its batch. ``cfg.scheduler`` replaces the model's scheduler.
    """
    import torch
    from tqdm import tqdm

    from pocketfusion.checkpoint import build_pipeline

    if not prompts:
        raise UserError("no prompts given")
    pipe = build_pipeline(with_scheduler(model, cfg.scheduler))
    images: list[np.ndarray] = []
    t0 = time.perf_counter()
    batches = range(0, len(prompts), cfg.batch_size)
    for start in tqdm(batches, desc="generate", disable=not progress or len(batches) < 2, unit="batch"):
        chunk = list(prompts[start : start + cfg.batch_size])
        gens = [torch.Generator().manual_seed(cfg.seed + start + i) for i in range(len(chunk))]
        with torch.no_grad():
            out = pipe(chunk, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, generator=gens, output_type="np")
        images.extend((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8) for img in out.images)
    return images, (time.perf_counter() - t0) / len(prompts)


def grid(images: Sequence[np.ndarray], cols: int | None = None):
    """Tile images into one PIL image (``cols`` defaults to a near-square layout)."""
    from PIL import Image

    n = len(images)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    h, w, _ = images[0].shape
    canvas = np.full((rows * h + (rows - 1) * 2, cols * w + (cols - 1) * 2, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = img
    return Image.fromarray(canvas)


def save_png(image, path) -> None:
    """Save a PIL image atomically (temp file + rename)."""
    import io

    from pocketfusion.artifact import atomic_write_bytes

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def time_one_image(model, cfg: GenerateConfig, prompt: str, repeats: int = 3) -> float:
    """Median wall time of generating one image (batch 1), after one warm-up run."""
    generate_images(model, [prompt], cfg)
    times = [generate_images(model, [prompt], cfg)[1] for _ in range(repeats)]
    return float(np.median(times))


def evaluate(model, cfg: GenerateConfig, n_prompts: int | None = None, *, progress: bool = False, suite=None) -> dict:
    """Prompt accuracy of a model on its prompt suite's held-out prompts (``pocketfusion.suite``).

    Returns the suite evaluator's metric dict plus timing and settings. ``n_prompts`` takes the
    first N held-out prompts (default: all; 240 for the demo model).

    Raises:
        UserError: the model has no built-in suite (not the demo grammar) and none is given.
    """
    from pocketfusion.suite import require_suite

    suite = suite or require_suite(model, "eval")
    prompts = suite.heldout(n_prompts)
    images, sec = generate_images(model, prompts, cfg, progress=progress)
    result = suite.evaluate(images, prompts)
    result["settings"] = cfg.to_dict()
    result["seconds_per_image_batched"] = sec
    result["images"] = images  # callers decide whether to save; not JSON
    return result
