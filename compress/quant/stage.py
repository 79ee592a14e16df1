"""The quantize stage: ``quantize(model, QuantConfig, out)`` calibrates, quantizes the U-Net onto its
grid, measures, and writes one artifact directory (stage ``compress``).

The output is a normal diffusers folder (the source's other components copied as they are, the
U-Net saved with its weights on the grid) plus::

    unet/quantization.json, unet/quantization.safetensors   the grid (``compress.quant.grid``)
    calibration/                                            the calibration set (static activation quantization)
    manifest.json                                           typed: components (the U-Net's ``grid``), ``calibration``,
                                                            ``sampler``; settings (``QuantConfig.to_dict()``), measured figures

For a bare U-Net folder the U-Net and its grid are at the top (component path ``"."``).
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from pocketfusion import artifact, pruning
from pocketfusion.calibration.capture import on_device, upcast_half
from pocketfusion.compress.quant import grid as G
from pocketfusion.compress.quant.activations import simulate_activations
from pocketfusion.compress.quant.config import QuantConfig
from pocketfusion.compress.quant.feeds import batch_limit, stack_feeds, unet_outputs
from pocketfusion.compress.quant.mixed import weight_bytes
from pocketfusion.compress.quant.unet import quantize_unet, rtn_like
from pocketfusion.errors import UserError
from pocketfusion.metrics import output_error
from pocketfusion.steps import StepLog
from pocketfusion.validate import resolve_device

logger = logging.getLogger(__name__)

STAGE = "compress"
CALIBRATION_DIR = "calibration"
_FORMATS = {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers", "tokenizer": "tokenizer", "scheduler": "scheduler"}


def quantize(model, cfg: QuantConfig, out: str | Path, *, progress: bool = True, steps: StepLog | None = None) -> artifact.Manifest:
    """Quantize ``model``'s U-Net as ``cfg`` says and write the compressed artifact ``out``.

    Args:
        model: a loaded pipeline (``checkpoint.Model``), or a bare U-Net folder (then ``cfg.calib``
            must be a calibration set saved from its pipeline).
        cfg: the stage's options (``QuantConfig``).
        out: the output directory (written under a temporary name, renamed into place when complete).
        steps: where each step's wall time and peak RSS go (a caller's log that already holds its own steps, e.g. the
            single-file conversion); they are written to the manifest's ``metrics.steps``.

    With ``cfg.device`` ``cuda`` the model's modules are on the GPU while the stage samples, quantizes and measures
    (put back on the CPU after; the quantized U-Net is written from the CPU).

    Returns:
        The written ``artifact.Manifest``.

    Raises:
        UserError: an already quantized model, no U-Net, a bad output path, ``cuda`` where torch sees none, any
            calibration error, or a run estimated to take longer than ``cfg.max_minutes``.
    """
    _check_input(model, out)
    dev = resolve_device(cfg.device)
    out = Path(out)
    log = steps if steps is not None else StepLog()
    t0 = time.perf_counter()
    upcast_half(model)
    with on_device(model.components.values(), dev):
        unet, grid, cset, settings, metrics = _quantize(model, cfg, log, progress)
    unet.to("cpu")
    return _write(model, unet, grid, cset, out, settings=settings, metrics=metrics, log=log, t0=t0)


def _quantize(model, cfg: QuantConfig, log: StepLog, progress: bool):
    """(quantized U-Net, its grid, the calibration set, settings, metrics): everything but the writing."""
    plan = _plan(model, cfg, progress)
    with log.step("calibrate"):
        cset = _calibration(model, cfg, progress)
    feeds_calib, feeds_held = cset.unet_feeds("calib"), cset.unet_feeds("heldout")
    t1 = time.perf_counter()
    with log.step(f"quantize ({cfg.method} {cfg.scheme})"):
        src_unet = _float_unet(model.unet)
        unet = copy.deepcopy(src_unet)
        grid = quantize_unet(unet, feeds_calib, cfg, progress=progress)
    quant_seconds = time.perf_counter() - t1
    grid.settings["calibration"] = {
        "prompts": len(cset.prompts), "calib_feeds": len(feeds_calib), "heldout_feeds": len(feeds_held),
        "source": cset.source.to_dict() if cset.source is not None else None, "steps": cset.settings.get("steps"),
        "timesteps": cset.settings.get("timesteps"),
    }
    with log.step("held-out error"):
        variants = _baselines(src_unet, unet, grid, cfg)
        metrics: dict[str, Any] = {
            "scheme": cfg.scheme, "method": cfg.method,
            "unet_heldout_error": _heldout_errors(src_unet, unet, variants, grid, cfg, feeds_held),
            **_size_metrics(unet, grid),
            "quantize_seconds": round(quant_seconds, 1),
        }
    if model.kind == "pipeline" and cfg.image_prompts:
        with log.step("images vs fp32"):
            metrics["image_psnr_vs_fp32"] = _image_metrics(model, unet, variants, grid, cfg, cset)
    del variants
    metrics["plan"] = plan.to_dict()
    settings = {**cfg.to_dict(), "calibration_feeds": len(feeds_calib), "calibration": grid.settings["calibration"],
                "mixed_precision": {k: v for k, v in grid.settings.get("mixed_precision", {}).items() if k != "cost"}}
    return unet, grid, cset, settings, metrics


def _plan(model, cfg: QuantConfig, progress: bool):
    """The run's estimate, printed before it starts; refused when over ``cfg.max_minutes``."""
    from pocketfusion.calibration import DEFAULT_PROMPTS
    from pocketfusion.compress.quant.budget import batch_note, capture_budget, estimate

    n_capture, steps, k, n_calib, n_held = capture_budget(model, cfg, DEFAULT_PROMPTS)
    est = estimate(model, cfg, n_capture=n_capture, steps=steps, n_timesteps=k, n_calib_feeds=n_calib, n_held_feeds=n_held)
    note = batch_note(model, cfg)
    text = est.text() + (f"\n{note}" if note else "")
    if cfg.max_minutes is not None and est.total > cfg.max_minutes * 60:
        raise UserError(f"the run is estimated at {est.total / 60:.0f} min, over --max-minutes {cfg.max_minutes:g} "
                        f"({'; '.join(f'{k} {v / 60:.0f} min' for k, v in est.parts.items())}): lower --num-prompts, "
                        f"--calib-steps, --timesteps or --image-prompts{', or use --method rtn' if cfg.method != 'rtn' else ''}")
    if progress:
        print(text, flush=True)
    return est


