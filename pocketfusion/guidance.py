"""How a distilled student takes the guidance scale: one function every stage shares.

A guidance-embedded U-Net (diffusers' ``time_cond_proj_dim``) takes ``timestep_cond =
guidance_embedding(g, dim)``: the sinusoidal embedding of ``(g - 1) * 1000`` that diffusers'
``LatentConsistencyModelPipeline`` computes (``get_guidance_scale_embedding(guidance_scale - 1)``).
Distillation trains with it, calibration and quantization call the U-Net with it, and the exported
U-Net computes it in its graph from a ``guidance`` input.
"""

from __future__ import annotations


def embeds_guidance(unet) -> bool:
    """Whether ``unet`` (a ``UNet2DConditionModel``) takes the guidance scale as ``timestep_cond``."""
    return getattr(unet.config, "time_cond_proj_dim", None) is not None


def guidance_embedding(scale, dim: int, dtype=None):
    """The ``timestep_cond`` of guidance scales ``scale`` (a torch tensor ``[B]``, diffusers' convention: 1 = none).

    The same numbers as ``LatentConsistencyModelPipeline.get_guidance_scale_embedding(scale - 1, dim)``.
    """
    import torch

    dtype = dtype or torch.float32
    w = (scale - 1.0) * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.to(dtype)[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 == 1 else emb
