"""A compressed pipeline against its float source: generated-image PSNR (same prompts, same seeds)
and, where the model's prompt suite has an evaluator, prompt accuracy. Shared by the compress stages."""

from __future__ import annotations

import dataclasses
from typing import Any

IMAGE_PROMPTS = 4  # images compared against the fp32 pipeline by default
IMAGE_STEPS = 20


def with_unet(model, unet):
    """``model`` (a ``checkpoint.Model``) with its U-Net replaced by ``unet`` (nothing copied, nothing on disk)."""
    return dataclasses.replace(model, components={**model.components, "unet": unet})


def quant_metrics(model_fp32, model_q, *, prompts: list[str] | None = None, suite=None, n_prompts: int = IMAGE_PROMPTS,
                  steps: int = IMAGE_STEPS, guidance: float = 4.0, seed: int = 0, accuracy: int | None = None,
                  reference: dict | None = None) -> dict[str, Any]:
    """Generated-image PSNR of ``model_q`` against ``model_fp32`` (same prompts, same seeds).

    Args:
        model_fp32, model_q: loaded pipelines (``checkpoint.Model``) differing in their U-Net.
        prompts: default: the first ``n_prompts`` held-out prompts of ``suite``.
        suite: a ``pocketfusion.suite.PromptSuite`` (default: ``suite_for(model_fp32)``, the demo
            grammar's for the demo model); needed when ``prompts`` is None or ``accuracy`` is set.
        accuracy: also evaluate prompt accuracy on this many held-out prompts (both models).
        reference: a dict reused across calls to cache the fp32 images (and accuracy).

    Returns:
        ``{"image_psnr_db": {...}, "prompts", "steps", "guidance", "seed"}`` (+ ``"prompt_accuracy"``).

    Raises:
        UserError: no prompts given and the model has no built-in prompt suite.
    """
    from pocketfusion.generate import GenerateConfig, evaluate, generate_images
    from pocketfusion.metrics import image_psnr
    from pocketfusion.suite import require_suite

    if suite is None and (prompts is None or accuracy):
        suite = require_suite(model_fp32, "measuring images against the fp32 pipeline without prompts")
    if prompts is None:
        prompts = suite.heldout(n_prompts)
    cfg = GenerateConfig(steps=steps, guidance=guidance, seed=seed)
    reference = {} if reference is None else reference
    key = (tuple(prompts), steps, guidance, seed)
    if key not in reference:
        reference[key] = generate_images(model_fp32, prompts, cfg)[0]
    images, _ = generate_images(model_q, prompts, cfg)
    out: dict[str, Any] = {"image_psnr_db": image_psnr(reference[key], images), "prompts": list(prompts), "steps": steps,
                           "guidance": guidance, "seed": seed}
    if accuracy:
        acc_cfg = GenerateConfig(guidance=guidance, seed=seed)
        akey = ("accuracy", accuracy, guidance, seed)
        if akey not in reference:
            reference[akey] = evaluate(model_fp32, acc_cfg, accuracy, suite=suite)["per_attribute"]
        out["prompt_accuracy"] = {"quantized": evaluate(model_q, acc_cfg, accuracy, suite=suite)["per_attribute"], "fp32": reference[akey],
                                  "prompts": accuracy, "steps": acc_cfg.steps}
    return out
