"""Train the demo text-to-image model from a seed.

    python -m pocketfusion.demo.train --out pocketfusion/demo/model            # every phase
    python -m pocketfusion.demo.train --work runs/train --phase vae            # one phase

Phases (each resumes from the previous one's checkpoint in ``--work``):

1. ``vae``     — AutoencoderKL on rendered scenes (MSE + L1 + edge L1 + tiny KL); latent scale = 1/std.
2. ``unet``    — UNet2DConditionModel and the CLIP text encoder, jointly, on VAE latents with the
                 v-prediction objective (plain v-MSE: see ``--weighting``), 10 % prompt dropout (for CFG) and an
                 EMA of the weights.
3. ``package`` — writes a diffusers Stable Diffusion folder (safetensors) plus manifest.json.

Runs on the CPU (about 30 minutes on 2 cores) or a GPU (``--device cuda``). Seeds make it
deterministic on a given device and thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _images_to_tensor(images):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def train_vae(work: Path, *, seed: int, steps: int, batch: int, n_images: int, device: str) -> None:
    import torch
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    from pocketfusion.demo import configs
    from pocketfusion.demo.scenes import make_dataset, split_scenes

    _seed_all(seed)
    train_scenes, _ = split_scenes()
    images, _ = make_dataset(train_scenes, n_images, configs.RESOLUTION, seed=seed)
    x_all = _images_to_tensor(images)
    vae = AutoencoderKL(**configs.VAE).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    log = []
    bar = tqdm(range(steps), desc="vae", mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, 1e-3, 50)
        idx = torch.randint(0, len(x_all), (batch,), generator=gen)
        x = x_all[idx].to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        # Pixel MSE + L1, plus an L1 on image gradients: sharp shape edges decide the shape attribute.
        grad = (rec.diff(dim=2) - x.diff(dim=2)).abs().mean() + (rec.diff(dim=3) - x.diff(dim=3)).abs().mean()
        loss = (rec - x).pow(2).mean() + 0.5 * (rec - x).abs().mean() + 0.5 * grad + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.append({"step": step, "loss": loss.item()})
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(x_all[i : i + 256].to(device)).latent_dist.mean.cpu() for i in range(0, min(len(x_all), 2048), 256)])
    scale = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scale)
    vae.cpu().save_pretrained(work / "vae", safe_serialization=True)
    (work / "vae_log.json").write_text(json.dumps({"log": log, "scaling_factor": scale}, indent=1))
    logger.info("vae done: scaling_factor=%.4f", scale)


def train_unet(
    work: Path, *, seed: int, steps: int, batch: int, n_images: int, device: str, lr: float, weighting: str = "v"
) -> None:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from tqdm import tqdm
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pocketfusion.demo import configs
    from pocketfusion.demo.scenes import make_dataset, split_scenes
    from pocketfusion.demo.tokenizer import write_tokenizer

    _seed_all(seed + 1)
    write_tokenizer(work / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(str(work / "tokenizer"))
    vae = AutoencoderKL.from_pretrained(str(work / "vae")).to(device).eval()
    train_scenes, _ = split_scenes()
    images, prompts = make_dataset(train_scenes, n_images, configs.RESOLUTION, seed=seed + 1)
    x_all = _images_to_tensor(images)
    with torch.no_grad():
        posts = [vae.encode(x_all[i : i + 256].to(device)).latent_dist for i in range(0, len(x_all), 256)]
        mean = torch.cat([p.mean for p in posts])
        std = torch.cat([p.std for p in posts])
    del vae, posts
    ids_all = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    ids_all, empty = ids_all.to(device), empty.to(device)
    scale = AutoencoderKL.load_config(str(work / "vae"))["scaling_factor"]

    te_cfg = CLIPTextConfig(**configs.text_encoder_config(len(tok), tok.bos_token_id, tok.eos_token_id))
    text_encoder = CLIPTextModel(te_cfg).to(device)
    unet = UNet2DConditionModel(**configs.UNET).to(device)
    sched = DDPMScheduler(**{k: v for k, v in configs.SCHEDULER.items() if k not in ("set_alpha_to_one", "steps_offset")})
    alphas = sched.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    gen = torch.Generator().manual_seed(seed + 2)
    log = []
    t0 = time.time()
    bar = tqdm(range(steps), desc="unet", mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, 200)
        idx = torch.randint(0, len(mean), (batch,), generator=gen).to(device)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen).to(device)) * scale
        noise = torch.randn(z0.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen).to(device)
        zt = sched.add_noise(z0, noise, t)
        ids = ids_all[idx].clone()
        drop = (torch.rand(batch, generator=gen) < 0.1).to(device)
        ids[drop] = empty
        ctx = text_encoder(ids).last_hidden_state
        pred = unet(zt, t, ctx).sample
        target = sched.get_velocity(z0, noise, t)
        if weighting == "min-snr":
            w = torch.clamp(snr[t], max=5.0) / (snr[t] + 1)  # min-SNR-5 for v-prediction
        else:
            # Plain v-MSE: an x0-loss weight of SNR + 1, so the high-noise steps, where the layout
            # (the position attribute) is decided, keep weight 1. min-SNR weights them by ~SNR ~ 0,
            # and a model trained so ignores position words.
            w = torch.ones_like(snr[t])
        loss = (w * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema_params, params):
                pe.lerp_(p, 1 - decay)
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.append({"step": step, "loss": loss.item(), "elapsed_s": round(time.time() - t0, 1)})
    ema_unet.cpu().save_pretrained(work / "unet", safe_serialization=True)
    ema_te.cpu().save_pretrained(work / "text_encoder", safe_serialization=True)
    (work / "unet_log.json").write_text(json.dumps({"log": log}, indent=1))


def package(work: Path, out: Path, settings: dict) -> None:
    """Assemble the trained parts into a diffusers folder with a manifest, atomically."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from pocketfusion import artifact
    from pocketfusion.demo import configs

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(str(work / "vae")),
        text_encoder=CLIPTextModel.from_pretrained(str(work / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(str(work / "tokenizer")),
        unet=UNet2DConditionModel.from_pretrained(str(work / "unet")),
        scheduler=DDIMScheduler(**configs.SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    logs = {name: json.loads((work / f"{name}_log.json").read_text()) for name in ("vae", "unet")}
    metrics = {
        "vae_final_loss": logs["vae"]["log"][-1]["loss"],
        "unet_final_loss": logs["unet"]["log"][-1]["loss"],
        "unet_train_seconds": logs["unet"]["log"][-1]["elapsed_s"],
        "vae_scaling_factor": logs["vae"]["scaling_factor"],
    }
    with artifact.staged_dir(out) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        artifact.write_manifest(tmp, stage="train-demo", settings=settings, source=None, metrics=metrics)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/train-demo"))
    ap.add_argument("--out", type=Path, default=Path("pocketfusion/demo/model"))
    ap.add_argument("--phase", choices=["all", "vae", "unet", "package"], default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vae-steps", type=int, default=2500)
    ap.add_argument("--unet-steps", type=int, default=4500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--weighting", choices=["v", "min-snr"], default="v", help="U-Net loss weighting over timesteps")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (results are reproducible per thread count)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a.work.mkdir(parents=True, exist_ok=True)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k not in ("work", "out", "phase")}
    if a.phase in ("all", "vae"):
        train_vae(a.work, seed=a.seed, steps=a.vae_steps, batch=32, n_images=a.images, device=a.device)
    if a.phase in ("all", "unet"):
        train_unet(a.work, seed=a.seed, steps=a.unet_steps, batch=a.batch, n_images=a.images, device=a.device, lr=a.lr, weighting=a.weighting)
    if a.phase in ("all", "package"):
        package(a.work, a.out, settings)


if __name__ == "__main__":
    main()
