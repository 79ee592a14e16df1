"""Text → image over exported components in any runtime; tokenizer and scheduler in Python/numpy.

This is the loop a phone app runs: the networks are runtime sessions, everything between them is
plain array code. Initial noise comes from ``torch.Generator(seed)`` so that images match the
diffusers pipeline's for the same seed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pocketfusion.errors import UserError


class DDIMScheduler:
    """Deterministic DDIM (eta = 0), numerically the same as diffusers' ``DDIMScheduler`` for its configs.

    ``step`` takes the network's output, an epsilon or a v prediction per ``prediction_type``.
    """

    def __init__(self, config: dict):
        if config.get("_class_name", "DDIMScheduler") not in ("DDIMScheduler", "PNDMScheduler"):
            raise UserError(f"the runtime pipeline implements DDIM only; scheduler {config.get('_class_name')!r} is not supported")
        self.prediction = config.get("prediction_type", "epsilon")
        if self.prediction not in ("epsilon", "v_prediction"):
            raise UserError(f"prediction_type {self.prediction!r} is not supported by the runtime pipeline (epsilon or v_prediction)")
        self.T = int(config.get("num_train_timesteps", 1000))
        b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        schedule = config.get("beta_schedule", "linear")
        if schedule == "scaled_linear":
            betas = np.linspace(b0**0.5, b1**0.5, self.T, dtype=np.float32) ** 2
        elif schedule == "linear":
            betas = np.linspace(b0, b1, self.T, dtype=np.float32)
        else:
            raise UserError(f"beta_schedule {schedule!r} is not supported by the runtime pipeline")
        self.alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
        self.final_alpha = np.float32(1.0) if config.get("set_alpha_to_one", True) else self.alphas_cumprod[0]
        self.offset = int(config.get("steps_offset", 0))
        if config.get("timestep_spacing", "leading") != "leading":
            raise UserError("only 'leading' timestep spacing is supported by the runtime pipeline")

    def timesteps(self, steps: int) -> np.ndarray:
        ratio = self.T // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + self.offset

    def step(self, out: np.ndarray, t: int, x: np.ndarray, steps: int) -> np.ndarray:
        prev = t - self.T // steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha
        if self.prediction == "v_prediction":
            x0 = np.sqrt(a_t) * x - np.sqrt(1 - a_t) * out
            eps = np.sqrt(a_t) * out + np.sqrt(1 - a_t) * x
        else:
            eps = out
            x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        return (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps).astype(np.float32)


class RuntimePipeline:
    """Run an export artifact directory's text encoder, U-Net and VAE decoder in one runtime."""

    def __init__(self, export_dir: str | Path, runtime: str, *, threads: int | None = None):
        from pocketfusion import artifact
        from pocketfusion.runtimes.base import TARGET_RUNTIME, canonical, load_session

        root = Path(export_dir)
        manifest = artifact.load_manifest(root)
        if manifest.stage != "export":
            raise UserError(f"{root} is a {manifest.stage!r} artifact; --runtime needs an export directory")
        self.runtime = canonical(runtime)
        comps = manifest.metrics.get("components", {})
        paths = {}
        for key, entry in comps.items():
            target, name = key.split("/", 1)
            if TARGET_RUNTIME[target] == self.runtime:
                paths[name] = root / entry["path"]
        missing = [c for c in ("text_encoder", "unet", "vae_decoder") if c not in paths]
        if missing:
            have = sorted({k.split("/")[0] for k in comps})
            raise UserError(f"{root} has no {self.runtime} export of {', '.join(missing)} (targets here: {', '.join(have)})")
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        self.scheduler = DDIMScheduler(json.loads((root / "scheduler" / "scheduler_config.json").read_text()))
        self.info = json.loads((root / "pipeline.json").read_text())
        self.sessions = {name: load_session(p, self.runtime, threads=threads) for name, p in paths.items()}
        self.device = self.sessions["unet"].device

    def _encode(self, prompt: str) -> np.ndarray:
        ids = self.tokenizer([prompt], padding="max_length", max_length=self.info["max_length"], truncation=True, return_tensors="np").input_ids
        return self.sessions["text_encoder"].run({"input_ids": ids.astype(np.int32)})["last_hidden_state"]

    def __call__(self, prompt: str, *, steps: int = 50, guidance: float = 4.0, seed: int = 0) -> np.ndarray:
        """One image as (H, W, 3) uint8."""
        import torch

        cond, uncond = self._encode(prompt), self._encode("")
        ctx = np.concatenate([uncond, cond]).astype(np.float32)
        shape = tuple(self.info["latent_shape"])
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()
        unet = self.sessions["unet"]
        for t in self.scheduler.timesteps(steps):
            feeds = {"sample": np.concatenate([x, x]), "timestep": np.full((2,), t, dtype=np.float32), "encoder_hidden_states": ctx}
            eps = unet.run(feeds)["noise_pred"]
            e_u, e_c = eps[:1], eps[1:]
            x = self.scheduler.step(e_u + guidance * (e_c - e_u), int(t), x, steps)
        img = self.sessions["vae_decoder"].run({"latent": (x / self.info["scaling_factor"]).astype(np.float32)})["image"]
        img = np.clip(img[0].transpose(1, 2, 0) / 2 + 0.5, 0.0, 1.0)
        return (img * 255.0 + 0.5).astype(np.uint8)

    def generate(self, prompts, *, steps: int = 50, guidance: float = 4.0, seed: int = 0) -> tuple[list[np.ndarray], float]:
        t0 = time.perf_counter()
        images = [self(p, steps=steps, guidance=guidance, seed=seed + i) for i, p in enumerate(prompts)]
        return images, (time.perf_counter() - t0) / max(1, len(prompts))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)
