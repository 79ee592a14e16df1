"""``python benchmarks/prune.py``: pruned U-Nets against their original, and the search's frontier.

    python benchmarks/prune.py --model searched=pocketfusion/demo/model-pruned --model bk-sdm-small=runs/prune/bk-small \\
        [--runtime onnxruntime] [--accuracy 240] --json prune.json --html prune.html

Every pruned model's U-Net and the original are exported and timed in one interleaved run on the
runtime (``export.latency.measure_variants``); each model's teacher-vs-student error comes from its
manifest, its prompt accuracy from its manifest's ``evaluation`` (or is measured with ``--accuracy N``).
The HTML page plots the search's frontier (error against estimated and measured latency, one point per
step of the search) with every model, the BK-SDM presets included, on the same axes.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path


def compare(models: dict[str, Path], *, runtime: str = "onnxruntime", runs: int = 20, rounds: int = 5, accuracy: int | None = None,
            threads: int | None = None, progress: bool = True) -> dict:
    from pocketfusion import artifact
    from pocketfusion.checkpoint import find_source, load_model
    from pocketfusion.export.latency import measure_variants

    rows, original = {}, None
    for label, path in models.items():
        m = artifact.load_manifest(path)
        if m.stage != "prune":
            raise SystemExit(f"error: {path} is a {m.stage!r} artifact, not a pruned model")
        model = load_model(path)
        src = find_source(model)
        if src is None:
            raise SystemExit(f"error: the original of {path} ({m.source.path}) is not on this machine")
        original = original or src
        p = m.metrics["pruning"]
        ev = m.metrics.get("evaluation")
        if accuracy:
            from pocketfusion.demo.students import measure

            ev = measure(model, n_prompts=accuracy, progress=progress)
        rows[label] = {"path": str(path), "removed": p["removed"], "preset": p["preset"], "params": p["params"],
                       "macs_per_call": p["macs_per_call"], "error_vs_teacher": p["error_vs_teacher"]["after_recovery"],
                       "error_before_recovery": p["error_vs_teacher"]["before_recovery"], "frontier": p["frontier"],
                       "evaluation": ev, "plain_diffusers": p.get("plain_diffusers"),
                       "training_s": m.metrics["training"].get("wall_s"), "manifest_latency": p["latency"]}
    base = load_model(original)
    seq_len = base.components["tokenizer"].model_max_length
    ms = measure_variants(base.unet, {"original": [], **{k: r["removed"] for k, r in rows.items()}}, runtime, seq_len=seq_len,
                          runs=runs, rounds=rounds, threads=threads, progress=progress)
    full = ms["original"]["median_ms"]
    for k, r in rows.items():
        r["ms"] = ms[k]["median_ms"]
        r["speedup"] = full / ms[k]["median_ms"]
    ref = artifact.load_manifest(original).metrics.get("evaluation")
    return {"runtime": runtime, "device": ms["original"]["device"], "original": str(original), "original_ms": full,
            "original_evaluation": ref, "models": rows, "runs": runs, "rounds": rounds}


def _plot(res: dict) -> str:
    from pocketfusion.backends import require

    plt = require("matplotlib.pyplot", "report")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (label, r) in enumerate(res["models"].items()):
        pts = [f for f in r["frontier"] if "est_ms" in f]
        if r["preset"] is None and pts:
            base = pts[0]["est_ms"]
            ax.plot([f["est_ms"] / base for f in pts], [f["error"] for f in pts], ".", color=f"C{i}", alpha=0.5,
                    label=f"{label}: search steps (table estimate)")
            meas = [f for f in pts if "measured_ratio" in f]
            ax.plot([f["measured_ratio"] for f in meas], [f["error"] for f in meas], "x", color=f"C{i}",
                    label=f"{label}: search points, measured")
        ax.plot([1 / r["speedup"]], [r["error_vs_teacher"]], "o", ms=9, color=f"C{i}", label=f"{label} after KD recovery")
    ax.set_xlabel(f"U-Net latency / original's ({res['runtime']})")
    ax.set_ylabel("error vs the original (MSE / teacher's mean square)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def render(res: dict) -> str:
    ref = res.get("original_evaluation") or {}
    head = ("<tr><th>model</th><th>units removed</th><th>params</th><th>MACs</th><th>ms/call</th><th>speed-up</th>"
            "<th>error vs original</th><th>all five</th><th>of the original's</th><th>plain diffusers</th></tr>")
    body = []
    for label, r in res["models"].items():
        ev = r.get("evaluation") or {}
        acc = ev.get("all_correct")
        share = f"{acc / ref['all_correct']:.1%}" if acc is not None and ref.get("all_correct") else "–"
        body.append(f"<tr><td>{label}</td><td>{len(r['removed'])}</td><td>-{r['params']['removed_fraction']:.0%}</td>"
                    f"<td>-{r['macs_per_call']['removed_fraction']:.0%}</td><td>{r['ms']:.3f}</td><td>{r['speedup']:.2f}x</td>"
                    f"<td>{r['error_vs_teacher']:.4f}</td><td>{'–' if acc is None else f'{acc:.1%}'}</td><td>{share}</td>"
                    f"<td>{'yes' if r['plain_diffusers'] else 'no'}</td></tr>")
    return (f"<html><head><meta charset='utf-8'><title>pocketfusion pruning</title></head><body>"
            f"<h1>Pruned U-Nets on {res['runtime']}</h1><p>{res['device']}; original {res['original_ms']:.3f} ms per call "
            f"(interleaved, {res['rounds']} rounds x {res['runs']} calls)</p>"
            f"<img src='data:image/png;base64,{_plot(res)}'><table border=1 cellpadding=4>{head}{''.join(body)}</table></body></html>")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="LABEL=DIR", help="a pruned model (repeatable)")
    ap.add_argument("--runtime", default="onnxruntime")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="threads per session (default: the runtime's own)")
    ap.add_argument("--accuracy", type=int, default=None, metavar="N", help="measure prompt accuracy on N held-out prompts")
    ap.add_argument("--json", default=None)
    ap.add_argument("--html", default=None)
    a = ap.parse_args(argv)
    models = {}
    for item in a.model:
        label, _, path = item.partition("=")
        models[label] = Path(path or label)
    res = compare(models, runtime=a.runtime, runs=a.runs, rounds=a.rounds, accuracy=a.accuracy, threads=a.threads)
    for label, r in res["models"].items():
        ev = r.get("evaluation") or {}
        print(f"{label:>14}: {r['ms']:.3f} ms ({r['speedup']:.2f}x), error {r['error_vs_teacher']:.4f}, "
              f"all five {ev.get('all_correct', float('nan')):.3f}, params -{r['params']['removed_fraction']:.0%}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    if a.html:
        Path(a.html).write_text(render(res))
    return 0
