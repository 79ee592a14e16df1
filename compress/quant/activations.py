"""Activation quantization (W8A8 / W8A16): calibration ranges, fake quantization, measured 16-bit fallbacks.

In ``w8a8`` each layer's input is fake-quantized alone at 8 bits with its calibration range and its
cost on the U-Net output measured; the costliest inputs fall back to 16 bits until the rest meet an
output-SNR target. Every decision's measured figure goes into ``grid.activations``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

from pocketfusion.compress.quant.feeds import unet_call, unet_outputs
from pocketfusion.compress.quant.mixed import finite_median
from pocketfusion.metrics import output_error


def activation_ranges(unet, batches, names: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Min and max of each layer's input over the calibration batches."""
    import torch

    mods = dict(unet.named_modules())
    rng: dict[str, list[float]] = {n: [math.inf, -math.inf] for n in names}

    def hook(args, n):
        x = args[0]
        r = rng[n]
        r[0] = min(r[0], float(x.min()))
        r[1] = max(r[1], float(x.max()))

    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: hook(a, n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                unet_call(unet, b)
    finally:
        for h in hooks:
            h.remove()
    return {n: (r[0], r[1]) for n, r in rng.items()}


def fake_quant(x, lo: float, hi: float, bits: int):
    """Affine (asymmetric, zero point on the integer grid) fake quantization of ``x`` over ``[lo, hi]`` ∪ {0}."""
    import torch

    lo, hi = min(lo, 0.0), max(hi, 0.0)
    levels = 2**bits - 1
    scale = (hi - lo) / levels if hi > lo else 1.0
    zp = round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zp, 0, levels)
    return (q - zp) * scale


@contextlib.contextmanager
def simulate_activations(unet, layers: dict[str, dict]):
    """Fake-quantize the inputs of ``layers`` (``{name: {"bits": 8|16|None, "range": [lo, hi]}}``) while inside."""
    mods = dict(unet.named_modules())
    hooks = []
    for n, a in layers.items():
        if a.get("bits") and a.get("range"):
            lo, hi = a["range"]
            hooks.append(mods[n].register_forward_pre_hook(
                lambda m, args, lo=lo, hi=hi, b=a["bits"]: (fake_quant(args[0], lo, hi, b), *args[1:])))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def activation_sensitivity(unet, batches, ref: Sequence[Any], ranges: dict[str, tuple[float, float]], bits: int = 8,
                           progress: bool = False) -> dict[str, float]:
    """Relative output MSE (vs ``ref``) with only one layer's input fake-quantized at ``bits``."""
    from tqdm import tqdm

    cost = {}
    for n, r in tqdm(ranges.items(), desc="activation sensitivity", unit="layer", disable=not progress):
        with simulate_activations(unet, {n: {"bits": bits, "range": list(r)}}):
            cost[n] = output_error(ref, unet_outputs(unet, batches))["rel_mse"]
    return cost


def choose_activations(unet, batches, sens_batches, scheme: str, order: Sequence[str], target_snr_db: float,
                       progress: bool = False) -> dict:
    """Per-layer activation bits for w8a8 / w8a16 (ranges from the calibration feeds).

    w8a8: each layer's input is fake-quantized alone at 8 bits and its cost measured (relative
    output MSE against the W8 model). The costliest inputs fall back to 16 bits until the rest
    add up to less than the error ``target_snr_db`` allows; the combination is then measured and
    more inputs fall back (costliest first) while it misses the target."""
    names = list(order)
    ranges = activation_ranges(unet, batches, names)
    layers: dict[str, dict] = {}
    if scheme == "w8a16":
        for n in names:
            layers[n] = {"bits": 16, "reason": "w8a16: 16-bit activations everywhere", "range": list(ranges[n])}
        return {"bits": 16, "layers": layers}
    ref = unet_outputs(unet, sens_batches)  # the W8 model: isolates what 8-bit inputs cost
    cost = activation_sensitivity(unet, sens_batches, ref, ranges, 8, progress=progress)
    med = finite_median(cost.values())
    budget = 10 ** (-target_snr_db / 10)
    ranked = sorted(names, key=lambda n: -cost[n])
    fall: list[str] = []
    rest = sum(cost.values())
    for n in ranked:
        if rest <= budget:
            break
        fall.append(n)
        rest -= cost[n]

    def measure(fb):
        cfg = {n: {"bits": 16 if n in fb else 8, "range": list(ranges[n])} for n in names}
        with simulate_activations(unet, cfg):
            return output_error(ref, unet_outputs(unet, sens_batches))["rel_mse"]

    measured = measure(fall)
    step = 1
    while measured > budget and len(fall) < len(ranked):  # costs do not add up exactly: measure, fall back more
        fall = ranked[: len(fall) + step]
        step *= 2
        measured = measure(fall)
    for n in names:
        x = cost[n] / med if med > 0 else float("nan")
        fig = f"8-bit input costs {cost[n]:.2e} relative output MSE ({x:.0f}x the median)"
        why = (f"16 bits: among the costliest inputs, kept at 16 so the rest meet {target_snr_db:g} dB" if n in fall
               else "8 bits")
        layers[n] = {"bits": 16 if n in fall else 8, "reason": f"{fig}: {why}", "range": list(ranges[n]), "cost": cost[n]}
    snr = 10 * math.log10(1 / measured) if measured > 0 else float("inf")
    return {"bits": 8, "target_snr_db": target_snr_db, "measured_snr_db": snr, "median_cost": med,
            "fallbacks": [n for n in names if n in fall], "layers": layers}
