"""``bench``: latency and memory of exported artifacts on this host, each measurement in its own process.

Results JSON (schema ``pocketfusion.bench``, version 1)::

    {
      "schema": "pocketfusion.bench", "schema_version": 1,
      "created": ISO-8601, "host": {"machine", "processor", "cpus", "os", "python", "peak_gflops_fp32",
                                    "roofline": {"bandwidth": {numpy copy/triad GB/s}, "runtimes": {runtime: probes}}},
      "versions": {"pocketfusion", "onnxruntime", "executorch", "ai-edge-litert", ...},
      "settings": {"threads", "runs", "warmup", "rounds", "steps"},
      "artifacts": [{"path", "manifest_sha256", "label"}],   # path: absolute, or relative to the JSON's folder
      "results": [{
          "artifact": label, "runtime", "component", "device", "load_ms",
          "latency_ms": {"median", "p90", "min", "max", "runs"}, "latencies_ms": [...],
          "peak_rss_mib", "rss_growth_mib", "size_bytes", "macs", "gflops",
          "roofline_fraction", "roofline_bound", "roofline": {"precision", "attainable_gflops", "compute_gflops",
                                                              "bandwidth_gflops", "arithmetic_intensity", "bytes_moved", ...}
      }],
      "ratios": {"<label>": {"<runtime>/<component>": median_first / median_this}},  # compare mode
      "estimates": [{"artifact", "component", "device", "estimate_ms", "compute_ms", "memory_ms", "bound",
                     "efficiency", "label": "estimate", "source"}]   # phone rooflines, not measurements
    }

``peak_gflops_fp32`` is a PyTorch 1024² fp32 matmul, kept for reference; the roofline of each entry is against
its own runtime's kernels at the component's shapes (``pocketfusion.runtimes.roofline``): ``roofline_fraction``
(<= 1) and ``roofline_bound`` (``compute`` or ``bandwidth``); the probes' figures are under ``host.roofline``.

Comparison mode (several artifact directories) interleaves the measurements round by round, so
drift of this machine's speed hits every artifact alike, and reports ratios to the first.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pocketfusion.errors import UserError

SCHEMA = "pocketfusion.bench"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BenchConfig:
    runtimes: tuple[str, ...] | None = None  # None: every runtime the artifact has and this host runs
    threads: int | None = None
    runs: int = 20
    warmup: int = 3
    rounds: int = 1
    steps: int | None = None  # end-to-end sampling steps (None: each artifact's own, ``manifest.sampler.default_steps``)
    end_to_end: bool = True
    # end-to-end steps of distilled students only (sampler guidance "embedded"), so that a 1-step student and its
    # 50-step teacher are timed in one interleaved run; other artifacts keep ``steps`` or their own
    student_steps: int | None = None

    def __post_init__(self) -> None:
        if (self.runs < 1 or self.warmup < 0 or self.rounds < 1 or (self.steps is not None and self.steps < 1)
                or (self.student_steps is not None and self.student_steps < 1)):
            raise UserError("--runs, --rounds, --steps and --student-steps must be >= 1, --warmup >= 0")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1, got {self.threads}")

    def to_dict(self) -> dict:
        return asdict(self)


def host_info(measure_peak: bool = True) -> dict:
    import os

    info = {
        "machine": platform.machine(), "processor": _cpu_name(), "cpus": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
    }
    if measure_peak:
        info["peak_gflops_fp32"] = host_peak_gflops()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 matmul throughput of this host (best of ``repeats``), in GFLOP/s."""
    import time

    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("pocketfusion", "torch", "onnxruntime", "executorch", "ai-edge-litert", "coremltools", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _exported(root: Path, m) -> list:
    """The export manifest's runtime components (typed ``artifact.Component``s with a target)."""
    if m.stage != "export":
        raise UserError(f"{root} is a {m.stage!r} artifact; bench needs an export directory")
    return [c for c in m.components if c.target is not None]


def _jobs(root: Path, cfg: BenchConfig) -> list[dict]:
    from pocketfusion import artifact, backends

    m = artifact.load_manifest(root)
    sizes = m.metrics.get("components", {})
    wanted = {backends.canonical_runtime(r) for r in cfg.runtimes} if cfg.runtimes else None
    jobs = []
    by_runtime: dict[str, list[str]] = {}
    for c in _exported(root, m):
        b = backends.backend(c.target)
        if wanted is not None and b.runtime not in wanted:
            continue
        if not b.runs_on_linux and sys.platform != "darwin":
            continue  # reported once in notes
        jobs.append({"root": str(root), "runtime": b.runtime, "component": c.name, "path": c.path, "golden": c.golden,
                     "size_bytes": sizes.get(c.key, {}).get("size_bytes"), "precision": "int8" if c.grid is not None else "fp32"})
        by_runtime.setdefault(b.runtime, []).append(c.name)
    if cfg.end_to_end and m.sampler is not None:
        from pocketfusion.runtimes.pipeline import NETWORKS, SDXL_NETWORKS

        needed = set(SDXL_NETWORKS if m.sampler.sdxl else NETWORKS)
        for runtime, comps in by_runtime.items():
            if needed <= set(comps):
                jobs.append({"root": str(root), "runtime": runtime, "component": "end_to_end", "path": None, "size_bytes": None,
                             "steps": (cfg.student_steps if m.sampler.guidance == "embedded" else None) or cfg.steps
                             or m.sampler.default_steps, "guidance_mode": m.sampler.guidance})
    if not jobs:
        raise UserError(f"{root}: nothing to benchmark for runtimes {sorted(wanted) if wanted else 'any'} on this host")
    return jobs


def _run_child(job: dict, cfg: BenchConfig, runs: int) -> dict:
    payload = dict(job, threads=cfg.threads, runs=runs, warmup=cfg.warmup)
    if job["component"] == "end_to_end":
        payload["runs"] = max(1, min(runs, 3))
        payload["warmup"] = min(cfg.warmup, 1)
    p = subprocess.run([sys.executable, "-m", "pocketfusion.runtimes.measure", json.dumps(payload)], capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    err = (p.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"measurement of {job['runtime']}/{job['component']} failed: {err}")


def _macs(root: Path) -> dict:
    """MACs per call of each component at its exported batch, from the source model when it is still on disk:
    ``{component: {"macs": count_macs(...), "profile": layer_profile(...)}}`` (the shapes its roofline probes)."""
    from pocketfusion import artifact

    m = artifact.load_manifest(root, verify=False)
    if m.source is None or not Path(m.source.path).exists():
        return {}
    try:
        from pocketfusion.checkpoint import load_model
        from pocketfusion.macs import component_callable, component_inputs, count_macs, layer_profile

        model = load_model(m.source.path, verify=False)
        out = {}
        for c in m.components:
            if c.target is None or c.name in out or not c.inputs:
                continue
            args, kwargs = component_inputs(model, c.name, batch=c.inputs[0].shape[0])
            fn = component_callable(model, c.name)
            out[c.name] = {"macs": count_macs(fn, args, kwargs), "profile": layer_profile(fn, args, kwargs)}
        return out
    except Exception:  # MACs are an annotation; a source that no longer loads does not stop the bench
        return {}


def bench(dirs: list[Path], cfg: BenchConfig, *, progress: bool = True, probe_cache: Path | None = None,
          relative_to: Path | None = None) -> dict:
    """Measure every (artifact, runtime, component) in a child process; returns the results dict.

    ``probe_cache``: a JSON file of the roofline probes (``runtimes.roofline``), read when it exists and written
    after probing, so that a later bench on this host, runtime and threads skips the probes it holds.
    ``relative_to``: the folder the results are written into; an artifact inside it is recorded by its path
    relative to it (a run's ``bench.json``: valid after the run folder is renamed into place or moved)."""
    import datetime as dt

    from tqdm import tqdm

    from pocketfusion import artifact

    labels = _labels(dirs)
    jobs_per_dir = {label: _jobs(d, cfg) for label, d in zip(labels, dirs)}
    samples: dict[tuple[str, str, str], list[dict]] = {}
    per_round = max(1, cfg.runs // cfg.rounds)
    total = sum(len(j) for j in jobs_per_dir.values()) * cfg.rounds
    bar = tqdm(total=total, desc="bench", disable=not progress, unit="run")
    for _ in range(cfg.rounds):
        for label in labels:  # interleaved: every artifact once per round
            for job in jobs_per_dir[label]:
                bar.set_postfix_str(f"{label}:{job['runtime']}/{job['component']}")
                samples.setdefault((label, job["runtime"], job["component"]), []).append(_run_child(job, cfg, per_round))
                bar.update()
    bar.close()
    host = host_info()
    macs_per_dir = {label: _macs(d) for label, d in zip(labels, dirs)}
    if probe_cache is not None:
        from pocketfusion.runtimes import roofline

        roofline.load_cache(probe_cache)
    host["roofline"] = _probe(jobs_per_dir, macs_per_dir, cfg, host)
    if probe_cache is not None:
        roofline.save_cache(probe_cache)
    results = []
    for label, d in zip(labels, dirs):
        macs = macs_per_dir[label]
        for job in jobs_per_dir[label]:
            runs = samples[(label, job["runtime"], job["component"])]
            lat = [x for r in runs for x in r["latencies_ms"]]
            med = float(np.median(lat))
            entry = {
                "artifact": label, "runtime": job["runtime"], "component": job["component"], "device": runs[0]["device"],
                "load_ms": float(np.median([r["load_ms"] for r in runs])),
                "latency_ms": {"median": med, "p90": float(np.percentile(lat, 90)), "min": min(lat), "max": max(lat), "runs": len(lat)},
                "latencies_ms": lat,
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "rss_growth_mib": max(r["rss_growth_mib"] for r in runs),
                "size_bytes": job["size_bytes"],
            }
            if job["component"] == "end_to_end":
                entry.update(steps=job["steps"], guidance_mode=job["guidance_mode"])
                split = [r["breakdown"] for r in runs if r.get("breakdown")]
                if split:  # the median image of the median round: per network, and outside them (per step)
                    entry["breakdown"] = sorted(split, key=lambda b: b["total_ms"])[len(split) // 2]
            if job["component"] in macs:
                _add_roofline(entry, job, macs[job["component"]], host["roofline"], f"{label}/{job['component']}")
            results.append(entry)
    out = {
        "estimates": phone_estimates(results),
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": host, "versions": versions(), "settings": cfg.to_dict(),
        "artifacts": [{"label": lb, "path": _recorded_path(d, relative_to), "manifest_sha256": artifact.sha256_file(d / artifact.MANIFEST)}
                      for lb, d in zip(labels, dirs)],
        "results": results, "notes": [],
    }
    if sys.platform != "darwin":
        out["notes"].append("Core ML artifacts are not timed: Core ML runs only on macOS")
    if len(dirs) > 1:
        out["ratios"] = ratios(out)
    return out


def _probe(jobs_per_dir: dict, macs_per_dir: dict, cfg: BenchConfig, host: dict) -> dict:
    """Each measured runtime's kernel probes at its components' shapes, and the host's bandwidth (``host.roofline``)."""
    from pocketfusion.runtimes import roofline

    shapes: dict[str, dict] = {}
    for label, jobs in jobs_per_dir.items():
        for job in jobs:
            prof = macs_per_dir[label].get(job["component"])
            if prof is not None:
                shapes.setdefault(job["runtime"], {})[f"{label}/{job['component']}"] = roofline.probe_shapes(prof["profile"])
    out = {"bandwidth": roofline.numpy_bandwidth(), "threads": cfg.threads, "runtimes": {}}
    for runtime, sh in shapes.items():
        out["runtimes"][runtime] = roofline.probe_runtime(runtime, sh, threads=cfg.threads, processor=host.get("processor", ""))
    return out


def _add_roofline(entry: dict, job: dict, prof: dict, probes: dict, key: str) -> None:
    """``macs``, ``gflops`` and, where the runtime's probes succeeded, ``roofline_fraction`` / ``roofline_bound`` / ``roofline``."""
    from pocketfusion.runtimes import roofline

    macs = prof["macs"]
    entry["macs"] = macs["total"]
    entry["gflops"] = 2 * macs["total"] / (entry["latency_ms"]["median"] / 1e3) / 1e9
    rt = probes["runtimes"].get(job["runtime"], {})
    if "error" in rt:
        return
    bw, _ = roofline.runtime_bandwidth(rt, probes["bandwidth"])
    roof = roofline.entry_roofline(gflops=entry["gflops"], macs=macs, activation_bytes=prof["profile"]["activation_bytes"],
                                   weight_bytes=job.get("size_bytes"), probes=rt, shapes_key=key, bandwidth_gbs=bw,
                                   precision=job.get("precision", "fp32"))
    if roof is not None:
        entry["roofline_fraction"] = roof.pop("fraction")
        entry["roofline_bound"] = roof.pop("bound")
        entry["roofline"] = roof


def phone_estimates(results: list[dict]) -> list[dict]:
    """Roofline estimates (not measurements) of each measured component's call on each phone profile,
    from its MACs and its artifact's bytes (the weights it must stream once per call)."""
    from pocketfusion.runtimes.devices.profiles import PROFILES, roofline_ms

    out, seen = [], set()
    for r in results:
        key = (r["artifact"], r["component"])
        if "macs" not in r or not r.get("size_bytes") or key in seen:
            continue
        seen.add(key)
        for prof in PROFILES.values():
            est = roofline_ms(r["macs"], r["size_bytes"], prof)
            out.append({"artifact": r["artifact"], "component": r["component"], **est})
    return out


def _recorded_path(d: Path, relative_to: Path | None) -> str:
    """``d`` as the results record it: relative to ``relative_to`` when inside it, else absolute."""
    p = Path(d).resolve()
    if relative_to is not None and p.is_relative_to(base := Path(relative_to).resolve()):
        return p.relative_to(base).as_posix()
    return str(p)


def artifact_path(res_file: Path, recorded: str) -> Path:
    """An artifact's recorded ``path`` in the results file ``res_file`` as a filesystem path (relative: to its folder)."""
    p = Path(recorded)
    return p if p.is_absolute() else Path(res_file).resolve().parent / p


def _labels(dirs: list[Path]) -> list[str]:
    labels, seen = [], set()
    for d in dirs:
        lb = d.resolve().name
        while lb in seen:
            lb += "'"
        seen.add(lb)
        labels.append(lb)
    return labels


def ratios(res: dict) -> dict:
    """Median latency of the first artifact over each other's, per runtime/component (>1: faster)."""
    first = res["artifacts"][0]["label"]
    base = {(r["runtime"], r["component"]): r["latency_ms"]["median"] for r in res["results"] if r["artifact"] == first}
    out: dict[str, dict[str, float]] = {}
    for r in res["results"]:
        key = (r["runtime"], r["component"])
        if r["artifact"] != first and key in base:
            out.setdefault(r["artifact"], {})[f"{key[0]}/{key[1]}"] = base[key] / r["latency_ms"]["median"]
    return out


def format_table(res: dict) -> str:
    head = (
        f"{'artifact':<14} {'runtime':<12} {'component':<13} {'median ms':>10} {'p90 ms':>9} {'min ms':>8} "
        f"{'load ms':>8} {'peak MiB':>9} {'+MiB':>7} {'GFLOP/s':>8} {'roofline (bound)':>17}"
    )
    lines = [
        f"{res['host']['processor']} ({res['host']['cpus']} cpus); PyTorch 1024² fp32 matmul {res['host']['peak_gflops_fp32']:.0f} GFLOP/s "
        "(reference only: each roofline is against its runtime's own kernels)",
        *roofline_lines(res),
        head,
        "-" * len(head),
    ]
    exceeded = []
    for r in res["results"]:
        lat = r["latency_ms"]
        roof = f"{r['roofline_fraction']:6.1%} ({r.get('roofline_bound', '?')})" if "roofline_fraction" in r else "-"
        if r.get("roofline", {}).get("probe_exceeded"):
            roof += "*"
            exceeded.append(f"* {r['artifact']} {r['runtime']}/{r['component']}: {r['roofline']['note']}")
        gf = f"{r['gflops']:8.1f}" if "gflops" in r else f"{'-':>8}"
        lines.append(f"{r['artifact'][:14]:<14} {r['runtime']:<12} {r['component']:<13} {lat['median']:10.2f} {lat['p90']:9.2f} "
                     f"{lat['min']:8.2f} {r['load_ms']:8.1f} {r['peak_rss_mib']:9.1f} {r['rss_growth_mib']:7.1f} {gf} {roof:>17}")
    lines += exceeded
    for label, rs in res.get("ratios", {}).items():
        lines.append(f"{label} against {res['artifacts'][0]['label']} (x faster): " + ", ".join(f"{k} {v:.2f}x" for k, v in rs.items()))
    for e in res.get("estimates", []):
        if e["component"] == "unet":
            lines.append(
                f"estimate (roofline, not measured): {e['artifact']} unet on {e['device']}: "
                f"{e['estimate_ms']:.3f} ms per call ({e['bound']}-bound)"
            )
    lines += [f"note: {n}" for n in res.get("notes", [])]
    return "\n".join(lines)



def roofline_lines(res: dict) -> list[str]:
    """The roofline probes of a results dict, one line for the host's bandwidth and one per runtime."""
    from pocketfusion.runtimes.roofline import probe_summary, runtime_bandwidth

    roof = res["host"].get("roofline")
    if not roof:
        return []
    bw = roof["bandwidth"]
    lines = [f"roofline: bandwidth numpy copy {bw['copy_gbs']:.1f} GB/s, triad {bw['triad_gbs']:.1f} GB/s (one thread)"]
    for runtime, p in roof["runtimes"].items():
        if "error" in p:
            lines.append(f"roofline {runtime}: probe failed: {p['error']}")
            continue
        gbs, src = runtime_bandwidth(p, bw)
        own = (p.get("bandwidth") or {}).get("gbs")
        lines.append(f"roofline {runtime} ({p.get('device', '')}, threads {p.get('threads') or 'default'}): bandwidth {gbs:.1f} GB/s "
                     f"({src}; own Add {own or 0:.1f} GB/s); {probe_summary(p)}")
    return lines


def device_bench(dirs: list[Path], device: str, cfg: BenchConfig, *, runner: Path | None = None, rootfs: Path | None = None) -> dict:
    """Bench on a non-host device: ``qemu-arm64``, ``android[:SERIAL]``, ``mac`` or ``iphone``.

    Returns a results dict of the same schema, ``results`` holding per-component entries.
    """
    import datetime as dt

    from pocketfusion import artifact
    from pocketfusion.runtimes.devices import pfrun

    native = pfrun.is_pfrun(runner) and (device == "qemu-arm64" or device.startswith("android"))
    results, notes = _pfrun_device_bench(dirs, device, cfg, runner) if native else ([], [])
    for d in ([] if native else dirs):
        m = artifact.load_manifest(d)
        comps = _exported(d, m)
        sizes = m.metrics.get("components", {})
        if device == "qemu-arm64":
            from pocketfusion.backends import canonical_runtime
            from pocketfusion.runtimes.devices import qemu

            wanted = {canonical_runtime(r) for r in (cfg.runtimes or ("onnxruntime", "litert"))}
            runtimes = tuple(r for r in ("onnxruntime", "litert") if r in wanted)
            root = qemu.prepare_rootfs(rootfs or Path.home() / ".cache" / "pocketfusion" / "arm64", runtimes)
            for c in comps:
                rt = {"onnx": "onnxruntime", "tflite": "litert"}.get(c.target)
                if rt not in runtimes:
                    continue
                r = qemu.run_component(root, d, c.name, rt, runs=cfg.runs)
                lat = r.pop("latencies_ms")
                results.append({"artifact": d.resolve().name, "runtime": rt, "component": c.name,
                                "device": f"qemu-user arm64 ({r['machine']})", "load_ms": r["load_ms"],
                                "latency_ms": _summary(lat), "latencies_ms": lat, "peak_rss_mib": r["peak_rss_mib"],
                                "rss_growth_mib": None, "size_bytes": sizes.get(c.key, {}).get("size_bytes"),
                                "timing_label": r["timing_label"], "rel_max_vs_host": r["rel_max"]})
            notes.append("qemu-arm64: emulated timings, not device timings; peak memory includes the emulator")
        elif device.startswith("android"):
            from pocketfusion.runtimes.devices import adb

            if runner is None:
                raise UserError("--device android needs --runner: pf-run (or a pf-run aarch64 bundle folder), "
                                "or PATH to executor_runner (.pte) / benchmark_model (.tflite) built for the device")
            serial = device.split(":", 1)[1] if ":" in device else None
            ext = ".pte" if adb.runner_kind(runner) == "executor_runner" else ".tflite"
            for c in comps:
                if not c.path.endswith(ext):
                    continue
                r = adb.bench_on_device(adb.AdbJob(artifact=artifact.resolve_path(d, c.path), runner=runner, serial=serial, runs=cfg.runs,
                                                   warmup=cfg.warmup, threads=cfg.threads or 4))
                results.append({"artifact": d.resolve().name, "runtime": runner.name, "component": c.name,
                                "device": r["device"], "load_ms": r.get("load_ms"), "latency_ms": {"mean": r["latency_ms_avg"]},
                                "peak_rss_mib": r.get("peak_rss_mib"), "size_bytes": sizes.get(c.key, {}).get("size_bytes")})
        elif device in ("mac", "iphone"):
            from pocketfusion.runtimes.devices import ios

            if device == "iphone":
                found = ios.iphone_devices()  # raises on Linux / without Xcode
                raise UserError(f"iPhone timing runs in apps/ios through Xcode ({len(found)} connected); use --device mac for Core ML here")
            for c in comps:
                if c.target == "coreml":
                    feeds = artifact.read_golden(artifact.resolve_path(d, c.golden))[0]
                    r = ios.coreml_bench(artifact.resolve_path(d, c.path), feeds, runs=cfg.runs, warmup=cfg.warmup)
                    results.append({"artifact": d.resolve().name, "runtime": "coreml", "component": c.name, **r})
        else:
            raise UserError(f"unknown device {device!r}; choose host, qemu-arm64, android[:SERIAL], mac or iphone")
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "host": host_info(), "versions": versions(), "settings": cfg.to_dict(), "device": device,
            "artifacts": [
                {"label": d.resolve().name, "path": str(d.resolve()), "manifest_sha256": artifact.sha256_file(d / artifact.MANIFEST)}
                for d in dirs
            ],
            "results": results, "notes": notes}


def _pfrun_device_bench(dirs: list[Path], device: str, cfg: BenchConfig, runner) -> tuple[list, list]:
    """``--runner pf-run``: one ``pf-run bench`` per export on the target; its pocketfusion.bench results read back."""
    from pocketfusion.runtimes.devices import pfrun

    if device.startswith("android"):
        pfrun.attached_device(device.split(":", 1)[1] if ":" in device else None)  # before building a bundle for nothing
    bundle = pfrun.resolve_bundle(runner)
    args = pfrun.bench_args(runs=cfg.runs, warmup=cfg.warmup, threads=cfg.threads, steps=cfg.steps, end_to_end=cfg.end_to_end)
    results, notes = [], []
    for d in dirs:
        if device == "qemu-arm64":
            res = pfrun.bench_qemu(bundle, d, args=args)
        else:
            res = pfrun.bench_android(bundle, d, serial=device.split(":", 1)[1] if ":" in device else None, args=args)
        results.extend(res["results"])
        notes.extend(n for n in res.get("notes", []) if n not in notes)
    if device == "qemu-arm64":
        notes.append("qemu-arm64: emulated timings, not device timings; peak memory is the emulated process's")
    return results, notes


def _summary(lat: list[float]) -> dict:
    return {"median": float(np.median(lat)), "p90": float(np.percentile(lat, 90)), "min": min(lat), "max": max(lat), "runs": len(lat)}
