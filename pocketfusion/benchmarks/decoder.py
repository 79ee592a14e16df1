"""The compact VAE decoder against the original: decoder latency per runtime, interleaved, in one run.

    python benchmarks/decoder.py [MODEL] [--reference demo] [--runtime onnxruntime,executorch,litert] [--threads N]
        [--runs 60] [--rounds 3] [--work runs/decoder-bench] [--json OUT] [--record]

Both pipelines' ``vae_decoder`` is exported to every target of the runtimes asked for (parity measured against
PyTorch, as ``pocketfusion export`` does), then ``pocketfusion.runtimes.bench`` times both exports in turn, each
call in its own process, ``--rounds`` interleaved rounds. ``--record`` writes the figures into MODEL's manifest
(``metrics["latency"]``; for a bundled model such as ``demo-tiny-decoder``, the shipped manifest), with the host,
the thread count and the runtime versions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RUNTIME_TARGETS = {"onnxruntime": "onnx", "executorch": "executorch", "litert": "tflite"}


def measure(model_path: str, reference: str, runtimes: tuple[str, ...], work: Path, *, threads: int | None, runs: int,
            rounds: int) -> dict:
    """Export both decoders and time them interleaved; returns the figures (per runtime: ms, ratio) and the bench JSON."""
    from pocketfusion.checkpoint import load_model
    from pocketfusion.export.api import export
    from pocketfusion.export.base import ExportConfig
    from pocketfusion.runtimes.bench import BenchConfig, bench

    targets = tuple(RUNTIME_TARGETS[r] for r in runtimes)
    dirs, parity = [], {}
    for label, src in (("original", reference), ("compact", model_path)):
        out = work / label
        m = export(load_model(src), ExportConfig(targets=targets, components=("vae_decoder",)), out, progress=False)
        parity[label] = {k: v["parity"] for k, v in m.metrics["components"].items()}
        dirs.append(out)
    res = bench(dirs, BenchConfig(runtimes=runtimes, threads=threads, runs=runs, rounds=rounds, end_to_end=False))
    by = {(r["artifact"], r["runtime"]): r for r in res["results"] if r["component"] == "vae_decoder"}
    figures = {}
    for rt in runtimes:
        old, new = by[("original", rt)], by[("compact", rt)]
        figures[rt] = {"original_ms": round(old["latency_ms"]["median"], 4), "compact_ms": round(new["latency_ms"]["median"], 4),
                       "speedup": round(old["latency_ms"]["median"] / new["latency_ms"]["median"], 3),
                       "original_p90_ms": round(old["latency_ms"]["p90"], 4), "compact_p90_ms": round(new["latency_ms"]["p90"], 4),
                       "runs": new["latency_ms"]["runs"]}
    summary = {"decoder_ms": figures, "threads": threads, "rounds": rounds, "runs": runs, "interleaved": True,
               "host": {k: res["host"][k] for k in ("processor", "cpus") if k in res["host"]}, "versions": res["versions"],
               "parity": parity, "reference": str(load_model(reference).path), "created": res["created"]}
    return {"summary": summary, "bench": res}


def record(model_path: str, summary: dict, key: str) -> Path:
    """Write ``summary`` into the model's manifest as ``metrics["latency"][key]`` (the files are unchanged)."""
    from pocketfusion import artifact
    from pocketfusion.checkpoint import resolve_model_path

    root = resolve_model_path(model_path)
    m = artifact.load_manifest(root)
    latency = dict(m.metrics.get("latency", {}), **{key: summary})
    artifact.write_manifest(root, stage=m.stage, settings=m.settings, source=m.source, components=m.components,
                            calibration=m.calibration, sampler=m.sampler, metrics=dict(m.metrics, latency=latency), notes=m.notes)
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="demo-tiny-decoder")
    ap.add_argument("--reference", default="demo", help="the pipeline with the original decoder (default demo)")
    ap.add_argument("--runtime", default="onnxruntime,executorch,litert")
    ap.add_argument("--threads", type=int, default=None, help="threads per runtime (default: the runtime's own)")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="runs/decoder-bench")
    ap.add_argument("--json", default=None)
    ap.add_argument("--record", action="store_true", help="write the figures into MODEL's manifest (metrics.latency)")
    args = ap.parse_args(argv)
    runtimes = tuple(r.strip() for r in args.runtime.split(",") if r.strip())
    unknown = sorted(set(runtimes) - set(RUNTIME_TARGETS))
    if unknown:
        ap.error(f"unknown runtime(s) {unknown}; known: {', '.join(RUNTIME_TARGETS)}")
    out = measure(args.model, args.reference, runtimes, Path(args.work), threads=args.threads, runs=args.runs, rounds=args.rounds)
    s = out["summary"]
    for rt, f in s["decoder_ms"].items():
        print(f"{rt:<12} original {f['original_ms']:7.3f} ms  compact {f['compact_ms']:7.3f} ms  {f['speedup']:.2f}x faster")
    if args.json:
        from pocketfusion.artifact import atomic_write_text

        atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")
    if args.record:
        key = f"threads_{args.threads}" if args.threads else "threads_default"
        print(f"recorded in {record(args.model, s, key) / 'manifest.json'} (metrics.latency.{key})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
