"""``report``: one self-contained HTML page (PNG plots inlined) from bench results and eval outputs."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from pocketfusion.errors import UserError
from pocketfusion.runtimes.base import require

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}th,td{padding:.3em .7em;border-bottom:1px solid #eee;text-align:right}
th{background:#f6f6f6}td:first-child,th:first-child,td:nth-child(2),td:nth-child(3){text-align:left}
.meta{color:#666;font-size:.9em}img{max-width:100%}.grid{image-rendering:pixelated;width:100%}
"""


def load_results(paths: list[Path]) -> list[dict]:
    from pocketfusion.runtimes.bench import artifact_path

    out = []
    for p in paths:
        try:
            d = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{p}: cannot read bench results ({e})") from None
        if d.get("schema") != "pocketfusion.bench" or d.get("schema_version") != 1:
            raise UserError(f"{p}: not a pocketfusion bench result of schema version 1")
        for a in d.get("artifacts", []):  # a run's bench.json records its exports relative to itself
            a["path"] = str(artifact_path(Path(p), a["path"]))
        out.append(d)
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _latency_plot(rows: list[dict]) -> str:
    plt = require("matplotlib.pyplot", "report")
    order = ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "end_to_end"]
    comps = sorted({r["component"] for r in rows}, key=lambda c: (order.index(c) if c in order else len(order), c))
    series = sorted({(r["artifact"], r["runtime"]) for r in rows})
    fig, axes = plt.subplots(1, len(comps), figsize=(3.2 * len(comps), 3.2), squeeze=False)
    for ax, comp in zip(axes[0], comps):
        vals = [
            next((r["latency_ms"]["median"] for r in rows if (r["artifact"], r["runtime"]) == s and r["component"] == comp), 0)
            for s in series
        ]
        p90 = [
            next((r["latency_ms"]["p90"] for r in rows if (r["artifact"], r["runtime"]) == s and r["component"] == comp), 0)
            for s in series
        ]
        ax.bar(
            range(len(series)),
            vals,
            yerr=[[0] * len(vals), [b - a for a, b in zip(vals, p90)]],
            color=[f"C{i}" for i in range(len(series))],
        )
        ax.set_xticks(range(len(series)), [f"{a}\n{r}" for a, r in series], rotation=45, ha="right", fontsize=7)
        ax.set_title(comp, fontsize=9)
        ax.set_ylabel("ms (median, bar to p90)", fontsize=8)
    fig.tight_layout()
    s = _png(fig)
    plt.close(fig)
    return s


