"""The roofline of a bench entry: what the runtime's own kernels could reach on this host, at the model's shapes.

    attainable = min(compute ceiling of the runtime at the entry's precision,
                     bandwidth x arithmetic intensity)        arithmetic intensity = 2·MACs / bytes moved

*Compute ceiling*: each runtime's own GEMM and 3x3 convolution, probed at the component's largest linear and
3x3 conv layer (``pocketfusion.macs.layer_profile``), fp32 and int8 (``pocketfusion.export.roofline``, run in a
child process per runtime: ``runtimes`` imports no exporter). A component's MACs are split by kind
(``count_macs``: conv / linear / attention); its ceiling is the time all of them would take at their probe's
rate, ``2·MACs / Σ (2·MACs_kind / peak_kind)`` (attention matmuls at the GEMM rate). A quantized component
(its manifest has a grid) is held to the faster of the runtime's fp32 and int8 kernels.

*Bandwidth*: the best of a numpy copy / STREAM-triad (one thread) and the runtime's own element-wise ``Add``
on tensors beyond the last-level cache. *Bytes moved*: the stored weights (the artifact's size) plus the
inputs and outputs of every conv / linear layer.

``roofline_fraction = achieved / attainable`` is never above 1: a measurement above its ceiling means the
probe missed the peak (a layer mix faster than the probed one, a cache-resident working set beating DRAM
bandwidth); the ceiling is then raised to the measurement and the entry says so (``roofline.probe_exceeded``).
Probe results are cached per (host, runtime, threads, kind and shape) for the process, and in a small JSON file
when the bench writes its results (``roofline-probes.json`` beside them: ``load_cache`` / ``save_cache``; the
numpy bandwidth is measured again each process).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

_CACHE: dict[tuple, dict] = {}
BANDWIDTH_BYTES = 64 << 20  # per array


def numpy_bandwidth(repeats: int = 3) -> dict:
    """This host's memory bandwidth from numpy on one thread, GB/s: copy (``b = a``) and triad (``a = b + s·c``),
    best of ``repeats``, on fp32 arrays of ``BANDWIDTH_BYTES`` each."""
    key = ("numpy_bandwidth",)
    if key in _CACHE:
        return _CACHE[key]
    n = BANDWIDTH_BYTES // 4
    a, b, c = (np.full(n, v, dtype=np.float32) for v in (1.0, 2.0, 3.0))
    best_copy = best_triad = float("inf")
    for _ in range(repeats + 1):
        t = time.perf_counter()
        np.copyto(b, a)
        best_copy = min(best_copy, time.perf_counter() - t)
        t = time.perf_counter()
        np.multiply(c, 3.0, out=a)  # a = s·c, then a += b: 5 array passes in numpy's two ufuncs
        np.add(a, b, out=a)
        best_triad = min(best_triad, time.perf_counter() - t)
    res = {"copy_gbs": 2 * n * 4 / best_copy / 1e9, "triad_gbs": 5 * n * 4 / best_triad / 1e9, "array_bytes": n * 4,
           "method": "numpy, one thread: copy (2 passes) and triad as two ufuncs (5 passes), best of runs"}
    res["gbs"] = max(res["copy_gbs"], res["triad_gbs"])
    _CACHE[key] = res
    return res


def probe_runtime(runtime: str, shapes: dict, *, threads: int | None = None, processor: str = "") -> dict:
    """The runtime's kernel probes at ``shapes`` (``{key: {"gemm": {m, k, n} | None, "conv": {...} | None}}``), in a
    child process (``python -m pocketfusion.export.roofline``). Each (host, runtime, threads, kind and shape) is probed
    once per process: a later call probes only the shapes not seen yet. A failed probe returns ``{"error": ...}``
    (the entries then get no roofline)."""
    base = (processor, runtime, threads)

    def sig(kind: str, shape: dict) -> tuple:
        return (*base, kind, json.dumps(shape, sort_keys=True))

    todo: dict[str, dict] = {}
    for key, kinds in shapes.items():
        for kind, shape in kinds.items():
            if shape and sig(kind, shape) not in _CACHE:
                todo.setdefault(f"s{len(todo)}", {})[kind] = shape
    need_bw = (*base, "bandwidth") not in _CACHE
    if todo or need_bw:
        job = {"runtime": runtime, "shapes": todo, "threads": threads, "bandwidth": need_bw}
        p = subprocess.run([sys.executable, "-m", "pocketfusion.export.roofline", json.dumps(job)], capture_output=True, text=True)
        res = next((json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")), None)
        if res is None:
            return {"runtime": runtime, "threads": threads, "error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        for key, kinds in todo.items():
            for kind, shape in kinds.items():
                _CACHE[sig(kind, shape)] = res["shapes"][key][kind]
        if need_bw:
            _CACHE[(*base, "bandwidth")] = res.get("bandwidth")
        if res.get("device"):
            _CACHE[(*base, "device")] = res["device"]
    out = {"runtime": runtime, "threads": threads, "device": _CACHE.get((*base, "device"), ""),
           "bandwidth": _CACHE[(*base, "bandwidth")], "shapes": {}}
    for key, kinds in shapes.items():
        out["shapes"][key] = {kind: _CACHE[sig(kind, shape)] for kind, shape in kinds.items() if shape}
    return out


def load_cache(path) -> int:
    """Merge the probe results of a ``save_cache`` file into the process cache (a missing or unreadable file is none)."""
    from pathlib import Path

    try:
        rows = json.loads(Path(path).read_text())["probes"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    for key, value in rows:
        _CACHE.setdefault(tuple(key), value)
    return len(rows)


def save_cache(path) -> None:
    """Write the process's runtime probe results (not the numpy bandwidth) to ``path``, atomically."""
    from pocketfusion.artifact import atomic_write_text

    rows = [[list(k), v] for k, v in _CACHE.items() if k[0] != "numpy_bandwidth" and v is not None]
    atomic_write_text(path, json.dumps({"schema": "pocketfusion.roofline-probes", "probes": rows}) + "\n")