def _check_input(model, out) -> None:
    if model.quantized:
        g = next(c.grid for c in model.manifest.components if c.grid is not None)
        raise UserError(f"{model.path} is already quantized ({g.scheme}, {g.method}); compress its float source")
    if model.unet is None:
        raise UserError(f"{model.path} has no U-Net to quantize")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    if out.resolve() == Path(model.path).resolve():
        raise UserError(f"output {out} is the source model folder; choose another directory")


def _float_unet(unet):
    import torch

    dtype = next(unet.parameters()).dtype
    if dtype == torch.float32:
        return unet
    logger.warning("U-Net is %s: quantizing (and saving) it in float32", dtype)
    return copy.deepcopy(unet).float()


def _calibration(model, cfg: QuantConfig, progress: bool):
    """The calibration set: captured from ``cfg.calib``'s prompts (or the model's suite), or a saved one."""
    from pocketfusion import calibration as C

    calib = cfg.calib
    if model.kind == "component":
        if model.class_name != "UNet2DConditionModel":
            raise UserError(f"{model.path} holds a bare {model.class_name}; compress --quant quantizes U-Nets")
        if calib is None or not Path(calib).is_dir():
            raise UserError(f"{model.path} is a bare U-Net: give --calib CALIB_DIR, a calibration set saved from its pipeline "
                            "('pocketfusion calibrate PIPELINE -o DIR'); prompts need the full pipeline to sample")
        cset = C.load(calib)
        _check_bare_unet(cset, model.unet, str(calib))
        if cfg.n_prompts is not None and len(cset.prompts) < cfg.n_prompts:
            raise UserError(f"calibration set {calib} holds {len(cset.prompts)} prompts, fewer than the {cfg.n_prompts} asked for")
        return cset
    return C.resolve(model, calib, n_prompts=cfg.n_prompts, steps=cfg.calib_steps, n_timesteps=cfg.calib_timesteps,
                     guidance=cfg.calib_guidance, seed=cfg.seed, progress=progress, device=cfg.device)


