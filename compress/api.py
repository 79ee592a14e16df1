"""``pocketfusion compress --quant``: calibrate, quantize the U-Net onto its grid, measure, write a folder.

The output is a normal diffusers folder (the source's other components copied as they are, the
U-Net saved with its weights on the grid) plus::

    unet/quantization.json, unet/quantization.safetensors   the grid (compress.grid)
    calibration/                                            the calibration set (static activation quantization)
    manifest.json                                           stage "compress": settings, source, measured figures
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from pocketfusion.errors import UserError

logger = logging.getLogger(__name__)

STAGE = "compress"
IMAGE_PROMPTS = 4  # images compared against the fp32 pipeline when compressing
IMAGE_STEPS = 20


def _with_unet(model, unet, quant=None):
    return dataclasses.replace(model, components={**model.components, "unet": unet}, quant=quant)


def image_psnr(ref: list[np.ndarray], images: list[np.ndarray]) -> dict[str, Any]:
    """PSNR of each image against its reference: mean and min over images, and of the pooled MSE."""
    from pocketfusion.pipeline import psnr

    values = [psnr(a, b) for a, b in zip(images, ref)]
    mse = float(np.mean([np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2) for a, b in zip(images, ref)]))
    finite = [v for v in values if np.isfinite(v)]
    return {
        "mean_db": float(np.mean(finite)) if finite else float("inf"),
        "min_db": float(min(values)),
        "pooled_db": float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse)),
        "identical_images": len(values) - len(finite),
        "per_image_db": [round(v, 2) if np.isfinite(v) else None for v in values],
    }


def quant_metrics(model_fp32, model_q, *, prompts: list[str] | None = None, n_prompts: int = IMAGE_PROMPTS,
                  steps: int = IMAGE_STEPS, guidance: float = 4.0, seed: int = 0, accuracy: int | None = None,
                  reference: dict | None = None) -> dict[str, Any]:
    """Generated-image PSNR of ``model_q`` against ``model_fp32`` (same prompts, same seeds).

    Args:
        model_fp32, model_q: loaded pipelines (``checkpoint.Model``) differing in their U-Net.
        prompts: default: the first ``n_prompts`` held-out prompts of the demo grammar.
        accuracy: also evaluate demo prompt accuracy on this many held-out prompts (both models).
        reference: a dict reused across calls to cache the fp32 images (and accuracy).

    Returns:
        ``{"image_psnr_db": {...}, "prompts", "steps", "guidance", "seed"}`` (+ ``"prompt_accuracy"``).
    """
    from pocketfusion.generate import GenerateConfig, evaluate, generate_images

    if prompts is None:
        from pocketfusion.demo.scenes import split_scenes

        prompts = [s.prompt for s in split_scenes()[1][:n_prompts]]
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
            reference[akey] = evaluate(model_fp32, acc_cfg, accuracy)["per_attribute"]
        out["prompt_accuracy"] = {"quantized": evaluate(model_q, acc_cfg, accuracy)["per_attribute"], "fp32": reference[akey],
                                  "prompts": accuracy, "steps": acc_cfg.steps}
    return out


def _check_bare_unet(cset, unet, where: str) -> None:
    """A saved set fits a bare U-Net when its shapes match and the U-Net reproduces its recorded outputs."""
    import torch

    from pocketfusion.compress.quant._old_quant import stack_feeds, unet_call

    cfg = unet.config
    h, w = (cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    feeds = cset.unet_feeds("all")[:2]
    got = tuple(feeds[0]["sample"].shape[1:])
    D = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
    if got != (cfg.in_channels, h, w) or feeds[0]["encoder_hidden_states"].shape[-1] != D or cset.sdxl != (cfg.addition_embed_type == "text_time"):
        raise UserError(f"calibration set {where} was made for another model (U-Net inputs {got}, this U-Net takes {(cfg.in_channels, h, w)})")
    ref = np.concatenate([o["noise_pred"] for o in cset.unet_outputs("all")[:2]])
    if next(unet.parameters()).dtype != torch.float32:
        import copy as _copy

        unet = _copy.deepcopy(unet).float()
    with torch.no_grad():
        out = unet_call(unet, stack_feeds(feeds)[0]).numpy()
    rel = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-12))
    if rel > 1e-3:
        raise UserError(f"calibration set {where} was made for another U-Net (this one's outputs on its feeds differ by "
                        f"{rel:.1e} relative error); calibrate the pipeline this U-Net belongs to")


def _calibration(model, calib, n_prompts, seed, progress):
    from pocketfusion import calibration as C

    if model.kind == "component":
        if model.class_name != "UNet2DConditionModel":
            raise UserError(f"{model.path} holds a bare {model.class_name}; compress --quant quantizes U-Nets")
        if calib is None or not Path(calib).is_dir():
            raise UserError(f"{model.path} is a bare U-Net: give --calib CALIB_DIR, a calibration set saved from its pipeline "
                            "('pocketfusion calibrate PIPELINE -o DIR'); prompts need the full pipeline to sample")
        cset = C.load(calib)
        _check_bare_unet(cset, model.unet, str(calib))
        if n_prompts is not None and len(cset.prompts) < n_prompts:
            raise UserError(f"calibration set {calib} holds {len(cset.prompts)} prompts, fewer than the {n_prompts} asked for")
        return cset
    return C.resolve(model, calib, n_prompts=n_prompts, seed=seed, progress=progress)


def _copy_pipeline(src: Path, dst: Path) -> None:
    """The source's ``model_index.json`` and every component folder but the U-Net, as they are."""
    import json

    index = json.loads((src / "model_index.json").read_text())
    shutil.copy2(src / "model_index.json", dst / "model_index.json")
    for name in index:
        if name.startswith("_") or name == "unet" or not (src / name).is_dir():
            continue
        shutil.copytree(src / name, dst / name)


