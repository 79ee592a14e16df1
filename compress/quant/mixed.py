"""Measured mixed precision (W4): each layer's 4-bit cost on the U-Net output, 8 bits where it is
far above the median, as far as the size budget allows."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pocketfusion.compress.quant import grid as G
from pocketfusion.compress.quant.config import QuantConfig
from pocketfusion.compress.quant.feeds import unet_outputs
from pocketfusion.compress.quant.gptq import _chunks, _flat, collect_hessians, quantize_layer, quantize_weights
from pocketfusion.metrics import output_error

logger = logging.getLogger(__name__)


def weight_bytes(unet, bits: dict[str, int], group: dict[str, int | None], *, scale_bytes: int = 2) -> dict[str, float]:
    """Bytes of the U-Net's parameters stored at ``bits`` (int8: 1 byte, int4: ½), scales at
    ``scale_bytes`` each, everything else fp32; and the ratio to all-fp32."""
    mods = G.quantizable_layers(unet)
    total = sum(p.numel() for p in unet.parameters())
    q_params = 0
    stored = 0.0
    for n, b in bits.items():
        w = mods[n].weight
        q_params += w.numel()
        n_scales = w.shape[0] * (1 if group.get(n) is None else w.shape[1] // group[n])
        stored += w.numel() * b / 8 + n_scales * scale_bytes
    stored += (total - q_params) * 4
    return {"fp32_bytes": total * 4, "bytes": stored, "ratio": stored / (total * 4)}


def layer_sensitivity(unet, batches, ref: Sequence[Any], candidates: dict[str, Any], progress: bool = False) -> dict[str, float]:
    """Relative output MSE (vs ``ref``) with only one layer's weight replaced by ``candidates[name]``."""
    import torch
    from tqdm import tqdm

    mods = dict(unet.named_modules())
    cost = {}
    for n, w in tqdm(candidates.items(), desc="sensitivity", unit="layer", disable=not progress):
        p = mods[n].weight
        keep = p.detach().clone()
        with torch.no_grad():
            p.copy_(w.to(p.dtype))
        try:
            cost[n] = output_error(ref, unet_outputs(unet, batches))["rel_mse"]
        finally:
            with torch.no_grad():
                p.copy_(keep)
    return cost