def _check_bare_unet(cset, unet, where: str) -> None:
    """A saved set fits a bare U-Net when its shapes match and the U-Net reproduces its recorded outputs."""
    import numpy as np
    import torch

    from pocketfusion.compress.quant.feeds import unet_call

    cfg = unet.config
    h, w = (cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    feeds = cset.unet_feeds("all")[:2]
    got = tuple(feeds[0]["sample"].shape[1:])
    D = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
    sdxl = cfg.addition_embed_type == "text_time"
    if got != (cfg.in_channels, h, w) or feeds[0]["encoder_hidden_states"].shape[-1] != D or cset.sdxl != sdxl:
        raise UserError(f"calibration set {where} was made for another model "
                        f"(U-Net inputs {got}, this U-Net takes {(cfg.in_channels, h, w)})")
    ref = np.concatenate([o["noise_pred"] for o in cset.unet_outputs("all")[:2]])
    if next(unet.parameters()).dtype != torch.float32:
        unet = copy.deepcopy(unet).float()
    with torch.no_grad():
        out = unet_call(unet, stack_feeds(feeds, device=next(unet.parameters()).device)[0]).cpu().numpy()
    rel = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-12))
    if rel > 1e-3:
        raise UserError(f"calibration set {where} was made for another U-Net (this one's outputs on its feeds differ by "
                        f"{rel:.1e} relative error); calibrate the pipeline this U-Net belongs to")


def _baselines(src_unet, unet, grid: G.QuantGrid, cfg: QuantConfig) -> dict[str, Any]:
    """The quantized U-Net, RTN onto the same per-layer bits and, when mixed precision moved layers, RTN uniform."""
    bits = cfg.weight_bits
    variants = {cfg.method: unet}
    if cfg.method != "rtn":
        variants["rtn"] = copy.deepcopy(src_unet)
        rtn_like(variants["rtn"], grid)
    if any(g.bits != bits for g in grid.layers.values()):
        variants[f"rtn_all_{bits}bit"] = copy.deepcopy(src_unet)
        G.rtn_grid(variants[f"rtn_all_{bits}bit"], bits, group_size=cfg.group_size)
    return variants


def _heldout_errors(src_unet, unet, variants, grid: G.QuantGrid, cfg: QuantConfig, feeds_held) -> dict[str, dict]:
    """Each variant's U-Net output error against the float U-Net on the held-out feeds (``metrics.output_error``)."""
    held = stack_feeds(feeds_held, batch_limit(src_unet, cfg.max_batch), next(src_unet.parameters()).device)
    ref = unet_outputs(src_unet, held)
    err = {k: output_error(ref, unet_outputs(u, held)) for k, u in variants.items()}
    if grid.activations:
        with simulate_activations(unet, grid.activations["layers"]):
            err[f"{cfg.method}+{cfg.scheme}_activations_simulated"] = output_error(ref, unet_outputs(unet, held))
        if cfg.scheme == "w8a8":
            all8 = {n: dict(a, bits=8) for n, a in grid.activations["layers"].items()}
            with simulate_activations(unet, all8):
                err[f"{cfg.method}+all_a8_simulated"] = output_error(ref, unet_outputs(unet, held))
    return err


def _size_metrics(unet, grid: G.QuantGrid) -> dict[str, Any]:
    groups = {n: g.group_size for n, g in grid.layers.items()}
    fp16 = weight_bytes(unet, grid.weight_bits, groups)
    fp32 = weight_bytes(unet, grid.weight_bits, groups, scale_bytes=4)
    counts = {f"int{b}": sum(1 for g in grid.layers.values() if g.bits == b) for b in (8, 4)}
    return {
        "unet_bytes": {"fp32": weight_bytes(unet, {}, {})["fp32_bytes"], "stored_fp16_scales": fp16["bytes"],
                       "ratio_fp16_scales": fp16["ratio"], "stored_fp32_scales": fp32["bytes"], "ratio_fp32_scales": fp32["ratio"]},
        "layers": {**counts, "per_channel_int4": sum(1 for g in grid.layers.values() if g.bits == 4 and g.group_size is None)},
        "layers_8bit_by_sensitivity": grid.settings.get("mixed_precision", {}).get("kept_8bit", []),
        "activation_fallbacks": grid.activations.get("fallbacks", []) if grid.activations else [],
    }


