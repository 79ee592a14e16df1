"""Per-call latency of several runners measured interleaved (round robin), since a host's speed drifts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def interleaved_latency(runners: dict[str, Callable[[], Any]], *, runs: int, rounds: int, warmup: int = 3,
                        progress: bool = False) -> dict[str, dict]:
    """Per-call latency of each runner: ``warmup`` calls each, then ``rounds`` round-robin rounds of
    ``runs`` calls each. Returns ``{name: {median_ms, p90_ms, min_ms, samples_ms}}``."""
    from tqdm import tqdm

    for fn in runners.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in tqdm(range(rounds), desc="latency rounds", disable=not progress, unit="round"):
        for name, fn in runners.items():
            for _ in range(runs):
                t = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t) * 1e3)
    return {k: {"median_ms": statistics.median(v), "p90_ms": float(np.percentile(v, 90)), "min_ms": min(v), "samples_ms": v}
            for k, v in samples.items()}
