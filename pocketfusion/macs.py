"""Multiply-accumulate counts per component call, attention matmuls included.

Module-hook counters (thop, ptflops, fvcore's defaults) see ``nn.Conv2d`` and ``nn.Linear`` but
not the ``Q·Kᵀ`` and ``softmax·V`` products inside attention — about 15 % of an SD-1.5 U-Net call
at 64² latent. We count at the ATen level with ``torch.utils.flop_counter.FlopCounterMode`` and
add the fused attention kernels it does not know (the CPU flash-attention op), so every matmul
and convolution is counted once. 1 MAC = 2 FLOPs.
"""

from __future__ import annotations

from typing import Any


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # query (B, H, Sq, D), key (B, H, Sk, D), value (B, H, Sk, Dv): Q·Kᵀ then P·V
    *batch, sq, d = query_shape
    sk = key_shape[-2]
    dv = value_shape[-1]
    n = 1
    for b in batch:
        n *= b
    return 2 * n * sq * sk * d + 2 * n * sq * sk * dv


_ATTENTION_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")


def _custom_mapping() -> dict:
    import torch

    mapping = {}
    for name in _ATTENTION_OPS:
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            mapping[op] = _sdpa_flops
    return mapping


_GROUPS = {
    "convolution": "conv",
    "_convolution": "conv",
    "mm": "linear",
    "addmm": "linear",
    "bmm": "attention",
    "baddbmm": "attention",
}


def count_macs(module, args: tuple = (), kwargs: dict[str, Any] | None = None) -> dict[str, int]:
    """Run ``module(*args, **kwargs)`` once under a FLOP counter and return MACs by kind.

    Returns ``{"total": N, "conv": N, "linear": N, "attention": N}``; ``attention`` holds the
    batched matmuls of attention (Q·Kᵀ and P·V), ``linear`` the projections and MLPs.

    Example:
        >>> import torch
        >>> count_macs(torch.nn.Linear(4, 3, bias=False), (torch.zeros(2, 4),))["total"]
        24
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    with torch.no_grad(), counter:
        module(*args, **(kwargs or {}))
    out = {"total": 0, "conv": 0, "linear": 0, "attention": 0}
    for op, flops in counter.get_flop_counts()["Global"].items():
        name = str(op).split(".")[-1]
        kind = "attention" if name in _ATTENTION_OPS else _GROUPS.get(name, "linear")
        out[kind] += flops // 2
        out["total"] += flops // 2
    return out


def component_inputs(model, name: str, batch: int = 1, device: str = "cpu") -> tuple[tuple, dict]:
    """Example inputs for one call of a pipeline component at its native resolution."""
    import torch

    comps = model.components
    if name == "unet":
        unet = comps["unet"]
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
        hw = (size, size) if isinstance(size, int) else size
        dtype = unet.dtype
        sample = torch.zeros(batch, cfg.in_channels, *hw, device=device, dtype=dtype)
        seq = comps["tokenizer"].model_max_length if "tokenizer" in comps else 77
        ctx_dim = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
        ctx = torch.zeros(batch, seq, ctx_dim, device=device, dtype=dtype)
        kwargs: dict[str, Any] = {}
        if cfg.addition_embed_type == "text_time":
            n_time = 6
            text_dim = cfg.projection_class_embeddings_input_dim - n_time * cfg.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.zeros(batch, text_dim, device=device, dtype=dtype),
                "time_ids": torch.zeros(batch, n_time, device=device, dtype=dtype),
            }
        t = torch.full((batch,), 999, device=device, dtype=torch.long)
        return (sample, t, ctx), kwargs
    if name.startswith("text_encoder"):
        tok = comps.get("tokenizer_2" if name.endswith("_2") else "tokenizer")
        seq = tok.model_max_length if tok is not None else comps[name].config.max_position_embeddings
        return (torch.zeros(batch, seq, dtype=torch.long, device=device),), {}
    if name == "vae_decoder":
        from pocketfusion.checkpoint import latent_size

        vae = comps["vae"]
        h = latent_size(model)
        z = torch.zeros(batch, vae.config.latent_channels, h, h, device=device, dtype=vae.dtype)
        return (z,), {}
    raise ValueError(f"unknown component {name!r}")


def component_callable(model, name: str):
    """The module (or bound method) that one call of ``name`` runs."""
    if name == "vae_decoder":
        return model.components["vae"].decode
    return model.components[name]


def unet_macs(unet, *, seq_len: int, batch: int = 1) -> int:
    """MACs of one batch-``batch`` call of a bare U-Net at its native latent size (context ``seq_len`` tokens)."""
    import torch

    cfg = unet.config
    s = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    ctx_dim = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
    p = next(unet.parameters())
    args = (torch.zeros(batch, cfg.in_channels, s, s, dtype=p.dtype, device=p.device), torch.full((batch,), 999, device=p.device),
            torch.zeros(batch, seq_len, ctx_dim, dtype=p.dtype, device=p.device))
    return count_macs(unet, args)["total"]


def layer_profile(module, args: tuple = (), kwargs: dict[str, Any] | None = None) -> dict:
    """The shapes a roofline needs from one call of ``module``: its largest 3x3 convolution and its largest
    linear layer (by MACs, at the shapes this call gives them) and the activation bytes the call moves.

    Returns ``{"conv": {"batch", "in_channels", "out_channels", "height", "width", "stride", "padding", "macs"}
    or None, "linear": {"m", "k", "n", "macs"} or None, "activation_bytes": N}``: ``activation_bytes`` sums
    the inputs and outputs of every convolution and linear layer (what those layers read and write once,
    at the call's own dtype; norms and element-wise ops on the same tensors are not counted again).
    """
    import torch

    best: dict[str, dict | None] = {"conv": None, "linear": None}
    moved = [0]

    def hook(mod, inputs, output):
        x = inputs[0]
        moved[0] += x.numel() * x.element_size() + output.numel() * output.element_size()
        if isinstance(mod, torch.nn.Conv2d):
            if tuple(mod.kernel_size) != (3, 3) or mod.groups != 1:
                return
            n, _, oh, ow = output.shape
            macs = n * oh * ow * mod.out_channels * mod.in_channels * 9
            rec = {"batch": int(x.shape[0]), "in_channels": mod.in_channels, "out_channels": mod.out_channels,
                   "height": int(x.shape[2]), "width": int(x.shape[3]), "stride": int(mod.stride[0]),
                   "padding": int(mod.padding[0]) if isinstance(mod.padding, tuple) else 1, "macs": int(macs)}
            kind = "conv"
        else:
            m = x.numel() // x.shape[-1]
            rec = {"m": int(m), "k": mod.in_features, "n": mod.out_features, "macs": int(m * mod.in_features * mod.out_features)}
            kind = "linear"
        if best[kind] is None or rec["macs"] > best[kind]["macs"]:
            best[kind] = rec

    hooks = []
    root = getattr(module, "__self__", module)  # a bound method (the VAE's decode): hook its module
    for mod in root.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module(*args, **(kwargs or {}))
    finally:
        for h in hooks:
            h.remove()
    return {**best, "activation_bytes": int(moved[0])}
