"""Train the demo text-to-image model from a seed.

    python -m pocketfusion.demo.train --out pocketfusion/demo/model            # every phase
    python -m pocketfusion.demo.train --work runs/train --phase vae            # one phase

Phases (each starts from the previous one's output in ``--work``):

1. ``vae``     — AutoencoderKL on rendered scenes (MSE + L1 + edge L1 + tiny KL); latent scale = 1/std.
2. ``unet``    — UNet2DConditionModel and the CLIP text encoder, jointly, on VAE latents with the
                 v-prediction objective (plain v-MSE: see ``--weighting``), 10 % prompt dropout (for CFG) and an
                 EMA of the weights.
3. ``package`` — writes a diffusers Stable Diffusion folder (safetensors) plus manifest.json.

Both training phases run ``pocketfusion.training.train``: they checkpoint to ``--work/checkpoints/<phase>``
every ``--checkpoint-every`` iterations and ``--resume`` continues an interrupted phase where it stopped,
with the same result as an uninterrupted run. Runs on the CPU (about 30 minutes on 2 cores) or a GPU
(``--device cuda``). Seeds make it deterministic on a given device and thread count.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def _images_to_tensor(images):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _schedule(steps: int, lr: float, warmup: int, *, device: str, seed: int, resume: bool, checkpoint_every: int, **kw):
    """Linear warmup, then cosine decay to 5 % of ``lr`` (the schedule the shipped model was trained with)."""
    from pocketfusion.training import TrainConfig

    every = min(checkpoint_every, steps) if checkpoint_every else 0
    return TrainConfig(iterations=steps, lr=lr, schedule="cosine", warmup=warmup, min_lr_ratio=0.05, device=device, seed=seed,
                       checkpoint_every=every, resume=resume, **kw)


def train_vae(
    work: Path, *, seed: int, steps: int, batch: int, n_images: int, device: str, resume: bool = False, checkpoint_every: int = 500
) -> None:
    """Train the AutoencoderKL on rendered scenes; saves ``work/vae`` with its latent scaling factor and ``vae_log.json``."""
    import torch
    from diffusers import AutoencoderKL

    from pocketfusion.demo import configs
    from pocketfusion.demo.scenes import make_dataset, split_scenes
    from pocketfusion.training import seed_everything, train

    seed_everything(seed)
    train_scenes, _ = split_scenes()
    images, _ = make_dataset(train_scenes, n_images, configs.RESOLUTION, seed=seed)
    x_all = _images_to_tensor(images)
    vae = AutoencoderKL(**configs.VAE).to(device)

    def sample(ctx):
        idx = torch.randint(0, len(x_all), (batch,), generator=ctx.rng)
        return x_all[idx].to(ctx.device)

    def loss_fn(x, ctx):
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=ctx.rng).to(ctx.device)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        # Pixel MSE + L1, plus an L1 on image gradients: sharp shape edges decide the shape attribute.
        grad = (rec.diff(dim=2) - x.diff(dim=2)).abs().mean() + (rec.diff(dim=3) - x.diff(dim=3)).abs().mean()
        return (rec - x).pow(2).mean() + 0.5 * (rec - x).abs().mean() + 0.5 * grad + 1e-4 * kl

    cfg = _schedule(steps, 1e-3, 50, weight_decay=0.0, device=device, seed=seed, resume=resume, checkpoint_every=checkpoint_every)
    result = train({"vae": vae}, loss_fn, cfg, data=sample, ckpt_dir=work / "checkpoints" / "vae", desc="vae")
    log = [{"step": e["iteration"], "loss": e["loss"]} for e in result.log]
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(x_all[i : i + 256].to(device)).latent_dist.mean.cpu() for i in range(0, min(len(x_all), 2048), 256)])
    scale = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scale)
    vae.cpu().save_pretrained(work / "vae", safe_serialization=True)
    (work / "vae_log.json").write_text(json.dumps({"log": log, "scaling_factor": scale}, indent=1))
    logger.info("vae done: scaling_factor=%.4f", scale)


def _encode_dataset(work: Path, *, seed: int, n_images: int, device: str):
    """Rendered scenes as VAE posterior means/stds, prompt token ids, the empty prompt's ids and the latent scale."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from pocketfusion.demo import configs
    from pocketfusion.demo.scenes import make_dataset, split_scenes
    from pocketfusion.demo.tokenizer import write_tokenizer

    write_tokenizer(work / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(str(work / "tokenizer"))
    vae = AutoencoderKL.from_pretrained(str(work / "vae")).to(device).eval()
    train_scenes, _ = split_scenes()
    images, prompts = make_dataset(train_scenes, n_images, configs.RESOLUTION, seed=seed)
    x_all = _images_to_tensor(images)
    with torch.no_grad():
        posts = [vae.encode(x_all[i : i + 256].to(device)).latent_dist for i in range(0, len(x_all), 256)]
        mean = torch.cat([p.mean for p in posts])
        std = torch.cat([p.std for p in posts])
    ids_all = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    scale = AutoencoderKL.load_config(str(work / "vae"))["scaling_factor"]
    return tok, mean, std, ids_all.to(device), empty.to(device), scale


def train_unet(
    work: Path, *, seed: int, steps: int, batch: int, n_images: int, device: str, lr: float, weighting: str = "v",
    resume: bool = False, checkpoint_every: int = 500,
) -> None:
    """Train the U-Net and text encoder jointly (v-MSE, 10 % prompt dropout, EMA); saves their EMA weights to ``work``."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pocketfusion.demo import configs
    from pocketfusion.training import seed_everything, train

    seed_everything(seed + 1)
    tok, mean, std, ids_all, empty, scale = _encode_dataset(work, seed=seed + 1, n_images=n_images, device=device)
    te_cfg = CLIPTextConfig(**configs.text_encoder_config(len(tok), tok.bos_token_id, tok.eos_token_id))
    text_encoder = CLIPTextModel(te_cfg).to(device)
    unet = UNet2DConditionModel(**configs.UNET).to(device)
    sched = DDPMScheduler(**{k: v for k, v in configs.SCHEDULER.items() if k not in ("set_alpha_to_one", "steps_offset")})
    alphas = sched.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)

    def loss_fn(_, ctx):
        gen, dev = ctx.rng, ctx.device
        idx = torch.randint(0, len(mean), (batch,), generator=gen).to(dev)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen).to(dev)) * scale
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen).to(dev)
        zt = sched.add_noise(z0, noise, t)
        ids = ids_all[idx].clone()
        ids[(torch.rand(batch, generator=gen) < 0.1).to(dev)] = empty  # prompt dropout, for CFG
        pred = unet(zt, t, text_encoder(ids).last_hidden_state).sample
        target = sched.get_velocity(z0, noise, t)
        if weighting == "min-snr":
            w = torch.clamp(snr[t], max=5.0) / (snr[t] + 1)  # min-SNR-5 for v-prediction
        else:
            # Plain v-MSE: an x0-loss weight of SNR + 1, so the high-noise steps, where the layout
            # (the position attribute) is decided, keep weight 1. min-SNR weights them by ~SNR ~ 0,
            # and a model trained so ignores position words.
            w = torch.ones_like(snr[t])
        return (w * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()

    cfg = _schedule(steps, lr, 200, weight_decay=0.01, grad_clip=1.0, ema_decay=0.999, ema_warmup=True, device=device,
                    seed=seed + 2, resume=resume, checkpoint_every=checkpoint_every)
    modules = {"unet": unet, "text_encoder": text_encoder}
    result = train(modules, loss_fn, cfg, ckpt_dir=work / "checkpoints" / "unet", desc="unet")
    result.ema_module("unet").cpu().save_pretrained(work / "unet", safe_serialization=True)
    result.ema_module("text_encoder").cpu().save_pretrained(work / "text_encoder", safe_serialization=True)
    log = [{"step": e["iteration"], "loss": e["loss"], "elapsed_s": e["elapsed_s"]} for e in result.log]
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
        components = [artifact.Component("text_encoder", "text_encoder", "transformers"), artifact.Component("unet", "unet", "diffusers"),
                      artifact.Component("vae", "vae", "diffusers"), artifact.Component("tokenizer", "tokenizer", "tokenizer"),
                      artifact.Component("scheduler", "scheduler", "scheduler")]
        size = pipe.unet.config.sample_size
        sampler = artifact.Sampler(scheduler="scheduler", latent_shape=(1, pipe.unet.config.in_channels, size, size),
                                   scaling_factor=float(pipe.vae.config.scaling_factor), max_length=pipe.tokenizer.model_max_length)
        artifact.write_manifest(tmp, stage="train-demo", settings=settings, source=None, components=components, sampler=sampler,
                                metrics=metrics)


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
    ap.add_argument("--resume", action="store_true", help="continue each training phase from its newest checkpoint in --work")
    ap.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint every N iterations (0: never)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a.work.mkdir(parents=True, exist_ok=True)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    skip = ("work", "out", "phase", "resume", "checkpoint_every")  # no effect on the trained weights
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k not in skip}
    ckpt = {"resume": a.resume, "checkpoint_every": a.checkpoint_every}
    if a.phase in ("all", "vae"):
        train_vae(a.work, seed=a.seed, steps=a.vae_steps, batch=32, n_images=a.images, device=a.device, **ckpt)
    if a.phase in ("all", "unet"):
        train_unet(a.work, seed=a.seed, steps=a.unet_steps, batch=a.batch, n_images=a.images, device=a.device, lr=a.lr,
                   weighting=a.weighting, **ckpt)
    if a.phase in ("all", "package"):
        package(a.work, a.out, settings)


if __name__ == "__main__":
    main()