def _memory_size_plot(rows: list[dict]) -> str:
    plt = require("matplotlib.pyplot", "report")
    rows = [r for r in rows if r["component"] != "end_to_end"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    labels = [f"{r['artifact']}\n{r['runtime']}/{r['component']}" for r in rows]
    a1.barh(range(len(rows)), [r["peak_rss_mib"] for r in rows], color="C0", label="peak RSS")
    a1.barh(range(len(rows)), [r["rss_growth_mib"] for r in rows], color="C1", label="growth over baseline")
    a1.set_yticks(range(len(rows)), labels, fontsize=6)
    a1.set_xlabel("MiB")
    a1.legend(fontsize=7)
    a2.barh(range(len(rows)), [(r["size_bytes"] or 0) / 1e6 for r in rows], color="C2")
    a2.set_yticks(range(len(rows)), [""] * len(rows))
    a2.set_xlabel("artifact size, MB")
    fig.tight_layout()
    s = _png(fig)
    plt.close(fig)
    return s


def _table(rows: list[dict]) -> str:
    head = (
        "<tr><th>artifact</th><th>runtime</th><th>component</th><th>median ms</th><th>p90 ms</th><th>min ms</th>"
        "<th>load ms</th><th>peak MiB</th><th>+MiB</th><th>size MB</th><th>roofline</th></tr>"
    )
    body = []
    for r in rows:
        lat = r["latency_ms"]
        roof = f"{r['roofline_fraction']:.1%} ({r.get('roofline_bound', 'old 1024² matmul probe')})" if "roofline_fraction" in r else "–"
        if r.get("roofline", {}).get("probe_exceeded"):
            roof = f"<span title='{html.escape(r['roofline']['note'], quote=True)}'>{roof}*</span>"
        size = f"{r['size_bytes'] / 1e6:.2f}" if r.get("size_bytes") else "–"
        body.append(
            f"<tr><td>{html.escape(r['artifact'])}</td><td>{html.escape(r['runtime'])}</td><td>{html.escape(r['component'])}</td>"
            f"<td>{lat['median']:.2f}</td><td>{lat['p90']:.2f}</td><td>{lat['min']:.2f}</td><td>{r['load_ms']:.1f}</td>"
            f"<td>{r['peak_rss_mib']:.1f}</td><td>{r['rss_growth_mib']:.1f}</td><td>{size}</td><td>{roof}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def _roofline(res: dict) -> str:
    """The roofline's probes: the host's bandwidth, each runtime's GEMM / 3x3 conv GFLOP/s at the components' shapes."""
    from pocketfusion.runtimes.bench import roofline_lines

    lines = roofline_lines(res)
    if not lines:
        return ""
    notes = [f"{r['artifact']} {r['runtime']}/{r['component']}: {r['roofline']['note']}" for r in res["results"]
             if r.get("roofline", {}).get("probe_exceeded")]
    items = "".join(f"<li>{html.escape(x)}</li>" for x in lines + notes)
    return ("<h3>Roofline (fraction of min(compute ceiling of the runtime's own kernels, bandwidth × arithmetic intensity); "
            f"bound: the lower ceiling)</h3><ul class='meta'>{items}</ul>")


def _grids(res: dict) -> str:
    """Eval grids of the artifacts' sources and of run directories next to them, where present."""
    parts = []
    for a in res.get("artifacts", []):
        for cand in (Path(a["path"]) / "eval.png", Path(a["path"]).parent / "eval.png", Path(a["path"]).parent / "grid.png"):
            if cand.is_file():
                b64 = base64.b64encode(cand.read_bytes()).decode()
                parts.append(
                    f"<h3>{html.escape(a['label'])}: {html.escape(cand.name)}</h3><img class='grid' src='data:image/png;base64,{b64}'>"
                )
                break
    return "".join(parts)


def render(results: list[dict]) -> str:
    """HTML for one or more bench results."""
    sections = []
    for i, res in enumerate(results, 1):
        host = res["host"]
        meta = (f"{html.escape(host['processor'])}, {host['cpus']} CPUs, {html.escape(host['os'])}; PyTorch 1024² fp32 matmul "
                f"{host['peak_gflops_fp32']:.0f} GFLOP/s (reference only); threads {res['settings'].get('threads') or 'default'}, "
                f"{res['settings']['runs']} runs after {res['settings']['warmup']} warm-up; {html.escape(res['created'])}")
        vers = ", ".join(f"{k} {v}" for k, v in res.get("versions", {}).items())
        arts = "".join(
            f"<li>{html.escape(a['label'])}: <code>{html.escape(a['path'])}</code> (manifest sha256 {a['manifest_sha256'][:12]}…)</li>"
            for a in res["artifacts"]
        )
        sec = [f"<h2>Run {i}</h2><p class='meta'>{meta}<br>{html.escape(vers)}</p><ul>{arts}</ul>", _table(res["results"])]
        sec.append(_roofline(res))
        sec.append(f"<h3>Latency</h3><img src='data:image/png;base64,{_latency_plot(res['results'])}'>")
        sec.append(f"<h3>Memory and size</h3><img src='data:image/png;base64,{_memory_size_plot(res['results'])}'>")
        if res.get("ratios"):
            items = "".join(
                f"<li>{html.escape(lb)}: " + ", ".join(f"{k} {v:.2f}×" for k, v in rs.items()) + "</li>" for lb, rs in res["ratios"].items()
            )
            sec.append(f"<h3>Ratios (first artifact's speed over each other's)</h3><ul>{items}</ul>")
        est = [e for e in res.get("estimates", []) if e["component"] == "unet"]
        if est:
            rows = "".join(f"<tr><td>{html.escape(e['artifact'])}</td><td>{html.escape(e['device'])}</td><td>{e['estimate_ms']:.3f}</td>"
                           f"<td>{e['compute_ms']:.3f}</td><td>{e['memory_ms']:.3f}</td><td>{e['bound']}</td></tr>" for e in est)
            sec.append("<h3>Phone estimates (roofline at 25 % of peak: estimates, not measurements)</h3><table><tr><th>artifact</th>"
                       f"<th>device</th><th>U-Net ms/call</th><th>compute ms</th><th>memory ms</th><th>bound</th></tr>{rows}</table>")
        sec.append(_grids(res))
        if res.get("notes"):
            sec.append("<p class='meta'>" + "<br>".join(html.escape(n) for n in res["notes"]) + "</p>")
        sections.append("".join(sec))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>pocketfusion bench report</title><style>{_CSS}</style></head>"
            f"<body><h1>pocketfusion bench report</h1>{''.join(sections)}</body></html>")


def write_report(paths: list[Path], out: Path) -> None:
    from pocketfusion.artifact import atomic_write_text

    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"report output {out} must end in .html")
    atomic_write_text(out, render(load_results(paths)))