def compress(model, out: str | Path, *, scheme: str, method: str = "gptq", calib: str | Path | None = None,
             n_prompts: int | None = None, group_size: int = 32, seed: int = 0, progress: bool = True,
             image_prompts: int = IMAGE_PROMPTS, image_steps: int = IMAGE_STEPS, **quant_kw):
    """Quantize ``model``'s U-Net (``scheme`` w8 / w4 / w8a8 / w8a16) and write the compressed folder ``out``.

    Args:
        model: a loaded pipeline, or a bare U-Net folder (then ``calib`` must be a calibration
            set saved from its pipeline).
        calib: None (the demo model's built-in prompts), a prompts text file, or a saved calibration directory.
        n_prompts: calibration prompts (default: the calibration module's default).
        image_prompts, image_steps: images generated by both pipelines for the PSNR in the manifest (0: skip).
        quant_kw: passed to ``quantize_unet`` (mixed_threshold, size_budget, act_snr_db, ...).

    Returns:
        The written ``artifact.Manifest``.
    """
    import torch

    from pocketfusion import artifact
    from pocketfusion.compress.quant import grid as G
    from pocketfusion.compress.quant import _old_quant as Q

    if scheme not in Q.SCHEMES:
        raise UserError(f"unknown quantization scheme {scheme!r} (choose from {', '.join(Q.SCHEMES)})")
    if method not in Q.METHODS:
        raise UserError(f"unknown quantization method {method!r} (choose from {', '.join(Q.METHODS)})")
    if group_size < 2:
        raise UserError(f"--group-size must be >= 2, got {group_size}")
    if n_prompts is not None and n_prompts < 2:
        raise UserError(f"--num-prompts must be >= 2 (some are held out to measure the error), got {n_prompts}")
    if model.quant is not None:
        raise UserError(f"{model.path} is already quantized ({model.quant.scheme}, {model.quant.method}); compress its float source")
    if model.unet is None:
        raise UserError(f"{model.path} has no U-Net to quantize")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    if out.resolve() == Path(model.path).resolve():
        raise UserError(f"output {out} is the source model folder; choose another directory")
    t0 = time.perf_counter()
    cset = _calibration(model, calib, n_prompts, seed, progress)
    feeds_calib, feeds_held = cset.unet_feeds("calib"), cset.unet_feeds("heldout")
    src_unet = model.unet
    if next(src_unet.parameters()).dtype != torch.float32:
        logger.warning("U-Net is %s: quantizing (and saving) it in float32", next(src_unet.parameters()).dtype)
        src_unet = copy.deepcopy(src_unet).float()
    unet = copy.deepcopy(src_unet)
    t1 = time.perf_counter()
    grid = Q.quantize_unet(unet, feeds_calib, scheme=scheme, method=method, group_size=group_size, progress=progress, **quant_kw)
    quant_seconds = time.perf_counter() - t1
    grid.settings["calibration"] = {"prompts": len(cset.prompts), "calib_feeds": len(feeds_calib), "heldout_feeds": len(feeds_held),
                                    "source": cset.source, "steps": cset.settings.get("steps"),
                                    "timesteps": cset.settings.get("timesteps")}

    # Baselines: RTN onto the same per-layer bits; and, when mixed precision moved layers, RTN uniform.
    bits = Q.WEIGHT_BITS[scheme]
    variants = {method: unet}
    if method != "rtn":
        variants["rtn"] = copy.deepcopy(src_unet)
        Q.rtn_like(variants["rtn"], grid)
    if any(g.bits != bits for g in grid.layers.values()):
        variants[f"rtn_all_{bits}bit"] = copy.deepcopy(src_unet)
        G.rtn_grid(variants[f"rtn_all_{bits}bit"], bits, group_size=group_size)
    held = Q.stack_feeds(feeds_held)
    ref = Q.unet_outputs(src_unet, held)
    unet_err = {k: Q.output_error(ref, Q.unet_outputs(u, held)) for k, u in variants.items()}
    if grid.activations:
        with Q.simulate_activations(unet, grid.activations["layers"]):
            unet_err[f"{method}+{scheme}_activations_simulated"] = Q.output_error(ref, Q.unet_outputs(unet, held))
        if scheme == "w8a8":
            all8 = {n: dict(a, bits=8) for n, a in grid.activations["layers"].items()}
            with Q.simulate_activations(unet, all8):
                unet_err[f"{method}+all_a8_simulated"] = Q.output_error(ref, Q.unet_outputs(unet, held))

    weights = {
        "fp32_bytes": Q.weight_bytes(unet, {}, {})["fp32_bytes"],
        "fp16_scales": Q.weight_bytes(unet, grid.weight_bits, {n: g.group_size for n, g in grid.layers.items()}),
        "fp32_scales": Q.weight_bytes(unet, grid.weight_bits, {n: g.group_size for n, g in grid.layers.items()}, scale_bytes=4),
    }
    counts = {f"int{b}": sum(1 for g in grid.layers.values() if g.bits == b) for b in (8, 4)}
    metrics: dict[str, Any] = {
        "scheme": scheme, "method": method,
        "unet_heldout_error": unet_err,
        "unet_bytes": {"fp32": weights["fp32_bytes"], "stored_fp16_scales": weights["fp16_scales"]["bytes"],
                       "ratio_fp16_scales": weights["fp16_scales"]["ratio"], "stored_fp32_scales": weights["fp32_scales"]["bytes"],
                       "ratio_fp32_scales": weights["fp32_scales"]["ratio"]},
        "layers": {**counts, "per_channel_int4": sum(1 for g in grid.layers.values() if g.bits == 4 and g.group_size is None)},
        "layers_8bit_by_sensitivity": grid.settings.get("mixed_precision", {}).get("kept_8bit", []),
        "activation_fallbacks": grid.activations.get("fallbacks", []) if grid.activations else [],
        "quantize_seconds": round(quant_seconds, 1),
    }
    if model.kind == "pipeline" and image_prompts:
        prompts = [cset.prompts[i] for i in cset.prompt_indices("heldout")][:image_prompts]
        if len(prompts) < image_prompts:
            prompts += [p for p in cset.prompts if p not in prompts][: image_prompts - len(prompts)]
        cache: dict = {}
        images = {}
        for k, u in variants.items():
            r = quant_metrics(model, _with_unet(model, u), prompts=prompts, steps=image_steps, seed=seed, reference=cache)
            images[k] = r["image_psnr_db"]
        if grid.activations:  # what a target with static activation quantization would compute
            with Q.simulate_activations(unet, grid.activations["layers"]):
                r = quant_metrics(model, _with_unet(model, unet), prompts=prompts, steps=image_steps, seed=seed, reference=cache)
            images[f"{method}+{scheme}_activations_simulated"] = r["image_psnr_db"]
        metrics["image_psnr_vs_fp32"] = {"prompts": prompts, "steps": image_steps, "seed": seed, **images}
    metrics["seconds"] = round(time.perf_counter() - t0, 1)

    settings = {"scheme": scheme, "method": method, "group_size": group_size, "seed": seed,
                "calib": str(calib) if calib is not None else None, "n_prompts": n_prompts, **grid.settings}
    settings.pop("mixed_precision", None)
    settings["mixed_precision"] = {k: v for k, v in grid.settings.get("mixed_precision", {}).items() if k != "cost"}
    from pocketfusion import calibration as C

    with artifact.staged_dir(out) as tmp:
        unet_dir = tmp if model.kind == "component" else tmp / "unet"
        if model.kind == "pipeline":
            _copy_pipeline(Path(model.path), tmp)
        unet.save_pretrained(str(unet_dir), safe_serialization=True)
        grid.save(unet_dir, unet)
        C.save(cset, tmp / "calibration")
        manifest = artifact.write_manifest(tmp, stage=STAGE, settings=settings, source=artifact.source_ref(model.path),
                                           metrics=metrics)
    return manifest


def summary(manifest) -> str:
    """A few lines of the measured figures of a compress manifest."""
    m = manifest.metrics
    lines = []
    b = m["unet_bytes"]
    lay = m["layers"]
    lines.append(f"  weights: {b['ratio_fp16_scales']:.1%} of fp32 ({b['stored_fp16_scales'] / 1e6:.2f} MB with fp16 scales, "
                 f"{b['ratio_fp32_scales']:.1%} with fp32 scales); {lay['int8']} layers int8, {lay['int4']} int4")
    for k, e in m["unet_heldout_error"].items():
        lines.append(f"  U-Net held-out {k:<34} rel err {e['rel']:.2e}  SNR {e['snr_db']:5.1f} dB")
    for k, e in m.get("image_psnr_vs_fp32", {}).items():
        if isinstance(e, dict):
            lines.append(f"  images vs fp32 {k:<34} PSNR mean {e['mean_db']:5.1f} dB, min {e['min_db']:5.1f} dB")
    if m["activation_fallbacks"]:
        lines.append(f"  activations: {len(m['activation_fallbacks'])} layer inputs fall back to 16 bits")
    return "\n".join(lines)
