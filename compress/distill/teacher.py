"""What the teacher provides: prompt embeddings and its guided samples (noise -> image pairs).

Distillation is data-free: the prompts come from the model's suite or a text file, and every target
is the teacher's own guided DDIM sample. A pair may also carry points of the teacher's ODE trajectory
(its DDIM states at the teacher timesteps nearest to the student's later timesteps), so that a
multistep student learns where each point of the trajectory ends. The pairs are made once per run
and cached in the work directory (safetensors + a JSON key), so a resumed run does not sample them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pocketfusion.artifact import atomic_write_text
from pocketfusion.errors import UserError

logger = logging.getLogger(__name__)

_PAIRS, _KEY = "pairs.safetensors", "pairs.json"


@dataclass
class Pairs:
    """Teacher samples: ``noise[i]`` -> ``latents[i]`` for prompt ``prompt_index[i]`` at guidance ``guidance[i]``."""

    noise: torch.Tensor  # [N, C, H, W]
    latents: torch.Tensor  # [N, C, H, W], the teacher's guided sample from noise[i]
    prompt_index: torch.Tensor  # [N] long
    guidance: torch.Tensor  # [N] float32, diffusers' convention (1 = none)
    seconds: float = 0.0  # what sampling them took (when they were made, for a cached set)
    cached: bool = False  # read from the work directory's cache
    states: torch.Tensor | None = None  # [N, K, C, H, W]: the trajectory from noise[i] at state_timesteps[k]
    state_timesteps: tuple[int, ...] = ()  # the student timesteps the states stand for

    def __len__(self) -> int:
        return int(self.noise.shape[0])


@dataclass
class Conditioning:
    """What conditions the U-Net, one row per prompt: the text encoder's hidden states, and for SDXL the
    pooled text embeddings and the added time ids (original size, crop, target size) of its added conditions."""

    hidden: torch.Tensor  # [P, L, D]
    pooled: torch.Tensor | None = None  # [P, T] (SDXL)
    time_ids: torch.Tensor | None = None  # [6] (SDXL)

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def take(self, idx: torch.Tensor | list[int]) -> Conditioning:
        return Conditioning(self.hidden[idx], None if self.pooled is None else self.pooled[idx], self.time_ids)

    def cpu(self) -> Conditioning:
        return Conditioning(self.hidden.cpu(), None if self.pooled is None else self.pooled.cpu(),
                            None if self.time_ids is None else self.time_ids.cpu())

    def kwargs(self, device, n: int | None = None) -> dict:
        """``unet(x, t, **kwargs)`` for these rows (``n``: one row repeated n times, the unconditional case)."""
        hidden = self.hidden if n is None else self.hidden.expand(n, -1, -1)
        kw = {"encoder_hidden_states": hidden.to(device)}
        if self.pooled is not None:
            pooled = self.pooled if n is None else self.pooled.expand(n, -1)
            kw["added_cond_kwargs"] = {"text_embeds": pooled.to(device), "time_ids": self.time_ids.to(device).expand(len(pooled), -1)}
        return kw


def cfg_kwargs(uncond: dict, cond: dict) -> dict:
    """The U-Net kwargs of a CFG pair batch ``[uncond; cond]``."""
    kw = {"encoder_hidden_states": torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]])}
    if "added_cond_kwargs" in cond:
        kw["added_cond_kwargs"] = {k: torch.cat([uncond["added_cond_kwargs"][k], v]) for k, v in cond["added_cond_kwargs"].items()}
    return kw


def select_prompts(model, cfg) -> list[str]:
    """The prompts of ``cfg.prompts`` (a file), else of the model's built-in suite (training prompts only)."""
    from pocketfusion import suite as S

    if cfg.prompts is not None:
        return list(S.from_file(cfg.prompts, cfg.n_prompts).train_prompts)
    found = S.suite_for(model)
    if found is None:
        raise UserError(f"{model.path} has no built-in prompts: give a prompts file (--prompts FILE, one prompt a line)")
    return found.calibration_prompts(cfg.n_prompts or min(len(found.train_prompts), cfg.n_pairs), cfg.seed)


