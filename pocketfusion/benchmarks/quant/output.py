"""What a run prints and writes: the markdown table, its header line and the JSON of every figure."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pocketfusion.benchmarks.quant.rows import LEVELS, Row

NOTE_CHARS = 110  # each note's length in the printed table (the JSON has them whole)
SCHEMA = "pocketfusion.bench.quant"
SCHEMA_VERSION = 2  # 2: error keys rel_max / rel_rms (were rel / rel_l2)
VERSIONED = ("torch", "diffusers", "onnxruntime", "ai-edge-quantizer", "ai-edge-litert", "coremltools", "executorch", "torchao",
             "optimum-quanto")


def _fmt(v, spec: str, none: str = "–") -> str:
    if v is None:
        return none
    if isinstance(v, float) and np.isinf(v):
        return "inf"
    return format(v, spec)


def _line(r: Row) -> str:
    bits = r.bits_detail or str(r.bits)
    if r.status != "ok":
        reason = r.reason.replace("|", "/")
        return f"| {bits} | {r.name} | {r.level} | – | – | – | – | – | – | – | **{r.status}**: {reason} |"
    size = _fmt(r.size_bytes / 1e6 if r.size_bytes is not None else None, ".2f")
    if r.size_kind == "packed":
        size += " (packed)"
    err = r.error or {}
    img = f"{_fmt(r.images['mean_db'], '.1f')} / {_fmt(r.images['min_db'], '.1f')}" if r.images else "–"
    acc = _fmt(100 * r.accuracy["mean"] if r.accuracy else None, ".1f")
    lat = _fmt(r.latency["median_ms"] if r.latency else None, ".2f")
    notes = "; ".join(n if len(n) <= NOTE_CHARS else n[: NOTE_CHARS - 1] + "…" for n in r.notes).replace("|", "/")
    return (f"| {bits} | {r.name} | {r.level} | {size} | {_fmt(r.size_pct, '.1f')} | {_fmt(err.get('rel_max'), '.2e')} | "
            f"{_fmt(err.get('snr_db'), '.1f')} | {img} | {acc} | {lat} | {notes} |")


def format_table(rows: list[Row]) -> str:
    """Markdown table: one line per row, grouped fp32 / W8 / W4, levels in ``LEVELS`` order."""
    head = ("| bits | row | runs in | size MB | % fp32 | U-Net rel_max | SNR dB | image PSNR dB mean / min | prompt acc % | ms/call "
            "| notes |\n|---|---|---|---|---|---|---|---|---|---|---|")
    order = {lv: i for i, lv in enumerate(LEVELS)}
    return "\n".join([head] + [_line(r) for r in sorted(rows, key=lambda r: (-r.bits, order.get(r.level, 9)))])


def header(model_name: str, fp32_param_bytes: int, n_feeds: int, n_prompts: int, a, latency: bool) -> str:
    """The line above the table: what was measured, on what."""
    host = f"{platform.processor() or platform.machine()}, {a.threads} thread(s)"
    return (f"{model_name} U-Net ({fp32_param_bytes / 4e6:.2f} M params); errors on {n_feeds} held-out calibration feeds "
            f"(CFG pairs); images: {n_prompts} held-out prompts x {a.steps} steps, seeds {a.seed}..; "
            + (f"latency: {a.rounds}x{a.runs} interleaved calls, {host}" if latency else f"latency skipped, {host}"))


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for p in VERSIONED:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def result(b, a, cset, feeds: list, table: str, seconds: float) -> dict:
    """Every figure of a run (JSON-able)."""
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "model": str(b.model.path), "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "host": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                 "python": sys.version.split()[0]},
        "versions": versions(),
        "calibration": {"prompts": len(cset.prompts), "heldout_prompts": len(cset.prompt_indices("heldout")),
                        "heldout_feeds_used": len(feeds), "settings": cset.settings},
        "image_prompts": b.prompts, "fp32_accuracy": b.fp32_accuracy,
        "fp32_bytes": {"parameters": b.fp32_param_bytes, "torch_save": b.fp32_state_bytes},
        "rows": [r.to_dict() for r in b.rows], "table_markdown": table,
        "seconds": round(seconds, 1),
    }


def write_json(res: dict, path: Path | None) -> Path:
    """Write ``res`` to ``path`` (default: a time-stamped file in the system temp directory)."""
    out = path or Path(tempfile.gettempdir()) / f"pf-bench-quant-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(res, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n")
    return out
