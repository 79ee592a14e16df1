"""One measurement in a fresh process (``python -m pocketfusion.runtimes.measure JSON``).

The parent (``pocketfusion.runtimes.bench``) starts one of these per (artifact, runtime, component)
so that one runtime's memory never counts against another's. Prints one line ``RESULT {json}``:
load time, per-call latencies, and memory read from ``/proc/self/status`` — ``VmHWM`` (the
resident high-water mark) and its growth over the baseline taken after the runtime's Python
package is imported but before the artifact is loaded.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pocketfusion.steps import peak_kib, status_kib


def measure(job: dict) -> dict:
    import importlib

    from pocketfusion import backends

    runtime = backends.canonical_runtime(job["runtime"])
    root = Path(job["root"])
    importlib.import_module(backends.for_runtime(runtime).runtime_probe)  # baseline includes the runtime's own import
    if job["component"] == "end_to_end":
        import pocketfusion.runtimes.pipeline  # noqa: F401
    base_rss = status_kib("VmRSS") or 0
    threads = job.get("threads")
    t0 = time.perf_counter()
    if job["component"] == "end_to_end":
        from pocketfusion.runtimes.pipeline import RuntimePipeline

        pipe = RuntimePipeline(root, runtime, threads=threads)
        device = pipe.device

        def call():
            pipe(job.get("prompt", "a large red circle on a blue background, center"), steps=job.get("steps", 50), seed=0)
    else:
        from pocketfusion.artifact import read_golden
        from pocketfusion.runtimes.base import load_session

        session = load_session(root / job["path"], runtime, threads=threads)
        device = session.device
        feeds = read_golden(root / job["golden"])[0]

        def call():
            session.run(feeds)

    load_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(job.get("warmup", 3)):
        call()
    lat, breakdowns = [], []
    for _ in range(job.get("runs", 20)):
        t = time.perf_counter()
        call()
        lat.append((time.perf_counter() - t) * 1e3)
        if job["component"] == "end_to_end":
            breakdowns.append(pipe.timings)
    peak = peak_kib()
    out = {
        "runtime": runtime, "component": job["component"], "device": device, "load_ms": load_ms, "latencies_ms": lat,
        "peak_rss_mib": peak / 1024, "baseline_rss_mib": base_rss / 1024, "rss_growth_mib": (peak - base_rss) / 1024,
    }
    if breakdowns:  # the runtime pipeline's own split of each image: per network, and outside them (per step)
        out["breakdown"] = sorted(breakdowns, key=lambda b: b["total_ms"])[len(breakdowns) // 2]  # the median image
    return out


def main() -> int:
    job = json.loads(sys.argv[1])
    if job.get("threads"):
        import os

        os.environ.setdefault("OMP_NUM_THREADS", str(job["threads"]))
    import warnings

    warnings.simplefilter("ignore")
    print("RESULT " + json.dumps(measure(job)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
