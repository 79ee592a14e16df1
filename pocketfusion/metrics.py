"""One metric vocabulary, used by every stage and written under these names in every manifest.

========== ==========================================================================================
name       meaning
========== ==========================================================================================
rel_max    max |out - ref| / max |ref| over every feed (parity of an export against PyTorch)
rel_rms    ||out - ref||_2 / ||ref||_2 over every feed (a quantized model against its float source)
rel_mse    rel_rms squared
snr_db     10 log10(||ref||^2 / ||out - ref||^2)
psnr_db    images: 10 log10(255^2 / MSE); tensors: peak max |ref|
max_abs    max |out - ref|;  mean_abs: the largest per-feed mean |out - ref|
========== ==========================================================================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def _np64(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def output_error(ref: Sequence[Any], out: Sequence[Any]) -> dict[str, float]:
    """``rel_rms``, ``rel_mse``, ``snr_db`` and ``psnr_db`` of ``out`` against ``ref`` (tensors or arrays)."""
    num = den = 0.0
    n = 0
    peak = 0.0
    for o, r in zip(out, ref):
        r64 = _np64(r)
        o64 = _np64(o).reshape(r64.shape)
        num += float(((o64 - r64) ** 2).sum())
        den += float((r64**2).sum())
        n += r64.size
        peak = max(peak, float(np.abs(r64).max()))
    mse = num / n if n else float("nan")
    return {
        "rel_rms": math.sqrt(num / den) if den else float("nan"),
        "rel_mse": num / den if den else float("nan"),
        "snr_db": 10 * math.log10(den / num) if num else float("inf"),
        "psnr_db": 10 * math.log10(peak**2 / mse) if mse else float("inf"),
    }


def parity_error(pairs: Iterable[tuple[Any, Any]]) -> dict[str, float]:
    """``max_abs``, ``mean_abs``, ``rel_max`` and ``ref_max_abs`` over (output, reference) pairs."""
    max_abs = mean_abs = peak = 0.0
    for got, ref in pairs:
        r = _np64(ref)
        g = _np64(got).reshape(r.shape)
        err = np.abs(g - r)
        max_abs = max(max_abs, float(err.max()))
        mean_abs = max(mean_abs, float(err.mean()))
        peak = max(peak, float(np.abs(r).max()))
    return {"max_abs": max_abs, "mean_abs": mean_abs, "rel_max": max_abs / max(peak, 1e-12), "ref_max_abs": peak}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def image_psnr(ref: Sequence[np.ndarray], images: Sequence[np.ndarray]) -> dict[str, Any]:
    """PSNR of each image against its reference: mean and min over images, and of the pooled MSE."""
    values = [psnr(a, b) for a, b in zip(images, ref)]
    mse = float(np.mean([np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2) for a, b in zip(images, ref)]))
    finite = [v for v in values if np.isfinite(v)]
    return {
        "mean_db": float(np.mean(finite)) if finite else float("inf"),
        "min_db": float(min(values)),
        "pooled_db": float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse)),
        "identical_images": len(values) - len(finite),
        "per_image_db": [round(v, 2) if np.isfinite(v) else None for v in values],
    }