@torch.no_grad()
def encode(model, prompts: list[str], device: torch.device, batch: int = 64, *, negative: bool = False) -> Conditioning:
    """``prompts`` as the pipeline conditions the U-Net on them: the text encoder's last hidden states (padded to the
    tokenizer's max length); for SDXL both encoders' (``encode_prompt``), the pooled embedding and the time ids.
    ``negative``: the unconditional branch's (SDXL's ``force_zeros_for_empty_prompt`` gives zeros)."""
    if model.class_name == "StableDiffusionXLPipeline":
        return _encode_sdxl(model, prompts, device, batch, negative)
    tok, te = model.components["tokenizer"], model.components["text_encoder"]
    te = te.to(device).eval()
    out = []
    for i in range(0, len(prompts), batch):
        ids = tok(prompts[i:i + batch], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out.append(te(ids)[0].float())
    return Conditioning(torch.cat(out))


def _encode_sdxl(model, prompts: list[str], device, batch: int, negative: bool) -> Conditioning:
    from pocketfusion.checkpoint import build_pipeline

    pipe = build_pipeline(model)
    hidden, pooled = [], []
    for i in range(0, len(prompts), batch):
        pe, _, po, _ = pipe.encode_prompt(prompts[i:i + batch], device=device, do_classifier_free_guidance=False)
        hidden.append(pe.float())
        pooled.append(po.float())
    hidden, pooled = torch.cat(hidden), torch.cat(pooled)
    if negative and pipe.config.force_zeros_for_empty_prompt:
        hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
    c = model.components["unet"].config
    size = float(c.sample_size * pipe.vae_scale_factor)
    return Conditioning(hidden, pooled, torch.tensor([size, size, 0.0, 0.0, size, size]))


def _key(model_hash: str, prompts: list[str], cfg, shape: tuple[int, ...], record: tuple[int, ...]) -> dict:
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    key = {"source": model_hash, "prompts_sha256": digest, "n_pairs": cfg.n_pairs, "teacher_steps": cfg.teacher_steps,
           "guidance_range": list(cfg.guidance_range), "seed": cfg.seed, "shape": list(shape)}
    return {**key, "trajectory": list(record)} if record else key


def teacher_pairs(model, unet, cond: Conditioning, uncond: Conditioning, prompts: list[str], cfg, *, device: torch.device,
                  work: Path, model_hash: str, record: tuple[int, ...] = (), progress: bool = True) -> Pairs:
    """``cfg.n_pairs`` guided teacher samples, read from or written to the cache under ``work``.

    ``record``: student timesteps at which to keep the teacher's trajectory as ``Pairs.states``.
    """
    from safetensors.torch import load_file, save_file

    c = unet.config
    size = (c.sample_size, c.sample_size) if isinstance(c.sample_size, int) else tuple(c.sample_size)
    shape = (c.in_channels, *size)
    key = _key(model_hash, prompts, cfg, shape, tuple(record))
    if (work / _KEY).is_file() and (work / _PAIRS).is_file():
        try:
            meta = json.loads((work / _KEY).read_text())
            if meta["key"] == key:
                t = load_file(str(work / _PAIRS))
                logger.info("reusing %d cached teacher samples from %s", cfg.n_pairs, work)
                return Pairs(t["noise"], t["latents"], t["prompt_index"], t["guidance"], float(meta["seconds"]), True,
                             t.get("states"), tuple(record))
        except (OSError, ValueError, KeyError):
            logger.warning("cached teacher samples in %s are unreadable: sampling them again", work)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.n_pairs
    noise = torch.randn((n, *shape), generator=g)
    lo, hi = cfg.guidance_range
    guidance = lo + (hi - lo) * torch.rand(n, generator=g)
    prompt_index = torch.arange(n) % len(prompts)
    latents, states = sample(model, unet, noise, cond.take(prompt_index), uncond, guidance, cfg.teacher_steps,
                             device=device, batch=cfg.teacher_batch, record=record, progress=progress)
    pairs = Pairs(noise, latents, prompt_index, guidance.float(), time.perf_counter() - t0, False, states, tuple(record))
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / f".{_PAIRS}.{os.getpid()}.tmp"  # one per process (data-parallel ranks make the same set)
    tensors = {"noise": noise, "latents": latents, "prompt_index": prompt_index, "guidance": pairs.guidance}
    save_file({**tensors, "states": states} if states is not None else tensors, str(tmp))
    tmp.replace(work / _PAIRS)
    atomic_write_text(work / _KEY, json.dumps({"key": key, "seconds": pairs.seconds}) + "\n")  # last: marks the cache complete
    return pairs


@torch.no_grad()
def sample(model, unet, noise: torch.Tensor, cond: Conditioning, uncond: Conditioning, guidance: torch.Tensor, steps: int, *,
           device: torch.device, batch: int = 64, record: tuple[int, ...] = (),
           progress: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's DDIM (eta 0) samples from ``noise`` with classifier-free guidance ``guidance[i]`` per sample,
    and (``record`` given) its states on the way: ``[N, len(record), C, H, W]``, else None.

    ``cond`` holds one row per sample, ``uncond`` the empty prompt's (one row). A recorded state is the
    sample as it enters the teacher timestep nearest to the requested one (the teacher's 50 DDIM timesteps
    981, 961, ... pass within ``T / (2 * steps)`` of every student timestep).
    """
    from diffusers import DDIMScheduler
    from tqdm import tqdm

    config = {k: v for k, v in dict(model.components["scheduler"].config).items() if not k.startswith("_")}
    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]
    at = {min(range(len(ts)), key=lambda i: abs(ts[i] - r)): k for k, r in enumerate(record)}
    if len(at) != len(record):
        raise ValueError(f"trajectory timesteps {record} are too close together for {steps} teacher steps")
    out, kept = [], []
    bar = tqdm(total=len(noise), desc=f"teacher samples ({steps} steps)", disable=not progress, mininterval=2.0)
    for i in range(0, len(noise), batch):
        x = noise[i:i + batch].to(device)
        kw = cfg_kwargs(uncond.kwargs(device, len(x)), cond.take(slice(i, i + batch)).kwargs(device))
        g = guidance[i:i + batch].to(device).reshape(-1, 1, 1, 1)
        states = [None] * len(record)
        for j, t in enumerate(sched.timesteps):
            if j in at:
                states[at[j]] = x.float().cpu()
            e = unet(torch.cat([x, x]), t, **kw).sample
            e_u, e_c = e.chunk(2)
            x = sched.step(e_u + g * (e_c - e_u), t, x).prev_sample
        out.append(x.float().cpu())
        if record:
            kept.append(torch.stack(states, dim=1))
        bar.update(len(x))
    bar.close()
    return torch.cat(out), (torch.cat(kept) if record else None)
