"""Text → image over exported components in any runtime; tokenizer and scheduler in Python/numpy.

This is the loop a phone app runs: the networks are runtime sessions, everything between them is
plain array code. Everything it needs comes from the export artifact's typed manifest: the
components of the runtime's target, the ``Sampler`` (latent shape, scaling factor, tokenizer length,
guidance mode, scheduler and tokenizer folders). Initial noise comes from ``torch.Generator(seed)``
so that images match the diffusers pipeline's for the same seed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pocketfusion.errors import UserError

NETWORKS = ("text_encoder", "unet", "vae_decoder")


class RuntimePipeline:
    """Run an export artifact directory's text encoder, U-Net and VAE decoder in one runtime.

    ``scheduler`` names a ``runtimes.schedulers`` entry built from the export's scheduler config (None: the
    config's own class). Stochastic schedulers' step noise comes from the image's ``torch.Generator``.
    """

    def __init__(self, export_dir: str | Path, runtime: str, *, threads: int | None = None, scheduler: str | None = None):
        from pocketfusion import artifact, backends
        from pocketfusion.runtimes.base import load_session
        from pocketfusion.runtimes.schedulers import from_config

        root = Path(export_dir)
        manifest = artifact.load_manifest(root)
        if manifest.stage != "export":
            raise UserError(f"{root} is a {manifest.stage!r} artifact; --runtime needs an export directory")
        self.runtime = backends.canonical_runtime(runtime)
        target = backends.for_runtime(self.runtime).target
        comps = {n: manifest.find(n, target) for n in NETWORKS}
        missing = [n for n, c in comps.items() if c is None]
        if missing:
            raise UserError(f"{root} has no {self.runtime} export of {', '.join(missing)} "
                            f"(targets here: {', '.join(manifest.targets()) or 'none'})")
        if manifest.sampler is None:
            raise UserError(f"{root} records no sampler (export a full pipeline, not a bare component)")
        self.sampler = manifest.sampler
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(str(artifact.resolve_path(root, self.sampler.tokenizer)), local_files_only=True)
        config = json.loads((artifact.resolve_path(root, self.sampler.scheduler) / "scheduler_config.json").read_text())
        self.scheduler = from_config(config, scheduler)
        self.unet_spec = comps["unet"]
        self.sessions = {n: load_session(artifact.resolve_path(root, c.path), self.runtime, threads=threads, shared_cores=True)
                         for n, c in comps.items()}
        self.device = self.sessions["unet"].device

    def _encode(self, prompt: str) -> np.ndarray:
        ids = self.tokenizer([prompt], padding="max_length", max_length=self.sampler.max_length, truncation=True,
                             return_tensors="np").input_ids
        return self.sessions["text_encoder"].run({"input_ids": ids.astype(np.int32)})["last_hidden_state"]

    def _guided(self, x: np.ndarray, t: float, cond: np.ndarray, uncond: np.ndarray | None, guidance: float) -> np.ndarray:
        """The U-Net's guided output at one step: a CFG pair, or one call with the scale as an input."""
        unet = self.sessions["unet"]
        if self.sampler.guidance == "cfg":
            feeds = {"sample": np.concatenate([x, x]), "timestep": np.full((2,), t, dtype=np.float32),
                     "encoder_hidden_states": np.concatenate([uncond, cond]).astype(np.float32)}
            out = unet.run(feeds)["noise_pred"]
            e_u, e_c = out[:1], out[1:]
            return e_u + guidance * (e_c - e_u)
        feeds = {"sample": x, "timestep": np.full((1,), t, dtype=np.float32), "encoder_hidden_states": cond.astype(np.float32)}
        if self.unet_spec.input("guidance") is not None:
            feeds["guidance"] = np.full((1,), guidance, dtype=np.float32)
        return unet.run(feeds)["noise_pred"]

    def __call__(self, prompt: str, *, steps: int | None = None, guidance: float = 4.0, seed: int = 0) -> np.ndarray:
        """One image as (H, W, 3) uint8."""
        import torch

        steps = steps or self.sampler.default_steps
        cond = self._encode(prompt)
        uncond = self._encode("") if self.sampler.guidance == "cfg" else None
        gen = torch.Generator().manual_seed(seed)
        sched = self.scheduler
        sched.reset()
        x = torch.randn(tuple(self.sampler.latent_shape), generator=gen).numpy() * sched.init_noise_sigma(steps)
        timesteps = sched.timesteps(steps)
        for i, t in enumerate(timesteps):
            out = self._guided(sched.scale_model_input(x, t, steps), float(t), cond, uncond, guidance)
            # a stochastic scheduler's noise comes from the initial latents' generator, as diffusers draws it
            noise = torch.randn(x.shape, generator=gen).numpy() if sched.stochastic and i < len(timesteps) - 1 else None
            x = sched.step(out, t, x, steps, noise=noise)
        img = self.sessions["vae_decoder"].run({"latent": (x / self.sampler.scaling_factor).astype(np.float32)})["image"]
        img = np.clip(img[0].transpose(1, 2, 0) / 2 + 0.5, 0.0, 1.0)
        return (img * 255.0 + 0.5).astype(np.uint8)

    def generate(self, prompts, *, steps: int | None = None, guidance: float = 4.0, seed: int = 0) -> tuple[list[np.ndarray], float]:
        t0 = time.perf_counter()
        images = [self(p, steps=steps, guidance=guidance, seed=seed + i) for i, p in enumerate(prompts)]
        return images, (time.perf_counter() - t0) / max(1, len(prompts))


def evaluate_runtime(export_dir, runtime: str, cfg, n_prompts: int | None = None, *, progress: bool = False) -> dict:
    """Prompt accuracy through an export directory's runtime, and PSNR of each image against the
    PyTorch pipeline of the export's source model at the same seed.

    Args:
        cfg: a ``generate.GenerateConfig`` (steps, guidance, seed, scheduler: both pipelines sample with it).
    """
    from tqdm import tqdm

    from pocketfusion import artifact
    from pocketfusion.checkpoint import load_model
    from pocketfusion.generate import generate_images
    from pocketfusion.metrics import psnr
    from pocketfusion.suite import builtin, require_suite

    src = artifact.load_manifest(Path(export_dir)).source
    source_model = load_model(src.path) if src and Path(src.path).exists() else None
    # Without its source on disk, an export is scored with the demo suite (no PSNR reference).
    suite = require_suite(source_model, "eval --runtime") if source_model is not None else builtin("demo")
    prompts = suite.heldout(n_prompts)
    pipe = RuntimePipeline(export_dir, runtime, scheduler=getattr(cfg, "scheduler", None))
    t0 = time.perf_counter()
    images = [pipe(p, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed + i)
              for i, p in enumerate(tqdm(prompts, desc=f"generate ({runtime})", disable=not progress))]
    sec = (time.perf_counter() - t0) / len(prompts)
    result = suite.evaluate(images, prompts)
    result.update(runtime=pipe.runtime, device=pipe.device, settings=cfg.to_dict(), seconds_per_image=sec)
    if source_model is not None:
        ref, _ = generate_images(source_model, prompts, cfg, progress=progress)
        values = [psnr(a, b) for a, b in zip(images, ref)]
        finite = [v for v in values if np.isfinite(v)]
        result["psnr_vs_pytorch_db"] = {
            "mean": float(np.mean(finite)) if finite else float("inf"), "min": float(min(values)),
            "identical_images": len(values) - len(finite),
        }
        result["pytorch_reference"] = suite.evaluate(ref, prompts)["per_attribute"]
    result["images"] = images
    return result