def _image_metrics(model, unet, variants, grid: G.QuantGrid, cfg: QuantConfig, cset) -> dict[str, Any]:
    """Image PSNR of each variant's pipeline against the fp32 one, on held-out calibration prompts."""
    from pocketfusion.calibration import capture_steps
    from pocketfusion.compress.evaluate import quant_metrics, with_unet

    n = cfg.image_prompts
    steps = capture_steps(model, cfg.image_steps, 1)[0]
    prompts = [cset.prompts[i] for i in cset.prompt_indices("heldout")][:n]
    if len(prompts) < n:
        prompts += [p for p in cset.prompts if p not in prompts][: n - len(prompts)]
    cache: dict = {}
    kw = {"prompts": prompts, "steps": steps, "guidance": cfg.image_guidance, "seed": cfg.seed, "reference": cache}
    images = {k: quant_metrics(model, with_unet(model, u), **kw)["image_psnr_db"] for k, u in variants.items()}
    if grid.activations:  # what a target with static activation quantization would compute
        with simulate_activations(unet, grid.activations["layers"]):
            images[f"{cfg.method}+{cfg.scheme}_activations_simulated"] = quant_metrics(model, with_unet(model, unet), **kw)["image_psnr_db"]
    return {"prompts": prompts, "steps": steps, "seed": cfg.seed, **images}


def _copy_pipeline(src: Path, dst: Path) -> None:
    """The source's ``model_index.json`` and every component folder but the U-Net, as they are."""
    shutil.copy2(src / "model_index.json", dst / "model_index.json")
    artifact.copy_components(src, dst, skip=("unet",))


def _components(model, grid: G.QuantGrid) -> list[artifact.Component]:
    """The artifact's typed components: the pipeline's folders (the U-Net with its grid), or ``"."`` for a bare U-Net."""
    if model.kind == "component":
        return [artifact.Component("unet", ".", "diffusers", grid=artifact.GridRef(".", grid.scheme, grid.method))]
    comps = []
    for name in model.components:
        fmt = _FORMATS.get(name) or _FORMATS[name.rstrip("_0123456789")]  # text_encoder_2, tokenizer_2 (SDXL)
        ref = artifact.GridRef(name, grid.scheme, grid.method) if name == "unet" else None
        comps.append(artifact.Component(name, name, fmt, grid=ref))
    return comps


def _write(model, unet, grid: G.QuantGrid, cset, out: Path, *, settings: dict, metrics: dict, log: StepLog,
           t0: float) -> artifact.Manifest:
    from pocketfusion import calibration as C
    from pocketfusion.checkpoint import sampler_of

    with artifact.staged_dir(out) as tmp:
        with log.step("write"):
            unet_dir = tmp if model.kind == "component" else tmp / "unet"
            if model.kind == "pipeline":
                _copy_pipeline(Path(model.path), tmp)
            pruning.save_unet(unet, unet_dir)  # a pruned U-Net's pruning.json too
            grid.save(unet_dir, unet)
            C.save(cset, tmp / CALIBRATION_DIR)
            calibration = artifact.CalibrationRef(CALIBRATION_DIR, artifact.content_hash(tmp / CALIBRATION_DIR))
        metrics["steps"] = log.to_list()
        metrics["seconds"] = round(time.perf_counter() - t0, 1)
        return artifact.write_manifest(
            tmp, stage=STAGE, settings=settings, source=artifact.source_ref(model.path), components=_components(model, grid),
            calibration=calibration, sampler=sampler_of(model) if model.kind == "pipeline" else None, metrics=metrics,
        )


def summary(manifest: artifact.Manifest) -> str:
    """A few lines of the measured figures of a compress manifest."""
    m = manifest.metrics
    lines = []
    b = m["unet_bytes"]
    lay = m["layers"]
    lines.append(f"  weights: {b['ratio_fp16_scales']:.1%} of fp32 ({b['stored_fp16_scales'] / 1e6:.2f} MB with fp16 scales, "
                 f"{b['ratio_fp32_scales']:.1%} with fp32 scales); {lay['int8']} layers int8, {lay['int4']} int4")
    for k, e in m["unet_heldout_error"].items():
        lines.append(f"  U-Net held-out {k:<34} rel_rms {e['rel_rms']:.2e}  SNR {e['snr_db']:5.1f} dB")
    for k, e in m.get("image_psnr_vs_fp32", {}).items():
        if isinstance(e, dict):
            lines.append(f"  images vs fp32 {k:<34} PSNR mean {e['mean_db']:5.1f} dB, min {e['min_db']:5.1f} dB")
    if m["activation_fallbacks"]:
        lines.append(f"  activations: {len(m['activation_fallbacks'])} layer inputs fall back to 16 bits")
    if m.get("steps"):
        lines.append(StepLog(m["steps"]).table())
    return "\n".join(lines)