def local_sensitivity(unet, batches, gs: dict[str, int | None], cfg: QuantConfig, *, order: Sequence[str],
                      progress: bool = False) -> dict[str, float]:
    """Each layer's own relative output error at 4 bits: ``tr(dW H dWᵀ) / tr(W H Wᵀ)``, ``dW`` the round-to-nearest
    4-bit change, ``H`` the layer's input Hessian on the calibration feeds (float U-Net; chunks of layers a pass)."""
    import torch
    from tqdm import tqdm

    mods = dict(unet.named_modules())
    names = [n for n in order if n in gs]
    cost: dict[str, float] = {}
    bar = tqdm(total=len(names), desc="sensitivity (local)", unit="layer", disable=not progress)
    for part in _chunks(names, mods, max(1, -(-len(names) // max(1, cfg.chunks))), cfg.hessian_bytes):
        hs = collect_hessians(unet, batches, part, order)
        for n in part:
            H, _ = hs.pop(n)
            lg, q = quantize_layer(mods[n], n, 4, gs[n], "rtn")
            w = _flat(mods[n].weight.detach()).to(H.dtype)
            dw = w - _flat(lg.dequantize(q)).to(H.dtype)
            with torch.no_grad():
                num = float(((dw @ H) * dw).sum())
                den = float(((w @ H) * w).sum())
            cost[n] = num / den if den > 0 else float("inf")
            del H
            bar.update(1)
    bar.close()
    return cost


def finite_median(values: Iterable[float]) -> float:
    v = [x for x in values if np.isfinite(x)]
    return float(np.median(v)) if v else 0.0


def sensitivity_mode(cfg: QuantConfig, n_layers: int, pass_seconds: float | None) -> tuple[str, str]:
    """(``measured`` | ``local``, why) for ``cfg.sensitivity`` with ``n_layers`` layers, one U-Net pass taking ``pass_seconds``."""
    if cfg.sensitivity != "auto":
        return cfg.sensitivity, f"--sensitivity {cfg.sensitivity}"
    if pass_seconds is None:
        return "measured", "auto: the pass was not timed"
    est = n_layers * pass_seconds
    if est <= cfg.sensitivity_seconds:
        return "measured", (f"auto: the measured pass is estimated at {est:.0f} s ({n_layers} layers x {pass_seconds:.2f} s), "
                            f"within {cfg.sensitivity_seconds:.0f} s")
    return "local", (f"auto: the measured pass would take about {est / 60:.0f} min ({n_layers} layers x {pass_seconds:.1f} s "
                     f"a U-Net pass), over {cfg.sensitivity_seconds:.0f} s: each layer's own 4-bit output error instead")


def mixed_precision(unet, batches, sens_batches, ref, gs: dict[str, int | None], cfg: QuantConfig, *, order: Sequence[str],
                    progress: bool = False, pass_seconds: float | None = None) -> tuple[dict, dict, dict]:
    """W4 bit allocation from measured per-layer 4-bit costs. Returns (plan, reasons, summary).

    ``gs`` is each layer's 4-bit group size; ``ref`` the float U-Net's outputs on ``sens_batches``, computed in
    ``pass_seconds`` (which ``sensitivity_mode`` weighs for ``cfg.sensitivity="auto"``)."""
    threshold, budget = cfg.mixed_threshold, cfg.size_budget
    mode, why = sensitivity_mode(cfg, len(gs), pass_seconds)
    logger.info("w4 sensitivity: %s (%s)", mode, why)
    if mode == "measured":
        plan4 = {n: (4, g) for n, g in gs.items()}
        grids, ints = quantize_weights(unet, batches, plan4, cfg, order=order, sequential=False, apply=False, progress=progress)
        cand = {n: grids[n].dequantize(ints[n]) for n in grids}
        del grids, ints
        cost = layer_sensitivity(unet, sens_batches, ref, cand, progress=progress)
        del cand
        what = "relative output MSE"
    else:
        cost = local_sensitivity(unet, batches, gs, cfg, order=order, progress=progress)
        what = "relative error of the layer's own output (RTN)"
    med = finite_median(cost.values())
    keep8, over_budget = _allocate(unet, gs, cost, med, threshold, budget)
    plan, reasons = {}, {}
    for n in gs:
        x = cost[n] / med if med > 0 else float("nan")
        fig = f"4-bit costs {cost[n]:.2e} {what}, {x:.1f}x the median"
        if n in keep8:
            plan[n] = (8, None)
            reasons[n] = f"{fig}: kept at 8 bits (threshold {threshold:g}x)"
        else:
            plan[n] = (4, gs[n])
            spent = f"above {threshold:g}x but the {budget:.0%} size budget is spent: 4 bits"
            reasons[n] = f"{fig}: " + (spent if n in over_budget else "4 bits")
    final = weight_bytes(unet, {n: p[0] for n, p in plan.items()}, {n: p[1] for n, p in plan.items()})
    summary = {
        "sensitivity": mode, "sensitivity_reason": why,
        "threshold_x_median": threshold, "size_budget": budget, "median_cost": med, "kept_8bit": keep8,
        "over_budget": over_budget, "bytes_ratio_fp16_scales": final["ratio"], "cost": {n: cost[n] for n in order if n in cost},
    }
    if progress or keep8:
        logger.info("mixed precision: %d of %d layers kept at 8 bits (ratio %.3f)", len(keep8), len(gs), final["ratio"])
    return plan, reasons, summary


def _allocate(unet, gs, cost, med, threshold, budget) -> tuple[list[str], list[str]]:
    """Layers kept at 8 bits, and those above the threshold the budget could not take."""
    mods = G.quantizable_layers(unet)

    def extra_bytes(n):  # what 8 bits cost over 4 bits for layer n
        w = mods[n].weight
        return w.numel() / 2 + w.shape[0] * 2 * (1 - (1 if gs[n] is None else w.shape[1] // gs[n]))

    keep8: list[str] = []
    over_budget: list[str] = []
    # knapsack greedy: the most output error saved per extra byte first
    ranked = sorted((n for n in cost if med > 0 and cost[n] > threshold * med), key=lambda n: -cost[n] / extra_bytes(n))
    for n in ranked:
        trial = keep8 + [n]
        bits = {m: 8 if m in trial else 4 for m in gs}
        if weight_bytes(unet, bits, {m: (None if m in trial else gs[m]) for m in gs})["ratio"] <= budget:
            keep8.append(n)
        else:
            over_budget.append(n)
    return keep8, over_budget