def probe_shapes(profile: dict) -> dict:
    """The probe shapes of one component's ``layer_profile``: ``{"gemm": {m, k, n} | None, "conv": {...} | None}``."""
    lin, conv = profile.get("linear"), profile.get("conv")
    return {"gemm": {k: lin[k] for k in ("m", "k", "n")} if lin else None,
            "conv": {k: conv[k] for k in ("batch", "in_channels", "out_channels", "height", "width")} if conv else None}


def _peak(kind_probe: dict | None, precision: str) -> float | None:
    if not kind_probe:
        return None
    rates = [kind_probe.get(p, {}).get("gflops") for p in (("fp32", "int8") if precision == "int8" else ("fp32",))]
    rates = [r for r in rates if r]
    return max(rates) if rates else None


def runtime_bandwidth(probes: dict, host_bandwidth: dict) -> tuple[float, str]:
    """The bandwidth ceiling of a runtime (GB/s) and where it comes from: the best of numpy and its own ``Add``."""
    own = (probes.get("bandwidth") or {}).get("gbs") or 0.0
    return (own, f"{probes.get('runtime')} Add") if own > host_bandwidth["gbs"] else (host_bandwidth["gbs"], "numpy")


def entry_roofline(*, gflops: float, macs: dict, activation_bytes: int, weight_bytes: int | None, probes: dict, shapes_key: str,
                   bandwidth_gbs: float, precision: str) -> dict | None:
    """The roofline of one measured entry (see the module docstring); None when the runtime's probe failed.

    ``macs``: ``count_macs``'s ``{"total", "conv", "linear", "attention"}``. Returns ``{"fraction", "bound",
    "attainable_gflops", "compute_gflops", "bandwidth_gflops", "arithmetic_intensity", "bytes_moved",
    "precision", "probe_exceeded", "note"}``.
    """
    kinds = (probes.get("shapes") or {}).get(shapes_key) or {}
    gemm, conv = _peak(kinds.get("gemm"), precision), _peak(kinds.get("conv"), precision)
    gemm, conv = gemm or conv, conv or gemm  # a component without one kind: its MACs of that kind at the other's rate
    if not gemm or macs.get("total", 0) <= 0:
        return None
    seconds = 2 * (macs.get("conv", 0) / conv + (macs.get("linear", 0) + macs.get("attention", 0)) / gemm) / 1e9
    compute = 2 * macs["total"] / seconds / 1e9 if seconds > 0 else gemm
    moved = (weight_bytes or 0) + activation_bytes
    intensity = 2 * macs["total"] / moved if moved else float("inf")
    memory = bandwidth_gbs * intensity
    bound = "compute" if compute <= memory else "bandwidth"
    attainable = min(compute, memory)
    out = {"precision": precision, "compute_gflops": compute, "bandwidth_gflops": memory, "arithmetic_intensity": intensity,
           "bytes_moved": moved, "bandwidth_gbs": bandwidth_gbs, "probe_exceeded": False, "note": ""}
    if gflops > attainable:
        out["probe_exceeded"] = True
        out["note"] = (f"measured {gflops:.1f} GFLOP/s above the {bound} ceiling {attainable:.1f} GFLOP/s: the probe is not "
                       "this runtime's peak here; the ceiling is taken as the measurement")
        attainable = gflops
    out.update(attainable_gflops=attainable, fraction=gflops / attainable, bound=bound)
    return out


def probe_summary(probes: dict) -> str:
    """One line per probed shape: ``gemm MxKxN fp32 A / int8 B GFLOP/s; conv ...``."""
    if "error" in probes:
        return f"probe failed: {probes['error']}"
    parts = []
    for key, kinds in probes.get("shapes", {}).items():
        bits = []
        for kind, p in kinds.items():
            if not p:
                continue
            rates = " / ".join(f"{prec} {p[prec]['gflops']:.1f}" if "gflops" in p.get(prec, {}) else f"{prec} failed"
                               for prec in ("fp32", "int8") if prec in p)
            bits.append(f"{kind} {rates}")
        parts.append(f"{key}: {'; '.join(bits)} GFLOP/s")
    return " | ".join(parts)
