"""iOS / macOS: Core ML on a Mac (compute unit selectable) and a connected iPhone via Xcode's tools.

On a Mac, ``coreml_bench`` loads an ``.mlpackage`` with coremltools for the chosen compute units
(CPU_ONLY, CPU_AND_GPU, CPU_AND_NE, ALL) and times ``predict`` on the artifact's golden inputs.
A connected iPhone is found with ``xcrun devicectl list devices``; on-device timing runs the app
in ``apps/ios`` (Xcode's performance tools). On Linux both say in one line why they cannot run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from pocketfusion.errors import UserError

COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")


def _need_mac(what: str) -> None:
    if sys.platform != "darwin":
        raise UserError(f"{what} needs macOS (Core ML and Xcode's device tools exist only there); this host is {sys.platform}")


def coreml_bench(package: Path, feeds: dict, *, compute_units: str = "CPU_AND_NE", runs: int = 20, warmup: int = 3) -> dict:
    """Median/min latency of Core ML ``predict`` on this Mac for the chosen compute units."""
    _need_mac("Core ML benchmarking")
    if compute_units not in COMPUTE_UNITS:
        raise UserError(f"compute units {compute_units!r}; choose one of {', '.join(COMPUTE_UNITS)}")
    import coremltools as ct
    import numpy as np

    t0 = time.perf_counter()
    model = ct.models.MLModel(str(package), compute_units=getattr(ct.ComputeUnit, compute_units))
    load_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        model.predict(feeds)
    lat = []
    for _ in range(runs):
        t = time.perf_counter()
        model.predict(feeds)
        lat.append((time.perf_counter() - t) * 1e3)
    return {
        "compute_units": compute_units,
        "load_ms": load_ms,
        "latency_ms": {"median": float(np.median(lat)), "min": min(lat), "runs": runs},
    }


def iphone_devices() -> list[str]:
    """Names of iPhones Xcode sees (``xcrun devicectl list devices``)."""
    _need_mac("iPhone benchmarking")
    if shutil.which("xcrun") is None:
        raise UserError("xcrun not found: install Xcode and its command line tools")
    out = subprocess.run(["xcrun", "devicectl", "list", "devices"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise UserError(f"xcrun devicectl failed: {out.stderr.strip()[:200]}")
    return [line for line in out.stdout.splitlines()[2:] if "iPhone" in line and "connected" in line.lower()]
