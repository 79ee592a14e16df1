"""The decoder stage: ``compress_decoder(model, DecoderConfig, out)`` distills a compact VAE (diffusers'
``AutoencoderTiny``) from a pipeline's ``AutoencoderKL`` and writes one artifact directory (stage ``decoder``).

The output is a normal diffusers folder that plain diffusers loads and samples (``StableDiffusionPipeline``
decodes ``latents / vae.config.scaling_factor``; the compact VAE's factor is 1: it takes the diffusion latents as
they are, TAESD's convention)::

    vae/             AutoencoderTiny (safetensors), scaling_factor 1
    unet/, text_encoder/, tokenizer/, scheduler/   the source's, as they are
    manifest.json    typed: components, ``sampler`` (the source's, scaling_factor 1); settings
                     (``DecoderConfig.to_dict()``); metrics: decoder PSNR against the original decoder on held-out
                     latents, MACs and parameters of both decoders, the encoder's error, training cost

Data-free: the latents are the teacher's own guided samples (``compress.distill.teacher``, cached in a work
directory beside the output for ``resume``), the targets the original decoder's images of them (and, for the
encoder, the original encoder's latents of those images).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from pocketfusion import artifact
from pocketfusion.compress.decoder.config import DecoderConfig
from pocketfusion.compress.workdir import claim, device_name, frozen
from pocketfusion.errors import UserError
from pocketfusion.validate import resolve_device

logger = logging.getLogger(__name__)

STAGE = "decoder"
_SETTINGS = "decoder.json"
_HELDOUT_SEED_OFFSET = 1_000_003  # held-out latents start from other noise than the training pairs
# settings a resumed run may change without changing what it computes
_RESUME_FREE = ("iterations", "checkpoint_every", "resume", "keep_work", "work_dir", "teacher_batch")
_FORMATS = {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers", "tokenizer": "tokenizer", "scheduler": "scheduler"}


def work_dir(out: str | Path, cfg: DecoderConfig) -> Path:
    """Where checkpoints and cached teacher latents go: ``cfg.work_dir``, else ``.<out name>.decoder-work`` beside ``out``."""
    out = Path(out)
    return Path(cfg.work_dir) if cfg.work_dir is not None else out.parent / f".{out.name}.decoder-work"


def tiny_vae(cfg: DecoderConfig, *, latent_channels: int = 4, out_channels: int = 3):
    """The untrained ``AutoencoderTiny`` of ``cfg`` (scaling_factor 1: it takes the diffusion latents as they are)."""
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        in_channels=out_channels, out_channels=out_channels, latent_channels=latent_channels,
        decoder_block_out_channels=(cfg.channels,) * len(cfg.decoder_blocks), num_decoder_blocks=cfg.decoder_blocks,
        encoder_block_out_channels=(cfg.encoder_channels,) * len(cfg.encoder_blocks), num_encoder_blocks=cfg.encoder_blocks,
        upsampling_scaling_factor=2, scaling_factor=1.0, shift_factor=0.0,
    )


def pruned_shape(config, keep: float, widths: tuple[int, ...] | None = None) -> tuple[list[int], int]:
    """The pruned ``AutoencoderKL``'s ``block_out_channels`` and ``norm_num_groups`` for an original's ``config``:
    ``keep`` of every stage's channels, or ``widths`` as given. Raises UserError on widths the original cannot give."""
    import math

    old = list(config.block_out_channels)
    n_groups = int(config.norm_num_groups)
    if widths is not None:
        widths = [int(w) for w in widths]
        if len(widths) != len(old):
            raise UserError(f"widths={widths}: the VAE has {len(old)} stages ({old}); give one width per stage")
        if bad := [f"{w} > {o}" for w, o in zip(widths, old) if w > o]:
            raise UserError(f"widths={widths}: a stage cannot grow ({', '.join(bad)}; the original's widths are {old})")
        if any(o1 == o2 and w1 != w2 for (o1, w1) in zip(old, widths) for (o2, w2) in zip(old, widths)):
            raise UserError(f"widths={widths}: stages of equal original width ({old}) must keep equal widths (they share "
                            "the residual stream's channels)")
        # the most GroupNorm groups that divide every width and leave each group at least as many channels as the
        # original's narrowest stage had (one channel a group is an instance norm: it drops each channel's mean)
        floor = min(old) // n_groups
        g = math.gcd(*widths)
        groups = max([d for d in range(1, min(g, n_groups) + 1) if g % d == 0 and min(widths) // d >= floor] or [1])
        return widths, groups
    groups = max(1, round(n_groups * keep))
    if all(w % n_groups == 0 for w in old):
        # whole GroupNorm groups: every stage keeps ``groups`` of its groups, each as many channels as before (keep is
        # rounded to a multiple of 1 / norm_num_groups: 0.4 of 8 groups keeps 3, i.e. 0.375 of the channels)
        return [w // n_groups * groups for w in old], groups
    widths = [max(1, round(w * keep)) for w in old]
    # as many channels per GroupNorm group as the original's narrowest stage had: one channel a group would be
    # an instance norm, which throws away each channel's mean (a flat background's colour)
    return widths, math.gcd(groups, *widths)


def pruned_vae(vae, keep: float, widths: tuple[int, ...] | None = None):
    """``vae`` (an ``AutoencoderKL``) with every stage's channels cut to ``keep`` of them, or to ``widths`` (SnapFusion's
    pruned decoder): the same config but ``block_out_channels`` and ``norm_num_groups`` (``pruned_shape``),
    initialised from ``vae``'s channels of largest weight norm.

    One index set per original width: every dimension of that width (a stage's residual stream, a ResNet's inner
    channels, attention, GroupNorm) keeps the same channels, so every residual sum and normalization stays
    consistent; the channels of the largest summed (per-tensor normalized) output norm over the weights that write
    that width are kept. Latent and image channels are kept whole."""
    import torch
    from diffusers import AutoencoderKL

    widths, groups = pruned_shape(vae.config, keep, widths)
    student = AutoencoderKL.from_config(vae.config, block_out_channels=widths, norm_num_groups=groups)
    src, dst = vae.state_dict(), student.state_dict()
    importance: dict[int, torch.Tensor] = {}
    for w in src.values():
        if w.ndim >= 2:
            n = w.detach().float().flatten(1).pow(2).sum(1)
            importance[w.shape[0]] = importance.get(w.shape[0], 0) + n / n.sum().clamp_min(1e-12)
    keep_idx: dict[tuple[int, int], torch.Tensor] = {}

    def index(a: int, b: int) -> torch.Tensor:
        if (a, b) not in keep_idx:
            score = importance.get(a, -torch.arange(a, dtype=torch.float32))
            keep_idx[a, b] = score.topk(b).indices.sort().values
        return keep_idx[a, b]

    new = {}
    for k, v in dst.items():
        w = src[k]
        for d, (a, b) in enumerate(zip(w.shape, v.shape)):
            if a != b:
                w = w.index_select(d, index(a, b))
        new[k] = w.to(v.dtype).clone()
    student.load_state_dict(new)
    return student


def make_student(vae, cfg: DecoderConfig):
    """The compact VAE ``cfg.kind`` describes, before training: ``tiny_vae`` or ``pruned_vae``."""
    if cfg.kind == "pruned":
        return pruned_vae(vae, cfg.keep, cfg.widths)
    return tiny_vae(cfg, latent_channels=vae.config.latent_channels, out_channels=vae.config.out_channels)


def decode(vae, z):
    """``vae``'s images of diffusion latents ``z`` (what the pipeline gives it: ``z / scaling_factor``), in [-1, 1]."""
    return vae.decode(z / float(vae.config.scaling_factor)).sample


def encode(vae, x):
    """``vae``'s diffusion latents of images ``x`` (its latent mean times its scaling factor)."""
    out = vae.encode(x)
    z = out.latents if hasattr(out, "latents") else out.latent_dist.mean
    return z * float(vae.config.scaling_factor)


def compress_decoder(model, cfg: DecoderConfig, out: str | Path, *, progress: bool = True) -> artifact.Manifest:
    """Distill ``model``'s VAE into a compact one (``cfg.kind``) and write the pipeline with it to ``out``.

    Args:
        model: a loaded Stable Diffusion pipeline (``checkpoint.Model``) with an ``AutoencoderKL``, float, not
            distilled (its teacher samples are classifier-free-guided DDIM runs of its U-Net).
        cfg: the stage's options (``DecoderConfig``).
        out: the output directory (written under a temporary name, renamed into place when complete).
        progress: progress bars (teacher sampling; training with loss and ETA).

    Returns:
        The written ``artifact.Manifest``.

    Raises:
        UserError: a bare component, a quantized or distilled model, a VAE that is already compact, a decoder whose
            upsampling the config's stages do not match, a bad output path, no prompts, CUDA asked for but missing,
            or a checkpoint made with other settings (``resume``).

    Example:
        >>> from pocketfusion.checkpoint import load_model
        >>> m = compress_decoder(load_model("demo"), DecoderConfig(iterations=1500), "runs/tiny-decoder")
        >>> m.metrics["decoder"]["psnr_db"]["mean_db"] > 30
        True
    """
    _check_input(model, out, cfg)
    try:
        return _compress(model, cfg, Path(out), progress)
    finally:  # the caller's model stays where load_model put it
        if cfg.device != "cpu":
            for name in ("text_encoder", "unet", "vae"):
                model.components[name].to("cpu")


def _compress(model, cfg: DecoderConfig, out: Path, progress: bool) -> artifact.Manifest:
    import torch

    from pocketfusion.compress.distill import teacher as TE
    from pocketfusion.metrics import image_psnr, output_error

    work = work_dir(out, cfg)
    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    prompts = TE.select_prompts(model, cfg)
    source = artifact.source_ref(model.path)
    unet = frozen(model.unet, device)
    vae = frozen(model.components["vae"], device)
    sf = float(vae.config.scaling_factor)
    cond, uncond = TE.encode(model, prompts, device).cpu(), TE.encode(model, [""], device, negative=True).cpu()
    _claim_work_dir(work, cfg)
    pairs = TE.teacher_pairs(model, unet, cond, uncond, prompts, cfg, device=device, work=work, model_hash=source.sha256,
                             progress=progress)
    heldout = _heldout_latents(model, unet, uncond, prompts, cfg, device, progress)
    sampling_s = time.perf_counter() - t0
    images, enc = _targets(vae, pairs.latents, device)
    student = make_student(vae, cfg).to(device)
    if not cfg.train_encoder:
        for name in ("encoder", "quant_conv"):
            if getattr(student, name, None) is not None:
                getattr(student, name).requires_grad_(False)
    result = _train(student, pairs.latents, images, enc, cfg, work, progress)
    if cfg.ema_decay is not None:  # ship the averaged weights
        student = result.ema_module("vae")
    student = student.cpu().eval()
    train_s_this_run = time.perf_counter() - t0 - sampling_s

    ref_images, ref_enc = _targets(vae, heldout, device)
    with torch.no_grad():
        got = _decode_uint8(student, heldout, torch.device("cpu"))
        got_enc = torch.cat([encode(student, x) for x in ref_images.split(64)])
    psnr = image_psnr(_to_uint8(ref_images), got)
    losses = result.losses
    tail = losses[-max(1, len(losses) // 10):]
    metrics: dict[str, Any] = {
        "decoder": {
            "kind": cfg.kind, "class": type(student).__name__, "heldout_latents": len(heldout),
            "psnr_db": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in psnr.items()},
            "original": _cost(model.components["vae"], heldout[:1] / sf),
            "compact": _cost(student, heldout[:1] / float(student.config.scaling_factor)),
        },
        "encoder": {"trained": cfg.train_encoder, "heldout_images": len(heldout),
                    **{k: round(float(v), 5) for k, v in output_error([ref_enc], [got_enc]).items()}},
        "training": {
            "device": cfg.device, "device_name": device_name(device), "iterations": result.iterations,
            "resumed_from": result.resumed_from, "batch_size": cfg.batch_size, "teacher_pairs": len(pairs),
            "teacher_pairs_cached": pairs.cached, "prompts": len(prompts), "first_loss": losses[0], "final_loss": losses[-1],
            "loss_last_10pct": sum(tail) / len(tail), "teacher_sampling_s": round(pairs.seconds, 2),
            "train_s": round(result.elapsed_s, 2), "train_s_this_run": round(train_s_this_run, 2),
            "wall_s": round(time.perf_counter() - t0, 2),
        },
    }
    d = metrics["decoder"]
    d["macs_ratio"] = round(d["original"]["macs"] / max(1, d["compact"]["macs"]), 3)
    d["params_ratio"] = round(d["original"]["params"] / max(1, d["compact"]["params"]), 3)
    manifest = _write(model, student, cfg, out, source=source, metrics=metrics)
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _heldout_latents(model, unet, uncond, train_prompts: list[str], cfg: DecoderConfig, device, progress: bool):
    """``cfg.n_heldout`` teacher samples at guidance 4 from other noise, on the suite's held-out prompts when it has them."""
    import torch

    from pocketfusion import suite as S
    from pocketfusion.compress.distill import teacher as TE

    found = S.suite_for(model) if cfg.prompts is None else None
    pool = list(found.heldout_prompts) if found is not None and found.heldout_prompts else train_prompts
    prompts = [pool[i % len(pool)] for i in range(cfg.n_heldout)]
    g = torch.Generator().manual_seed(cfg.seed + _HELDOUT_SEED_OFFSET)
    c = unet.config
    size = (c.sample_size, c.sample_size) if isinstance(c.sample_size, int) else tuple(c.sample_size)
    noise = torch.randn((cfg.n_heldout, c.in_channels, *size), generator=g)
    cond = TE.encode(model, prompts, device).cpu()
    latents, _ = TE.sample(model, unet, noise, cond, uncond, torch.full((cfg.n_heldout,), 4.0), cfg.teacher_steps,
                           device=device, batch=cfg.teacher_batch, progress=progress)
    return latents


def _targets(vae, latents, device, batch: int = 64):
    """The original VAE's images of ``latents`` (diffusion latents: ``decode``) in [-1, 1], clamped, and its diffusion
    latents of those images (``encode``: what a compact encoder should return)."""
    import torch

    images, enc = [], []
    with torch.no_grad():
        for z in latents.split(batch):
            x = decode(vae, z.to(device)).clamp(-1, 1)
            images.append(x.float().cpu())
            enc.append(encode(vae, x).float().cpu())
    return torch.cat(images), torch.cat(enc)


def _to_uint8(images) -> list:
    import numpy as np

    x = images.permute(0, 2, 3, 1).numpy()
    return [(np.clip(i / 2 + 0.5, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8) for i in x]


def _decode_uint8(vae, latents, device, batch: int = 64) -> list:
    import torch

    with torch.no_grad():
        return _to_uint8(torch.cat([decode(vae, z.to(device)).float().cpu() for z in latents.split(batch)]))


def _cost(vae, z) -> dict:
    """MACs of one decode of ``z`` (attention matmuls included) and the decoder's parameters."""
    from pocketfusion.macs import count_macs

    params = sum(p.numel() for p in vae.decoder.parameters())
    if getattr(vae, "post_quant_conv", None) is not None:
        params += sum(p.numel() for p in vae.post_quant_conv.parameters())
    return {"class": type(vae).__name__, "macs": int(count_macs(vae.decode, (z.to(vae.device),), {})["total"]), "params": params}


def decoder_loss(y, x, cfg: DecoderConfig):
    """The decoder's loss of images ``y`` against the original decoder's ``x`` (both [N, C, H, W] in [-1, 1]): pixel MSE
    + ``cfg.l1_weight`` x pixel L1 + ``cfg.edge_weight`` x the L1 of their horizontal and vertical differences."""
    import torch.nn.functional as F

    loss = F.mse_loss(y, x)
    if cfg.l1_weight > 0:
        loss = loss + cfg.l1_weight * F.l1_loss(y, x)
    if cfg.edge_weight > 0:
        d = y - x
        edges = (d[..., :, 1:] - d[..., :, :-1]).abs().mean() + (d[..., 1:, :] - d[..., :-1, :]).abs().mean()
        loss = loss + cfg.edge_weight * edges
    return loss


def _train(student, latents, images, enc, cfg: DecoderConfig, work: Path, progress: bool):
    """``decoder_loss`` of the compact decoder against the original decoder's images (+ the encoder's latent MSE)."""
    import torch

    from pocketfusion.training import TrainConfig, train

    tcfg = TrainConfig(iterations=cfg.iterations, lr=cfg.lr, grad_clip=cfg.grad_clip, device=cfg.device, seed=cfg.seed,
                       schedule="cosine", warmup=min(50, cfg.iterations // 10), ema_decay=cfg.ema_decay,
                       ema_warmup=cfg.ema_decay is not None, checkpoint_every=cfg.checkpoint_every, resume=cfg.resume,
                       log_every=max(1, cfg.iterations // 50))
    n = len(latents)

    def loss_fn(batch, ctx):
        idx = torch.randint(n, (min(cfg.batch_size, n),), generator=ctx.rng)
        x = images[idx].to(ctx.device)
        loss = decoder_loss(decode(student, latents[idx].to(ctx.device)), x, cfg)
        if cfg.train_encoder and cfg.encoder_weight > 0:
            loss = loss + cfg.encoder_weight * torch.nn.functional.mse_loss(encode(student, x), enc[idx].to(ctx.device))
        return loss

    return train({"vae": student}, loss_fn, tcfg, ckpt_dir=work / "checkpoints", progress=progress, desc=f"decoder {cfg.kind}")


def _claim_work_dir(work: Path, cfg: DecoderConfig) -> None:
    claim(work, {k: v for k, v in cfg.to_dict().items() if k not in _RESUME_FREE}, resume=cfg.resume, record=_SETTINGS,
          fresh=("checkpoints",))


def _check_input(model, out, cfg: DecoderConfig) -> None:
    if model.kind != "pipeline":
        raise UserError(f"{model.path} is a bare {model.class_name}: the decoder stage needs the full pipeline (its latents "
                        "are the teacher's samples)")
    if model.class_name != "StableDiffusionPipeline":
        raise UserError(f"{model.path} is a {model.class_name}: the decoder stage supports Stable Diffusion 1.x/2.x pipelines")
    if model.quantized:
        raise UserError(f"{model.path} is quantized: compress the decoder of its float source, then quantize")
    if getattr(model.unet.config, "time_cond_proj_dim", None) is not None:
        raise UserError(f"{model.path} is a distilled student: compress the decoder of its teacher, then distill "
                        "(pocketfusion compress --decoder tiny --distill-steps N does both in that order)")
    vae = model.components["vae"]
    if type(vae).__name__ != "AutoencoderKL":
        raise UserError(f"{model.path}: its VAE is already a {type(vae).__name__}; give a pipeline with an AutoencoderKL")
    if model.manifest is not None and "decoder" in model.manifest.metrics:
        raise UserError(f"{model.path}: its VAE is already a compact one (a pruned AutoencoderKL); give its original")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.kind == "tiny" and 2 ** (len(cfg.decoder_blocks) - 1) != factor:
        raise UserError(f"decoder_blocks={list(cfg.decoder_blocks)} has {len(cfg.decoder_blocks)} stages (upsampling "
                        f"{2 ** (len(cfg.decoder_blocks) - 1)}x); {model.path}'s VAE upsamples {factor}x: give "
                        f"{len(vae.config.block_out_channels)} stages")
    if cfg.kind == "tiny" and 2 ** (len(cfg.encoder_blocks) - 1) != factor:
        raise UserError(f"encoder_blocks={list(cfg.encoder_blocks)}: {model.path}'s VAE downsamples {factor}x: give "
                        f"{len(vae.config.block_out_channels)} stages")
    if cfg.kind == "pruned":
        pruned_shape(vae.config, cfg.keep, cfg.widths)  # bad widths: fail before sampling
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    if out.resolve() == Path(model.path).resolve():
        raise UserError(f"output {out} is the source model folder; choose another directory")
    resolve_device(cfg.device)


def _write(model, vae, cfg: DecoderConfig, out: Path, *, source: artifact.SourceRef, metrics: dict) -> artifact.Manifest:
    from pocketfusion.checkpoint import sampler_of

    src = Path(model.path)
    index = json.loads((src / "model_index.json").read_text())
    with artifact.staged_dir(out) as tmp:
        artifact.copy_components(src, tmp, skip=("vae",))
        index["vae"] = ["diffusers", type(vae).__name__]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        vae.save_pretrained(str(tmp / "vae"), safe_serialization=True)
        sampler = dataclasses.replace(sampler_of(model), scaling_factor=float(vae.config.scaling_factor))
        comps = [artifact.Component(n, n, _FORMATS.get(n) or _FORMATS[n.rstrip("_0123456789")]) for n in model.components]
        d = metrics["decoder"]
        cost = f"{d['compact']['macs'] / 1e6:.1f} MMAC per decode vs {d['original']['macs'] / 1e6:.1f} MMAC"
        notes = [f"compact VAE (AutoencoderTiny, width {cfg.channels}, decoder blocks {list(cfg.decoder_blocks)}): {cost}; it "
                 "decodes the diffusion latents as they are (scaling_factor 1)" if cfg.kind == "tiny" else
                 f"compact VAE (the original AutoencoderKL with {_cut(cfg)}: {list(vae.config.block_out_channels)}): "
                 f"{cost}; the original's latent scaling"]
        if not cfg.train_encoder:
            notes.append("the compact encoder was not trained (train_encoder=False): image-to-image would not work")
        return artifact.write_manifest(tmp, stage=STAGE, settings=cfg.to_dict(), source=source, components=comps,
                                       sampler=sampler, metrics=metrics, notes=notes)


def _cut(cfg: DecoderConfig) -> str:
    return "the widths given" if cfg.widths is not None else f"{cfg.keep:g} of each stage's channels"


def summary(manifest: artifact.Manifest) -> str:
    """A few lines on what a decoder manifest records: quality, cost and training."""
    d, e, t = manifest.metrics["decoder"], manifest.metrics["encoder"], manifest.metrics["training"]
    p = d["psnr_db"]
    return "\n".join([
        f"  decoder: {d['class']} {d['compact']['macs'] / 1e6:.1f} MMAC, {d['compact']['params'] / 1e3:.1f} k params "
        f"(original {d['original']['macs'] / 1e6:.1f} MMAC, {d['original']['params'] / 1e3:.1f} k: {d['macs_ratio']:.2f}x fewer MACs)",
        f"  PSNR vs the original decoder on {d['heldout_latents']} held-out latents: mean {p['mean_db']:.2f} dB, min {p['min_db']:.2f} dB",
        f"  encoder: {'trained' if e['trained'] else 'not trained'}, latent SNR {e['snr_db']:.1f} dB vs the original's",
        f"  training: {t['iterations']} iterations of batch {t['batch_size']} on {t['device']} ({t['device_name']}), "
        f"loss {t['first_loss']:.4g} -> {t['final_loss']:.4g}; {t['wall_s']:.1f} s wall ({t['teacher_sampling_s']:.1f} s teacher "
        f"sampling of {t['teacher_pairs']} pairs{', cached' if t['teacher_pairs_cached'] else ''}, {t['train_s']:.1f} s training)",
    ])
