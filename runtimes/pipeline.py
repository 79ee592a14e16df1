"""Text → image over exported components in any runtime; tokenizer and scheduler in Python/numpy.

This is the loop a phone app runs: the networks are runtime sessions, everything between them is
plain array code. Everything it needs comes from the export artifact's typed manifest: the
components of the runtime's target, the ``Sampler`` (latent shape, scaling factor, tokenizer length,
guidance mode, scheduler and tokenizer folders). Initial noise comes from ``torch.Generator(seed)``
so that images match the diffusers pipeline's for the same seed.

SDXL (a sampler with ``time_ids``) adds ``text_encoder_2`` and its tokenizer, and conditions the U-Net
as ``StableDiffusionXLPipeline`` does: the context is both encoders' penultimate hidden states
concatenated, ``text_embeds`` the second encoder's pooled output, ``time_ids`` the sampler's; the
unconditional half of a CFG pair is zeros when the sampler says ``zero_negative``
(``force_zeros_for_empty_prompt``), else the empty prompt's encoding.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pocketfusion.errors import UserError

NETWORKS = ("text_encoder", "unet", "vae_decoder")
SDXL_NETWORKS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")


def _tokenizer(folder: Path):
    """The CLIP tokenizer of ``folder``: the Rust one (``CLIPTokenizerFast``, built from the same vocab and merges; the
    same ids as ``CLIPTokenizer``, in about half its time per prompt), else the Python one."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    try:
        return CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception:  # a tokenizer folder the converter does not take: the reference implementation
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def token_ids(tokenizer, length: int):
    """A function ``prompt -> (1, length) int32 ids``, padded and truncated to ``length`` (``padding="max_length",
    truncation=True``). A Rust tokenizer is called directly with its padding and truncation set here, once: the same
    ids in a quarter of the time of ``tokenizer(...)``, whose per-call argument handling costs more than the encoding."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda prompt: tokenizer([prompt], padding="max_length", max_length=length, truncation=True,
                                        return_tensors="np").input_ids.astype(np.int32)
    from tokenizers import Tokenizer

    b = Tokenizer.from_str(backend.to_str())
    b.enable_truncation(length)
    b.enable_padding(length=length, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    return lambda prompt: np.asarray([b.encode(prompt).ids], dtype=np.int32)


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
        sdxl = manifest.sampler is not None and manifest.sampler.sdxl
        comps = {n: manifest.find(n, target) for n in (SDXL_NETWORKS if sdxl else NETWORKS)}
        missing = [n for n, c in comps.items() if c is None]
        if missing:
            raise UserError(f"{root} has no {self.runtime} export of {', '.join(missing)} "
                            f"(targets here: {', '.join(manifest.targets()) or 'none'})")
        if manifest.sampler is None:
            raise UserError(f"{root} records no sampler (export a full pipeline, not a bare component)")
        self.sampler = manifest.sampler
        self.tokenizer = _tokenizer(artifact.resolve_path(root, self.sampler.tokenizer))
        self._ids = token_ids(self.tokenizer, self.sampler.max_length)
        self.tokenizer_2 = None
        if sdxl:
            self.tokenizer_2 = _tokenizer(artifact.resolve_path(root, self.sampler.tokenizer_2 or "tokenizer"))
            self._ids_2 = token_ids(self.tokenizer_2, int(comps["text_encoder_2"].inputs[0].shape[1]))
        config = json.loads((artifact.resolve_path(root, self.sampler.scheduler) / "scheduler_config.json").read_text())
        self.scheduler = from_config(config, scheduler)
        self.unet_spec = comps["unet"]
        self.sessions = {n: load_session(artifact.resolve_path(root, c.path), self.runtime, threads=threads, shared_cores=True)
                         for n, c in comps.items()}
        self.device = self.sessions["unet"].device
        self.timings: dict = {}  # the last image's time per network and outside them (``__call__``)
        self._negative_cache: dict[str, np.ndarray] | None = None
        self._net_ms: dict[str, float] = {}
        self._net_calls: dict[str, int] = {}

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``sessions[name].run(feeds)``, its wall time added to this image's per-network totals."""
        t = time.perf_counter()
        out = self.sessions[name].run(feeds)
        self._net_ms[name] = self._net_ms.get(name, 0.0) + (time.perf_counter() - t) * 1e3
        self._net_calls[name] = self._net_calls.get(name, 0) + 1
        return out

    def _encode(self, prompt: str) -> dict[str, np.ndarray]:
        """The U-Net's text conditions for one prompt: ``encoder_hidden_states`` (SDXL: and ``text_embeds``)."""
        ids = self._ids(prompt)
        if self.tokenizer_2 is None:
            return {"encoder_hidden_states": self._run("text_encoder", {"input_ids": ids})["last_hidden_state"]}
        h1 = self._run("text_encoder", {"input_ids": ids})["penultimate_hidden_state"]
        out2 = self._run("text_encoder_2", {"input_ids": self._ids_2(prompt)})
        return {"encoder_hidden_states": np.concatenate([h1, out2["penultimate_hidden_state"]], axis=-1),
                "text_embeds": np.asarray(out2["text_embeds"])}

    def _negative(self) -> dict[str, np.ndarray]:
        """The unconditional half of a CFG pair: the empty prompt's conditions, or zeros (SDXL's ``force_zeros_for_empty_prompt``);
        encoded once per pipeline (the same for every image)."""
        if self._negative_cache is None:
            enc = self._encode("")
            self._negative_cache = {k: np.zeros_like(v) for k, v in enc.items()} if self.sampler.zero_negative else enc
        return self._negative_cache

    def _step_feeds(self, cond: dict, uncond: dict | None, guidance: float) -> dict[str, np.ndarray]:
        """The U-Net inputs that stay the same at every step of one image (conditions, time ids, guidance)."""
        pair = self.sampler.guidance == "cfg"
        b = 2 if pair else 1
        feeds = {k: np.ascontiguousarray(np.concatenate([uncond[k], v]) if pair else v, dtype=np.float32) for k, v in cond.items()}
        if self.sampler.time_ids is not None:
            feeds["time_ids"] = np.tile(np.asarray(self.sampler.time_ids, dtype=np.float32), (b, 1))
        if not pair and self.unet_spec.input("guidance") is not None:
            feeds["guidance"] = np.full((1,), guidance, dtype=np.float32)
        return feeds

    def _guided(self, x: np.ndarray, t: float, fixed: dict[str, np.ndarray], guidance: float) -> np.ndarray:
        """The U-Net's guided output at one step: a CFG pair, or one call with the scale as an input."""
        pair = self.sampler.guidance == "cfg"
        b = 2 if pair else 1
        x = x.astype(np.float32, copy=False)
        feeds = dict(fixed, sample=np.concatenate([x, x]) if pair else np.ascontiguousarray(x),
                     timestep=np.full((b,), t, dtype=np.float32))
        out = self._run("unet", feeds)["noise_pred"]
        if pair:
            e_u, e_c = out[:1], out[1:]
            return e_u + guidance * (e_c - e_u)
        return out

    def __call__(self, prompt: str, *, steps: int | None = None, guidance: float = 4.0, seed: int = 0) -> np.ndarray:
        """One image as (H, W, 3) uint8."""
        import torch

        t_start = time.perf_counter()
        self._net_ms, self._net_calls = {}, {}
        steps = steps or self.sampler.default_steps
        cond = self._encode(prompt)
        uncond = self._negative() if self.sampler.guidance == "cfg" else None
        fixed = self._step_feeds(cond, uncond, guidance)
        gen = torch.Generator().manual_seed(seed)
        sched = self.scheduler
        sched.reset()
        x = torch.randn(tuple(self.sampler.latent_shape), generator=gen).numpy() * sched.init_noise_sigma(steps)
        timesteps = sched.timesteps(steps)
        for i, t in enumerate(timesteps):
            out = self._guided(sched.scale_model_input(x, t, steps), float(t), fixed, guidance)
            # a stochastic scheduler's noise comes from the initial latents' generator, as diffusers draws it
            noise = torch.randn(x.shape, generator=gen).numpy() if sched.stochastic and i < len(timesteps) - 1 else None
            x = sched.step(out, t, x, steps, noise=noise)
        img = self._run("vae_decoder", {"latent": (x / self.sampler.scaling_factor).astype(np.float32)})["image"]
        img = np.clip(img[0].transpose(1, 2, 0) / 2 + 0.5, 0.0, 1.0)
        img = (img * 255.0 + 0.5).astype(np.uint8)
        total = (time.perf_counter() - t_start) * 1e3
        outside = total - sum(self._net_ms.values())
        self.timings = {"total_ms": total, "networks_ms": dict(self._net_ms), "calls": dict(self._net_calls),
                        "outside_ms": outside, "steps": len(timesteps), "outside_per_step_ms": outside / max(1, len(timesteps))}
        return img

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
