"""Train the demo LoRA: rank-4 PEFT adapters on the demo U-Net's and text encoder's attention, v-prediction loss.

Each batch mixes renders of the new concept (``scenes.split_lora_scenes`` training half) with renders of the base
training prompts (``prior``: their share of the batch, DreamBooth's prior preservation), so the adapters learn the
new word without moving the base vocabulary. The base model's weights are frozen; the loop is
``pocketfusion.training.train`` (progress bar, checkpoints, ``resume``, seeds).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketfusion.errors import UserError

logger = logging.getLogger(__name__)

CONFIG_VERSION = 1
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name: ``load_lora_weights(folder)`` finds it
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention of the U-Net (self and cross)
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # the text encoder's attention


@dataclass(frozen=True)
class LoraTrainConfig:
    """How to train the demo LoRA; validated on construction (``UserError``)."""

    iterations: int = 1500
    batch: int = 32
    rank: int = 4
    alpha: float = 4.0  # scale alpha / rank = 1
    lr: float = 1e-3
    warmup: int = 50
    images: int = 3000  # renders of each kind (concept, prior), jittered like the base model's data
    prior: float = 0.5  # share of each batch drawn from the base training prompts
    text_encoder: bool = True  # adapt the text encoder too (the new word's pieces are untrained embeddings)
    seed: int = 0
    device: str = "cpu"
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.iterations, int) and self.iterations >= 1, f"iterations={self.iterations!r}: an int >= 1"),
            (isinstance(self.batch, int) and self.batch >= 2, f"batch={self.batch!r}: an int >= 2"),
            (isinstance(self.rank, int) and self.rank >= 1, f"rank={self.rank!r}: an int >= 1"),
            (self.alpha > 0, f"alpha={self.alpha!r}: > 0"),
            (self.lr > 0, f"lr={self.lr!r}: > 0"),
            (isinstance(self.warmup, int) and self.warmup >= 0, f"warmup={self.warmup!r}: an int >= 0"),
            (isinstance(self.images, int) and self.images >= 1, f"images={self.images!r}: an int >= 1"),
            (0.0 <= self.prior < 1.0, f"prior={self.prior!r}: in [0, 1)"),
            (self.version == CONFIG_VERSION, f"version={self.version!r}: only {CONFIG_VERSION}"),
        ]
        if problems := [m for ok, m in checks if not ok]:
            raise UserError("LoraTrainConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _latents(vae, images, device):
    """VAE posterior means and stds of uint8 NHWC ``images``."""
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(x), 256):
            post = vae.encode(x[i : i + 256].to(device)).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def train_lora(cfg: LoraTrainConfig, out: str | Path, *, model: str | Path | None = None, work: str | Path | None = None,
               resume: bool = False, checkpoint_every: int = 250, progress: bool = True) -> Path:
    """Train the demo LoRA and write ``out/pytorch_lora_weights.safetensors`` and ``out/lora.json``.

    Args:
        cfg: the training settings.
        out: folder for the LoRA file (diffusers' name and format) and its record (settings, losses, seconds).
        model: the base model folder (default: the shipped demo model).
        work: folder for checkpoints (default ``out/checkpoints``).
        resume: continue from the newest checkpoint in ``work``.
        checkpoint_every: iterations between checkpoints (0: none).
        progress: show the loop's progress bar.

    Returns:
        The path of the LoRA file.

    Raises:
        UserError: a bad setting; MissingBackendError: ``peft`` is not installed (``pip install 'pocketfusion[dev]'``).

    Example:
        >>> train_lora(LoraTrainConfig(iterations=2, batch=4, images=8), "runs/lora-smoke")  # doctest: +SKIP
    """
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from pocketfusion.backends import require
    from pocketfusion.checkpoint import DEMO_MODEL, load_model
    from pocketfusion.demo.configs import RESOLUTION
    from pocketfusion.demo.scenes import make_dataset, split_lora_scenes, split_scenes
    from pocketfusion.training import TrainConfig, seed_everything, train

    peft = require("peft", "dev")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work) if work is not None else out / "checkpoints"
    device = torch.device(cfg.device)
    seed_everything(cfg.seed)
    base = load_model(model if model is not None else DEMO_MODEL)
    base.require_pipeline()
    unet, te, tok, vae = (base.components[k] for k in ("unet", "text_encoder", "tokenizer", "vae"))
    for m in (unet, te, vae):
        m.requires_grad_(False)
        m.to(device).eval()

    lora_train, _ = split_lora_scenes()
    base_train, _ = split_scenes()
    n_prior = round(cfg.batch * cfg.prior)
    n_new = cfg.batch - n_prior
    sets = []
    for scenes_, n, seed in ((lora_train, cfg.images, cfg.seed + 1), (base_train, cfg.images if n_prior else 0, cfg.seed + 2)):
        if not n:
            continue
        images, prompts = make_dataset(scenes_, n, RESOLUTION, seed=seed)
        mean, std = _latents(vae, images, device)
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        sets.append((mean, std, ids.to(device)))
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids.to(device)
    scale = float(vae.config.scaling_factor)
    sched = DDPMScheduler.from_config(base.components["scheduler"].config)

    unet_cfg = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=list(UNET_TARGETS))
    unet.add_adapter(unet_cfg)
    modules = {"unet": unet}
    if cfg.text_encoder:
        te_cfg = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=list(TE_TARGETS))
        te.add_adapter(te_cfg)
        modules["text_encoder"] = te
    for m in modules.values():
        m.train()

    def loss_fn(_, ctx):
        gen, dev = ctx.rng, ctx.device
        z0s, idss = [], []
        for (mean, std, ids), n in zip(sets, (n_new, n_prior)):
            idx = torch.randint(0, len(mean), (n,), generator=gen).to(dev)
            z0s.append((mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen).to(dev)) * scale)
            idss.append(ids[idx])
        z0, ids = torch.cat(z0s), torch.cat(idss).clone()
        b = len(z0)
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen).to(dev)
        ids[(torch.rand(b, generator=gen) < 0.1).to(dev)] = empty  # prompt dropout, as the base model: keeps CFG working
        pred = unet(sched.add_noise(z0, noise, t), t, te(ids).last_hidden_state).sample
        return (pred - sched.get_velocity(z0, noise, t)).pow(2).mean()

    tcfg = TrainConfig(iterations=cfg.iterations, lr=cfg.lr, schedule="cosine", warmup=min(cfg.warmup, cfg.iterations - 1),
                       min_lr_ratio=0.05, weight_decay=0.0, grad_clip=1.0, device=cfg.device, seed=cfg.seed,
                       checkpoint_every=min(checkpoint_every, cfg.iterations) if checkpoint_every else 0, resume=resume)
    t0 = time.perf_counter()
    result = train(modules, loss_fn, tcfg, ckpt_dir=work, desc="demo-lora", progress=progress)
    unet_sd = peft.get_peft_model_state_dict(unet)  # PEFT names: <module>.lora_A.weight / lora_B.weight
    te_sd = peft.get_peft_model_state_dict(te) if cfg.text_encoder else None
    StableDiffusionPipeline.save_lora_weights(
        str(out), unet_lora_layers={k: v.detach().cpu().contiguous() for k, v in unet_sd.items()},
        text_encoder_lora_layers=None if te_sd is None else {k: v.detach().cpu().contiguous() for k, v in te_sd.items()},
        unet_lora_adapter_metadata=unet_cfg.to_dict(),
        text_encoder_lora_adapter_metadata=te_cfg.to_dict() if cfg.text_encoder else None,
        weight_name=WEIGHT_NAME, safe_serialization=True,
    )
    record = {"settings": cfg.to_dict(), "train": tcfg.to_dict(), "iterations": result.iterations,
              "elapsed_s": round(result.elapsed_s, 1), "wall_s": round(time.perf_counter() - t0, 1),
              "final_loss": sum(result.losses[-50:]) / len(result.losses[-50:]),
              "log": [{"iteration": e["iteration"], "loss": round(e["loss"], 5)} for e in result.log]}
    (out / "lora.json").write_text(json.dumps(record, indent=1))
    logger.info("demo LoRA written to %s (%d iterations, %.0f s)", out / WEIGHT_NAME, result.iterations, result.elapsed_s)
    return out / WEIGHT_NAME
