"""Quantize a U-Net module in place: the bit plan (uniform, or measured mixed precision), the rounding
(RTN or GPTQ, ``gptq.py``) and, for w8a8 / w8a16, the activation bits (``activations.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pocketfusion.calibration.capture import on_device
from pocketfusion.compress.quant import grid as G
from pocketfusion.compress.quant.activations import choose_activations
from pocketfusion.compress.quant.config import QuantConfig
from pocketfusion.compress.quant.feeds import batch_limit, forward_order, stack_feeds, subsample, unet_outputs
from pocketfusion.compress.quant.gptq import quantize_weights
from pocketfusion.compress.quant.mixed import mixed_precision
from pocketfusion.errors import UserError
from pocketfusion.validate import resolve_device


def quantize_unet(unet, feeds_calib: Sequence[dict[str, Any]], cfg: QuantConfig, *, progress: bool = True) -> G.QuantGrid:
    """Quantize ``unet``'s Linear / Conv2d weights in place onto their grid; returns the grid with its reasons.

    Args:
        unet: a float32 ``UNet2DConditionModel`` (modified in place).
        feeds_calib: calibration U-Net feeds (``CalibrationSet.unet_feeds("calib")``).
        cfg: scheme, method and their options (``QuantConfig``; its calibration and image fields are not used here);
            ``cfg.device``: where every pass and factorization runs (the U-Net is moved there meanwhile and put back
            where it was; the grid's scales come back to the CPU).
    """
    import torch

    if next(unet.parameters()).dtype != torch.float32:
        raise UserError("quantize a float32 U-Net (convert it with .float() first)")
    dev = resolve_device(cfg.device)
    with on_device([unet], dev):
        qgrid = _quantize_unet(unet, feeds_calib, cfg, dev, progress)
    for g in qgrid.layers.values():
        g.scale = g.scale.cpu()
    return qgrid


def _quantize_unet(unet, feeds_calib: Sequence[dict[str, Any]], cfg: QuantConfig, dev, progress: bool) -> G.QuantGrid:
    import time

    import torch

    scheme, method, group_size = cfg.scheme, cfg.method, cfg.group_size
    bits = cfg.weight_bits
    layers = G.quantizable_layers(unet)
    max_batch = batch_limit(unet, cfg.max_batch)
    batches = stack_feeds(feeds_calib, max_batch, dev)
    order = forward_order(unet, batches[0])
    sens_batches = stack_feeds(subsample(feeds_calib, cfg.sensitivity_feeds), max_batch, dev)
    gs = {n: G.layer_group_size(m, 4, group_size) for n, m in layers.items()}
    reasons: dict[str, str] = {}
    plan = {n: (bits, gs[n] if bits == 4 else None) for n in layers}
    settings: dict[str, Any] = {"group_size": group_size, "method": method, "calibration_feeds": len(feeds_calib),
                                "samples_per_call": max_batch}
    if method == "gptq":
        settings.update(damp=cfg.damp, clip_grid=list(cfg.clip_grid), sequential=cfg.sequential, chunks=cfg.chunks,
                        act_order=cfg.act_order)

    if bits == 4 and cfg.mixed_threshold is not None:
        t = time.perf_counter()
        ref = unet_outputs(unet, sens_batches)  # the float U-Net's outputs, and the time one sensitivity pass takes
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        plan, reasons, mixed = mixed_precision(unet, batches, sens_batches, ref, gs, cfg, order=order, progress=progress,
                                               pass_seconds=time.perf_counter() - t)
        settings["mixed_precision"] = mixed
    elif bits == 4:
        reasons = {n: "every layer at 4 bits (mixed precision off)" for n in layers}
    else:
        reasons = {n: f"{scheme}: every layer at 8 bits" for n in layers}
    for n in layers:
        if plan[n][0] == 4 and plan[n][1] is None:
            reasons[n] += f"; {layers[n].weight.shape[1]} input channels not a multiple of group {group_size}: one scale per output channel"

    grids, ints = quantize_weights(unet, batches, plan, cfg, order=order, progress=progress)
    qgrid = G.QuantGrid(scheme, method, settings=settings)
    for n in order:
        if n in grids:
            g = grids[n]
            g.reason = "; ".join(r for r in (reasons.get(n, ""), g.reason) if r)
            qgrid.layers[n] = g
    G.apply(unet, qgrid, ints)
    if scheme == "w4":
        G.round_floats_fp16(unet, qgrid)
    if scheme in ("w8a8", "w8a16"):
        qgrid.activations = choose_activations(unet, batches, sens_batches, scheme, order, cfg.act_snr_db, progress)
    return qgrid


def rtn_like(unet, qgrid: G.QuantGrid) -> G.QuantGrid:
    """RTN onto the same per-layer bits and groups as ``qgrid`` (in place): the baseline at equal size."""
    out = G.QuantGrid(qgrid.scheme, "rtn", settings=dict(qgrid.settings, method="rtn"))
    mods = dict(unet.named_modules())
    ints = {}
    for n, g in qgrid.layers.items():
        out.layers[n], ints[n] = G.rtn(mods[n], n, g.bits, g.group_size)
    G.apply(unet, out, ints)
    if G.floats_are_fp16(qgrid):
        G.round_floats_fp16(unet, out)
    return out
