"""U-Net calls on calibration feeds: batching, the call itself, forward order of the layers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pocketfusion.compress.quant import grid as G
from pocketfusion.compress.quant.config import ACTIVATION_BYTES, MAX_BATCH
from pocketfusion.errors import UserError

ADDED_INPUTS = ("text_embeds", "time_ids")  # SDXL's added_cond_kwargs


def stack_feeds(feeds: Sequence[dict[str, Any]], max_batch: int = MAX_BATCH, device=None) -> list[dict[str, Any]]:
    """Concatenate feed dicts (numpy or torch, batch 2 each) into torch batches of at most ``max_batch`` samples, on
    ``device`` (None: the CPU)."""
    import torch

    if not feeds:
        raise UserError("no calibration feeds")
    per = int(np.asarray(feeds[0]["sample"]).shape[0])
    k = max(1, max_batch // max(1, per))
    out = []
    for i in range(0, len(feeds), k):
        part = feeds[i : i + k]
        out.append({n: torch.cat([torch.as_tensor(np.asarray(f[n])) for f in part]).float().to(device) for n in part[0]})
    return out


def subsample(feeds: Sequence[dict], n: int) -> list[dict]:
    """``n`` feeds spread evenly over ``feeds`` (which are ordered by prompt, then timestep)."""
    if len(feeds) <= n:
        return list(feeds)
    idx = np.linspace(0, len(feeds) - 1, n).round().astype(int)
    return [feeds[i] for i in idx]


def unet_call(unet, batch: dict[str, Any]):
    """The U-Net's output on one batch of feeds (SDXL's added inputs passed as ``added_cond_kwargs``, a
    student's ``guidance`` as its ``timestep_cond`` embedding)."""
    from pocketfusion.guidance import guidance_embedding

    kwargs = {}
    if "guidance" in batch:
        kwargs["timestep_cond"] = guidance_embedding(batch["guidance"], unet.config.time_cond_proj_dim)
    added = {k: batch[k] for k in ADDED_INPUTS if k in batch}
    if added:
        kwargs["added_cond_kwargs"] = added
    return unet(batch["sample"], batch["timestep"], batch["encoder_hidden_states"], return_dict=False, **kwargs)[0]


def batch_limit(unet, max_batch: int = MAX_BATCH, activation_bytes: int = ACTIVATION_BYTES) -> int:
    """Samples per U-Net call: ``max_batch``, fewer where the U-Net's activations would exceed ``activation_bytes``.

    A sample's live activations are estimated as 48 float32 maps of the first stage's width at the latent's size
    (measured on SD-1.5 at 64x64 with PyTorch's CPU attention: about 250 MB a sample); the demo model stays at
    ``max_batch``."""
    cfg = unet.config
    h, w = (cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    per_sample = h * w * cfg.block_out_channels[0] * 4 * 48
    return int(max(2, min(max_batch, activation_bytes // max(1, per_sample))))


def unet_outputs(unet, batches: Iterable[dict[str, Any]]) -> list[Any]:
    import torch

    with torch.no_grad():
        return [unet_call(unet, b).float() for b in batches]


def forward_order(unet, batch: dict[str, Any]) -> list[str]:
    """Quantizable layers in the order one forward call runs them (layers never called come last)."""
    import torch

    layers = G.quantizable_layers(unet)
    seen: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=n: seen.append(n) if n not in seen else None) for n, m in layers.items()]
    try:
        with torch.no_grad():
            unet_call(unet, {k: v[:2] for k, v in batch.items()})
    finally:
        for h in hooks:
            h.remove()
    return seen + [n for n in layers if n not in seen]
