"""Measured mixed precision (W4): each layer's 4-bit cost on the U-Net output, 8 bits where it is
far above the median, as far as the size budget allows."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pocketfusion.compress.quant import grid as G
from pocketfusion.compress.quant.config import QuantConfig
from pocketfusion.compress.quant.feeds import unet_call, unet_outputs
from pocketfusion.compress.quant.gptq import quantize_layer, quantize_weights
from pocketfusion.metrics import output_error

logger = logging.getLogger(__name__)

PROJECTIONS = 8  # projected sensitivity: random output directions (backward passes)


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


def projected_sensitivity(unet, batch, deltas: dict[str, Any], *, projections: int = PROJECTIONS, seed: int = 0,
                          progress: bool = False) -> dict[str, float]:
    """Each layer's 4-bit cost as its linearized relative output MSE, for every layer from one forward pass.

    With ``f`` the U-Net's output on ``batch`` and ``J_l`` its Jacobian in layer ``l``'s weight, the measured cost
    ``|f(W + dW_l) - f(W)|^2 / |f|^2`` is about ``|J_l dW_l|^2 / |f|^2``, and ``E_v[(vᵀ J_l dW_l)^2] = |J_l dW_l|^2``
    for ``v ~ N(0, I)``: each random ``v`` is one backward pass that gives ``vᵀ J_l`` for all layers at once
    (gradient checkpointing keeps the activations' memory small). On the demo U-Net its layer ranking against the
    measured pass: Spearman 0.95 (one CFG pair, 8 projections)."""
    import torch
    from tqdm import tqdm

    mods = dict(unet.named_modules())
    names = list(deltas)
    ws = [mods[n].weight for n in names]
    req = {id(p): p.requires_grad for p in unet.parameters()}
    ckpt = getattr(unet, "gradient_checkpointing", None)
    for p in unet.parameters():
        p.requires_grad_(False)
    for w in ws:
        w.requires_grad_(True)
    if hasattr(unet, "enable_gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    acc = dict.fromkeys(names, 0.0)
    try:
        with torch.enable_grad():
            out = unet_call(unet, batch)
            norm = float(out.detach().double().pow(2).sum())
            g = torch.Generator().manual_seed(seed)  # on the CPU whatever the device: the same directions everywhere
            for i in tqdm(range(projections), desc="sensitivity (projected)", unit="pass", disable=not progress):
                v = torch.randn(out.shape, generator=g).to(out.device)
                grads = torch.autograd.grad(out, ws, grad_outputs=v, retain_graph=i < projections - 1)
                for n, gr in zip(names, grads):
                    acc[n] += float((gr.double() * deltas[n].double()).sum()) ** 2
                del grads
    finally:
        for p in unet.parameters():
            p.requires_grad_(req[id(p)])
        if ckpt is False and hasattr(unet, "disable_gradient_checkpointing"):
            unet.disable_gradient_checkpointing()
    return {n: acc[n] / projections / norm if norm > 0 else float("inf") for n in names}


def finite_median(values: Iterable[float]) -> float:
    v = [x for x in values if np.isfinite(x)]
    return float(np.median(v)) if v else 0.0


def sensitivity_mode(cfg: QuantConfig, n_layers: int, pass_seconds: float | None) -> tuple[str, str]:
    """(``measured`` | ``projected``, why) for ``cfg.sensitivity`` with ``n_layers`` layers, one U-Net pass taking ``pass_seconds``."""
    if cfg.sensitivity != "auto":
        return cfg.sensitivity, f"--sensitivity {cfg.sensitivity}"
    if pass_seconds is None:
        return "measured", "auto: the pass was not timed"
    est = n_layers * pass_seconds
    if est <= cfg.sensitivity_seconds:
        return "measured", (f"auto: the measured pass is estimated at {est:.0f} s ({n_layers} layers x {pass_seconds:.2f} s), "
                            f"within {cfg.sensitivity_seconds:.0f} s")
    return "projected", (f"auto: the measured pass would take about {est / 60:.0f} min ({n_layers} layers x {pass_seconds:.1f} s "
                         f"a U-Net pass), over {cfg.sensitivity_seconds:.0f} s: projected instead ({PROJECTIONS} backward passes)")


def mixed_precision(unet, batches, sens_batches, ref, gs: dict[str, int | None], cfg: QuantConfig, *, order: Sequence[str],
                    progress: bool = False, pass_seconds: float | None = None) -> tuple[dict, dict, dict]:
    """W4 bit allocation from measured per-layer 4-bit costs. Returns (plan, reasons, summary).

    ``gs`` is each layer's 4-bit group size; ``ref`` the float U-Net's outputs on ``sens_batches``, computed in
    ``pass_seconds`` (which ``sensitivity_mode`` weighs for ``cfg.sensitivity="auto"``)."""
    threshold, budget = cfg.mixed_threshold, cfg.size_budget
    mods = dict(unet.named_modules())
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
    else:  # round-to-nearest changes, one CFG pair
        deltas = {}
        for n in gs:
            lg, q = quantize_layer(mods[n], n, 4, gs[n], "rtn")
            deltas[n] = lg.dequantize(q) - mods[n].weight.detach().float()
        pair = {k: v[:2] for k, v in sens_batches[0].items()}
        cost = projected_sensitivity(unet, pair, deltas, seed=cfg.seed, progress=progress)
        del deltas
        what = "relative output MSE (projected, RTN)"
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
