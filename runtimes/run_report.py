"""``report.html`` of ``pocketfusion run``: the run's one page, built from the figures its manifests and
``bench.json`` hold (nothing estimated; a missing figure is "–" with the reason).

One section per pipeline of the run (the teacher when the run has one, the run's model, its compressed U-Net),
each with its PyTorch form and its export: quality against its source (prompt accuracy, image PSNR, U-Net SNR and
export parity), size per target, latency and peak memory per runtime and component, the ratios against the
original (the teacher, else the run's model) and against its source, and its showcase images (``images/``,
captioned with their prompts) beside the original's. Every link and image is a path relative to the report's
folder, so the page stays whole when the run's staging directory is renamed into place or the run is moved.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pocketfusion.errors import UserError

ORDER = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "end_to_end")
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1240px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.3em;margin-top:2.2em;border-bottom:2px solid #ccc;padding-bottom:.2em}
h3{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse;font-size:.86em;margin:.5em 0}
th,td{padding:.28em .6em;border-bottom:1px solid #eee;text-align:right;vertical-align:top}
th{background:#f4f4f4}td.l,th.l{text-align:left}tr.sep td{border-top:2px solid #ddd}
.meta{color:#555;font-size:.88em}.na{color:#999}.why{color:#888;font-size:.85em}ol.notes{color:#666;font-size:.8em}
.sub{display:block;color:#666;font-size:.82em}code{font-size:.92em}table.summary td{min-width:5.5em}
table.imgs td{border:0;padding:2px 3px;text-align:center}
table.imgs th{background:none;text-align:left;font-size:.85em;max-width:9em;font-weight:600}
figure{margin:0;width:116px}figure img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ddd}
.bench td:nth-child(-n+3),.bench th:nth-child(-n+3){text-align:left}
figcaption{font-size:.68em;line-height:1.2;color:#333}figcaption .db{display:block;color:#777}img.plot{max-width:100%}
"""


@dataclass(frozen=True)
class _Pipe:
    key: str  # teacher / model / compressed: the ``showcase`` row of its PyTorch form
    title: str
    folder: str | None  # its PyTorch folder inside the run (None: outside it)
    export: str | None  # its export folder inside the run (None: none)
    source: str | None  # the pipeline it was made from


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _na(why: str) -> str:
    return f"<span class='na'>–</span> <span class='why'>({_esc(why)})</span>"


def _td(key: str, content: str, cls: str = "") -> str:
    return f"<td data-k='{key}'{f' class={cls!r}' if cls else ''}>{content}</td>"


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _mb(b) -> str:
    return f"{b / 1e6:.2f} MB"


def _x(v: float) -> str:
    return f"{v:.2f}×"


def _name(path: str | None) -> str:
    """A model's bundled name, else its folder's name (never its absolute path)."""
    if not path:
        return "?"
    from pocketfusion.checkpoint import BUNDLED

    p = Path(path)
    for name, b in BUNDLED.items():
        if p == b or str(p) == str(b.resolve()):
            return name
    return p.name


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class _Run:
    def __init__(self, root: Path, run: dict, base: Path):
        self.root, self.base, self.run = root, base, run
        self.m = run["metrics"]
        self.settings = run.get("settings", {})
        self.bench = _read_json(root / "bench.json") if (root / "bench.json").is_file() else None
        self.rows = {(r["artifact"], r["runtime"], r["component"]): r for r in (self.bench or {}).get("results", [])}
        self.show = {r["key"]: r for r in self.m.get("showcase", {}).get("rows", [])}
        m, scheme = self.m, self.m.get("compress", {}).get("scheme")
        src = _name(run.get("source", {}).get("path"))
        pipes = []
        if "teacher" in m:
            pipes.append(_Pipe("teacher", f"the teacher, {_name(m['teacher'].get('path'))} "
                                          f"({m['teacher']['teacher_steps']} steps, classifier-free guidance)", None,
                               "teacher-export" if self._has("teacher-export") else None, None))
        steps = self.settings.get("steps")
        pipes.append(_Pipe("model", f"the run's model, {src} ({steps} steps, fp32)", None, "export" if self._has("export") else None,
                           "teacher" if "teacher" in m else None))
        if "compress" in m:
            c = m["compress"]
            pipes.append(_Pipe("compressed", f"{src} with its U-Net quantized: {c['scheme'].upper()} ({c['method']})", "compressed",
                               f"export-{scheme}" if self._has(f"export-{scheme}") else None, "model"))
        self.pipes = {p.key: p for p in pipes}
        self.original = pipes[0]
        self.notes: dict[str, int] = {}

    def na(self, why: str) -> str:
        """"–" with a footnote number; the footnotes (``self.notes``) are listed under the summary."""
        n = self.notes.setdefault(why, len(self.notes) + 1)
        return f"<span class='na' title='{_esc(why)}'>–<sup>{n}</sup></span>"

    def _has(self, folder: str) -> bool:
        return (self.root / folder / "manifest.json").is_file()

    def rel(self, path: str) -> str:
        """``path`` (relative to the run) relative to the report's folder, as a URL path."""
        return _esc(Path(os.path.relpath((self.root / path).resolve(), self.base.resolve())).as_posix())

    def link(self, path: str, text: str | None = None) -> str:
        return f"<a href='{self.rel(path)}'><code>{_esc(text or path)}</code></a>"

    def components(self, folder: str | None) -> dict:
        """``target/component`` -> the export manifest's measured figures (size, parity, versus_fp32)."""
        if folder is None:
            return {}
        man = _read_json(self.root / folder / "manifest.json") or {}
        return man.get("metrics", {}).get("components", {})

    def runtimes(self, folder: str | None) -> list[tuple[str, str]]:
        """(target, runtime) of every target the export has, in its order."""
        from pocketfusion import backends

        targets = dict.fromkeys(k.split("/")[0] for k in self.components(folder))
        return [(t, backends.backend(t).runtime) for t in targets if t in backends.BACKENDS]

    def sizes(self, folder: str | None, target: str) -> dict[str, int]:
        comps = self.components(folder)
        return {k.split("/", 1)[1]: v["size_bytes"] for k, v in comps.items() if k.startswith(f"{target}/") and v.get("size_bytes")}

    def bench_row(self, folder: str | None, runtime: str, component: str = "end_to_end") -> dict | None:
        return self.rows.get((folder, runtime, component)) if folder else None

    def no_bench(self, folder: str | None, runtime: str) -> str:
        if folder is None:
            return "no export"
        if self.bench is None:
            return "not benchmarked (--bench-runs 0)" if self.settings.get("bench_runs") == 0 else "no bench.json in the run"
        from pocketfusion import backends

        if not backends.for_runtime(runtime).runs_on_linux and not self.bench["host"].get("os", "").startswith("Darwin"):
            return f"{runtime} runs only on macOS"
        return f"no {runtime} measurement in bench.json"

    # ---- quality -------------------------------------------------------------------------------------------------
    def accuracy(self, key: str) -> tuple[dict | None, str]:
        """(per_attribute, all_correct, n) of a PyTorch pipeline, or (None, why)."""
        m = self.m
        if key == "teacher":
            ev = m["teacher"].get("evaluation")
            if not ev:
                return None, m["teacher"].get("evaluation_missing", "the teacher's prompt accuracy is not recorded")
            return {"per_attribute": ev["per_attribute"], "all": ev["all_correct"], "n": ev["prompts"], "from": ev.get("from")}, ""
        if key == "model":
            return {"per_attribute": m["prompt_accuracy"], "all": m["all_attributes_correct"], "n": m["eval_prompts"]}, ""
        c = m["compress"]
        return {"per_attribute": c["prompt_accuracy"], "all": c["all_attributes_correct"], "n": c["eval_prompts"]}, ""

    def accuracy_cell(self, key: str) -> str:
        acc, why = self.accuracy(key)
        if acc is None:
            return _td("accuracy", self.na(why))
        txt = f"{_pct(acc['all'])}<span class='sub'>{acc['n']} prompts</span>"
        src = self.pipes[key].source
        if src:
            ref, _ = self.accuracy(src)
            if ref is not None and ref["n"] == acc["n"]:
                txt += f"<span class='sub'>{(acc['all'] - ref['all']) * 100:+.1f} pt vs {_esc(src)}</span>"
        if acc.get("from"):
            txt += f"<span class='sub'>from {_esc(acc['from'])}</span>"
        return _td("accuracy", txt)

    def psnr_text(self, row: dict | None, *, what: str) -> str | None:
        p = (row or {}).get("psnr_db")
        if not p:
            return None
        n = len(row["images"])
        if p.get("identical_images") == n:
            return f"identical<span class='sub'>{n}/{n} images equal {_esc(what)}'s</span>"
        same = f", {p['identical_images']} identical" if p.get("identical_images") else ""
        return (f"{p['mean_db']:.1f} dB<span class='sub'>min {p['min_db']:.1f}; {n} showcase images vs {_esc(what)}{same}</span>")

    def image_psnr_cell(self, key: str) -> str:
        p = self.pipes[key]
        if p.source is None:
            return _td("psnr", self.na("the original: nothing to compare with"))
        if key == "compressed":
            i = self.m["compress"]["image_psnr_db"]
            return _td("psnr", f"{i['mean_db']:.1f} dB<span class='sub'>min {i['min_db']:.1f}; "
                               f"{self.m['compress']['eval_prompts']} images vs {_esc(p.source)}</span>")
        txt = self.psnr_text(self.show.get(key), what=p.source)
        return _td("psnr", txt or self.na("no showcase images in the run"))

    def unet_cell(self, key: str) -> str:
        if key == "compressed":
            c = self.m["compress"]
            return _td("unet", f"SNR {c['unet_snr_db']:.1f} dB<span class='sub'>vs fp32, held-out calibration feeds</span>")
        if self.pipes[key].source is None:
            return _td("unet", self.na("the original: nothing to compare with"))
        return _td("unet", self.na("distilled from the teacher for another sampler: not compared call for call"))

    def export_unet_cell(self, folder: str, target: str) -> str:
        e = self.components(folder).get(f"{target}/unet", {})
        parts = []
        v = e.get("versus_fp32", {})
        if "snr_db" in v:
            parts.append(f"SNR {v['snr_db']:.1f} dB<span class='sub'>vs fp32, {v['heldout_feeds']} held-out feeds</span>")
        par = e.get("parity", {})
        if "rel_max" in par:
            parts.append(f"parity rel_max {par['rel_max']:.1e}<span class='sub'>vs its PyTorch U-Net</span>")
        return _td("unet", "".join(parts) or self.na(par.get("reason") or f"parity: {par.get('status', 'not measured')}"))

    # ---- rows of the summary -------------------------------------------------------------------------------------
    def pytorch_cells(self, key: str) -> list[str]:
        m, orig = self.m, self.original.key
        cells = [self.accuracy_cell(key), self.image_psnr_cell(key), self.unet_cell(key)]
        ub = (_read_json(self.root / "compressed" / "manifest.json") or {}).get("metrics", {}).get("unet_bytes")  # the compress stage's
        if key == "model" and ub:
            cells.append(_td("size", f"{_mb(ub['fp32'])}<span class='sub'>U-Net weights, fp32</span>"))
        elif key == "compressed" and ub:
            cells.append(_td("size", f"{_mb(ub['stored_fp16_scales'])}<span class='sub'>U-Net weights, integers + fp16 scales</span>"))
        else:
            cells.append(_td("size", self.na("not measured for the PyTorch folder; see its exports")))
        t = m.get("teacher")
        if key == "teacher":
            cells.append(_td("latency", f"{t['teacher_s'] * 1e3:.0f} ms<span class='sub'>batch 1</span>"))
        elif key == "model":
            s = t["student_s"] if t else m["seconds_per_image_batch1"]
            cells.append(_td("latency", f"{s * 1e3:.0f} ms<span class='sub'>batch 1</span>"))
        else:
            cells.append(_td("latency", self.na("not timed in PyTorch (its weights run dequantized there); see its exports")))
        cells.append(_td("memory", self.na("peak memory is measured per runtime")))
        if key == orig:
            cells += [_td("speed_x", "1<span class='sub'>the original</span>"), _td("size_x", "1<span class='sub'>the original</span>"),
                      _td("memory_x", "1<span class='sub'>the original</span>")]
            return cells
        if key == "model" and t:
            cells.append(_td("speed_x", f"{_x(t['speedup'])}<span class='sub'>interleaved</span>"))
        else:
            cells.append(_td("speed_x", self.na("not timed in PyTorch")))
        if key == "compressed" and orig == "model" and ub:
            cells.append(_td("size_x", f"{_x(ub['ratio_fp16_scales'])}<span class='sub'>U-Net weights</span>"))
        else:
            cells.append(_td("size_x", self.na("the original's PyTorch size is not measured; see the exports")))
        cells.append(_td("memory_x", self.na("not measured in PyTorch")))
        return cells

    def export_cells(self, key: str, target: str, runtime: str) -> list[str]:
        p, orig = self.pipes[key], self.original
        folder = p.export
        cells = [_td("accuracy", self.na("not measured through the runtime; its images against PyTorch: next column"))]
        row = self.show.get(f"{folder}.{runtime}")
        skipped = self.m.get("showcase", {}).get("skipped", {}).get(f"{folder}/{runtime}")
        cells.append(_td("psnr", self.psnr_text(row, what="PyTorch") or self.na(skipped or "no showcase images through this runtime")))
        cells.append(self.export_unet_cell(folder, target))
        sizes = self.sizes(folder, target)
        total = sum(sizes.values())
        cells.append(_td("size", f"{_mb(total)}<span class='sub'>U-Net {_mb(sizes.get('unet', 0))}</span>" if total
                         else self.na("no size in the export manifest")))
        b = self.bench_row(folder, runtime)
        if b:
            cells.append(_td("latency", f"{b['latency_ms']['median']:.2f} ms<span class='sub'>{b.get('steps', '?')} steps</span>"))
            cells.append(_td("memory", f"{b['peak_rss_mib']:.1f} MiB"))
        else:
            why = self.no_bench(folder, runtime)
            cells += [_td("latency", self.na(why)), _td("memory", self.na(why))]
        if key == orig.key:
            one = "1<span class='sub'>the original</span>"
            return cells + [_td("speed_x", one), _td("size_x", one), _td("memory_x", one)]
        ob = self.bench_row(orig.export, runtime)
        if b and ob:
            cells.append(_td("speed_x", f"{_x(ob['latency_ms']['median'] / b['latency_ms']['median'])}"
                                        ""))
        else:
            cells.append(_td("speed_x", self.na(self.no_bench(orig.export, runtime) if b else self.no_bench(folder, runtime))))
        osz = sum(self.sizes(orig.export, target).values())
        cells.append(_td("size_x", _x(total / osz)
                         if total and osz else self.na(f"{orig.key} has no {target} export")))
        if b and ob:
            cells.append(_td("memory_x", _x(b['peak_rss_mib'] / ob['peak_rss_mib'])))
        else:
            cells.append(_td("memory_x", self.na("no end-to-end measurement of both")))
        return cells


_HEAD = ("<tr><th class='l'>artifact</th><th class='l'>runs on</th><th>prompt accuracy<br>(all five)</th><th>image PSNR<br>vs source</th>"
         "<th>U-Net<br>vs source</th><th>size</th><th>latency per image<br>(median, end to end)</th><th>peak memory<br>(end to end)</th>"
         "<th>speed ×<br>original</th><th>size ×<br>original</th><th>memory ×<br>original</th></tr>")


def _pipe_rows(r: _Run, p: _Pipe, *, first_sep: bool) -> list[str]:
    where = r.link(p.folder + "/", p.folder + "/") if p.folder else _esc(_name(r.run["source"]["path"]) if p.key == "model"
                                                                           else _name(r.m["teacher"].get("path")))
    out = [f"<tr data-artifact='{p.key}' data-runtime='pytorch'{' class=sep' if first_sep else ''}><td class='l'>{where}"
           f"<span class='sub'>{_esc(p.key)}</span></td><td class='l'>PyTorch</td>{''.join(r.pytorch_cells(p.key))}</tr>"]
    for target, runtime in r.runtimes(p.export):
        out.append(f"<tr data-artifact='{p.export}' data-runtime='{runtime}'><td class='l'>{r.link(p.export + '/', p.export + '/')}"
                   f"<span class='sub'>{_esc(target)}</span></td><td class='l'>{_esc(runtime)}</td>"
                   f"{''.join(r.export_cells(p.key, target, runtime))}</tr>")
    return out


def _quality(r: _Run, p: _Pipe) -> str:
    acc, why = r.accuracy(p.key)
    src = r.accuracy(p.source)[0] if p.source else None
    parts = []
    if acc is None:
        parts.append(f"<p>Prompt accuracy: {_na(why)}</p>")
    else:
        head = f"<tr><th class='l'>prompt accuracy ({acc['n']} held-out prompts)</th><th>{_esc(p.key)}</th>"
        head += f"<th>{_esc(p.source)} (source)</th><th>Δ</th></tr>" if src and src["n"] == acc["n"] else "</tr>"
        body = []
        for attr, v in [*acc["per_attribute"].items(), ("all five", acc["all"])]:
            s = None if not src else src["all"] if attr == "all five" else src["per_attribute"].get(attr)
            extra = f"<td>{_pct(s)}</td><td>{(v - s) * 100:+.1f} pt</td>" if src and src["n"] == acc["n"] and s is not None else ""
            body.append(f"<tr><td class='l'>{_esc(attr)}</td><td data-k='accuracy.{_esc(attr)}'>{_pct(v)}</td>{extra}</tr>")
        parts.append(f"<table>{head}{''.join(body)}</table>")
    rows = []
    for target, runtime in r.runtimes(p.export):
        for k, e in r.components(p.export).items():
            if k.startswith(f"{target}/") and "parity" in e:
                par = e["parity"]
                err = f"{par['rel_max']:.1e}" if "rel_max" in par else "<span class='na'>–</span>"
                status = _esc(par.get("status", "")) + (f" <span class='why'>({_esc(par['reason'])})</span>" if par.get("reason") else "")
                rows.append(f"<tr><td class='l'>{_esc(k)}</td><td class='l'>{_esc(par.get('device', runtime))}</td>"
                            f"<td data-k='parity'>{err}</td><td class='l'>{status}</td></tr>")
    if rows:
        parts.append("<table><tr><th class='l'>exported component</th><th class='l'>measured on</th><th>parity rel_max vs PyTorch</th>"
                     f"<th>status</th></tr>{''.join(rows)}</table>")
    return "<h3>Quality against its source</h3>" + "".join(parts)


def _size(r: _Run, p: _Pipe) -> str:
    if p.export is None:
        return "<h3>Size</h3><p>" + _na("no export in this run") + "</p>"
    refs = [(x.key, x.export) for x in (r.original, r.pipes.get(p.source) if p.source else None) if x and x.key != p.key and x.export]
    refs = list(dict.fromkeys(refs))
    comps = [c for c in ORDER if any(c in r.sizes(p.export, t) for t, _ in r.runtimes(p.export))]
    head = ("<tr><th class='l'>target</th>" + "".join(f"<th>{_esc(c)}</th>" for c in comps) + "<th>total</th>"
            + "".join(f"<th>× {_esc(k)}</th>" for k, _ in refs) + "</tr>")
    body = []
    for t, _ in r.runtimes(p.export):
        s = r.sizes(p.export, t)
        total = sum(s.values())
        cells = "".join(f"<td>{_mb(s[c]) if c in s else '–'}</td>" for c in comps)
        ratios = "".join(_td("size_x", _x(total / sum(r.sizes(f, t).values())) if sum(r.sizes(f, t).values()) else _na(f"{k} has no {t}"))
                         for k, f in refs)
        body.append(f"<tr><td class='l'>{_esc(t)}</td>{cells}{_td('size', _mb(total))}{ratios}</tr>")
    return f"<h3>Size of <code>{_esc(p.export)}/</code> per target</h3><table>{head}{''.join(body)}</table>"


def _latency(r: _Run, p: _Pipe) -> str:
    if p.export is None:
        return "<h3>Latency and memory per runtime</h3><p>" + _na("no export in this run") + "</p>"
    refs = [(x.key, x.export) for x in (r.original, r.pipes.get(p.source) if p.source else None) if x and x.key != p.key and x.export]
    refs = list(dict.fromkeys(refs))
    head = ("<tr><th class='l'>runtime</th><th class='l'>component</th><th>median ms</th><th>p90 ms</th><th>load ms</th><th>peak MiB</th>"
            + "".join(f"<th>speed × {_esc(k)}</th><th>memory × {_esc(k)}</th>" for k, _ in refs) + "</tr>")
    body = []
    for _, runtime in r.runtimes(p.export):
        comps = [c for c in ORDER if r.bench_row(p.export, runtime, c)]
        if not comps:
            body.append(f"<tr><td class='l'>{_esc(runtime)}</td><td class='l'>all</td>{_td('latency', _na(r.no_bench(p.export, runtime)))}"
                        f"<td></td><td></td>{_td('memory', _na(r.no_bench(p.export, runtime)))}</tr>")
            continue
        for c in comps:
            b = r.bench_row(p.export, runtime, c)
            lat = b["latency_ms"]
            steps = f" ({b['steps']} steps)" if c == "end_to_end" and "steps" in b else ""
            ratios = ""
            for k, f in refs:
                o = r.bench_row(f, runtime, c)
                ratios += (_td("speed_x", _x(o["latency_ms"]["median"] / lat["median"]))
                           + _td("memory_x", _x(b["peak_rss_mib"] / o["peak_rss_mib"]))
                           if o else _td("speed_x", _na(f"{k}: not measured")) + _td("memory_x", _na(f"{k}: not measured")))
            med, peak = _td("latency", f"{lat['median']:.2f}"), _td("memory", f"{b['peak_rss_mib']:.1f}")
            body.append(f"<tr><td class='l'>{_esc(runtime)}</td><td class='l'>{_esc(c)}{steps}</td>{med}"
                        f"<td>{lat['p90']:.2f}</td><td>{b['load_ms']:.0f}</td>{peak}{ratios}</tr>")
    note = ("<p class='meta'>speed ×: the reference's median over this one (&gt; 1: faster); memory ×: this peak over the reference's; "
            "end to end at each pipeline's own sampler, every artifact in its own process, interleaved (<code>bench.json</code>).</p>")
    return f"<h3>Latency and memory per runtime</h3><table>{head}{''.join(body)}</table>{note}"


def _images(r: _Run, p: _Pipe) -> str:
    sc = r.m.get("showcase")
    if not sc:
        return "<h3>Images</h3><p>" + _na("this run recorded no showcase images") + "</p>"
    # the original's images, its source's (when another), its own in PyTorch and through each runtime
    keys = list(dict.fromkeys([r.original.key, p.source or p.key, p.key]))
    keys += [k for k, v in r.show.items() if v["pipeline"] == p.key and v["runtime"] != "pytorch"]
    rows = []
    for k in keys:
        row = r.show.get(k)
        if row is None:
            continue
        label = (f"{_esc(row['pipeline'])}, PyTorch" if row["runtime"] == "pytorch" else f"<code>{_esc(row['artifact'])}/</code>, "
                 f"{_esc(row['runtime'])}") + f"<span class='sub'>{row['steps']} steps</span>"
        if row["pipeline"] != p.key:
            label += f"<span class='sub'>(the {'original' if k == r.original.key else 'source'})</span>"
        per = (row.get("psnr_db") or {}).get("per_image_db")
        ref = "PyTorch" if row["runtime"] != "pytorch" else row.get("reference")
        figs = []
        for i, (path, prompt) in enumerate(zip(row["images"], sc["prompts"])):
            db = ""
            if per is not None:
                db = f"identical to {_esc(ref)}" if per[i] is None else f"{per[i]:.1f} dB vs {_esc(ref)}"
                db = f"<span class='db'>{db}</span>"
            figs.append(f"<td><figure><img src='{r.rel(path)}' alt='{_esc(prompt)}'>"
                        f"<figcaption>{_esc(prompt)}{db}</figcaption></figure></td>")
        rows.append(f"<tr data-row='{_esc(k)}'><th>{label}</th>{''.join(figs)}</tr>")
    what = "" if p.key == r.original.key else f": the original vs {_esc(p.key)}"
    return (f"<h3>Images{what} (same prompts, image i at seed {sc['seed']}+i, guidance {sc['guidance']})</h3>"
            f"<table class='imgs'>{''.join(rows)}</table>")


def _appendix(r: _Run) -> str:
    if r.bench is None:
        return ""
    from pocketfusion.runtimes.base import require
    from pocketfusion.runtimes.report import _latency_plot, _memory_size_plot, _roofline, _table

    res = r.bench
    host = res["host"]
    parts = [f"<h2>All measurements (<a href='{r.rel('bench.json')}'><code>bench.json</code></a>)</h2>",
             f"<p class='meta'>{_esc(host['processor'])}, {host['cpus']} CPUs, {_esc(host['os'])}; threads "
             f"{res['settings'].get('threads') or 'default'}, {res['settings']['runs']} runs after {res['settings']['warmup']} warm-up, "
             f"{res['settings'].get('rounds', 1)} interleaved rounds; {_esc(res['created'])}<br>"
             + _esc(", ".join(f"{k} {v}" for k, v in res.get("versions", {}).items())) + "</p>",
             f"<div class='bench'>{_table(res['results'])}</div>", _roofline(res)]
    try:
        require("matplotlib.pyplot", "report")
        parts.append(f"<h3>Latency</h3><img class='plot' src='data:image/png;base64,{_latency_plot(res['results'])}'>")
        parts.append(f"<h3>Memory and size</h3><img class='plot' src='data:image/png;base64,{_memory_size_plot(res['results'])}'>")
    except UserError as e:
        parts.append(f"<p class='meta'>plots: {_na(str(e))}</p>")
    if res.get("notes"):
        parts.append("<p class='meta'>" + "<br>".join(_esc(n) for n in res["notes"]) + "</p>")
    return "".join(parts)


def render_run(root: Path, run: dict, base: Path | None = None) -> str:
    """The HTML page of a run directory ``root`` whose manifest holds ``run`` (``settings``, ``source``, ``metrics``);
    links relative to ``base`` (the report's folder; default ``root``)."""
    r = _Run(Path(root), run, Path(base or root))
    m, s = r.m, r.settings
    src = run.get("source", {})
    files = ["manifest.json"] + [f for f in ("bench.json", "eval.json", "grid.png", "eval.png") if (r.root / f).is_file()]
    orig = r.original
    intro = (f"<p class='meta'>source <b>{_esc(_name(src.get('path')))}</b> (sha256 {_esc(str(src.get('sha256', ''))[:12])}…); "
             f"{s.get('steps')} steps, guidance {s.get('guidance')}, seed {s.get('seed')}, {m['eval_prompts']} held-out prompts, "
             f"targets {_esc(', '.join(s.get('targets') or []) or 'every installed one')}, quantization {_esc(s.get('quant') or 'none')}"
             f"{'; ' + _esc(r.bench['host']['processor']) + ', ' + str(r.bench['host']['cpus']) + ' CPUs' if r.bench else ''}<br>"
             + " · ".join(r.link(f) for f in files) + "</p>"
             f"<p>The original is <b>{_esc(orig.key)}</b>: {_esc(orig.title)}; every ratio below is against it, per runtime. "
             "Each pipeline's quality is measured against its source (the pipeline it was made from; an export against its "
             "PyTorch pipeline). “–” marks a figure this run did not measure; its footnote says why.</p>")
    summary = []
    for i, p in enumerate(r.pipes.values()):
        summary += _pipe_rows(r, p, first_sep=i > 0)
    notes = "<ol class='notes'>" + "".join(f"<li>{_esc(why)}</li>" for why in r.notes) + "</ol>" if r.notes else ""
    sections = []
    for p in r.pipes.values():
        links = " ".join(r.link(f + "/manifest.json", f + "/") for f in (p.folder, p.export) if f)
        srcline = f"source: <b>{_esc(p.source)}</b>" if p.source else "the original"
        sections.append(f"<section id='artifact-{_esc(p.key)}' data-artifact='{_esc(p.key)}'><h2>{_esc(p.key)}: {_esc(p.title)}</h2>"
                        f"<p class='meta'>{srcline}{'; ' + links if links else ''}</p>"
                        + _quality(r, p) + _size(r, p) + _latency(r, p) + _images(r, p) + "</section>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>pocketfusion run: {_esc(_name(src.get('path')))}</title>"
            f"<style>{_CSS}</style></head><body><h1>pocketfusion run: {_esc(_name(src.get('path')))}</h1>{intro}"
            f"<h2>Summary</h2><table class='summary'>{_HEAD}{''.join(summary)}</table>{notes}"
            f"{''.join(sections)}{_appendix(r)}</body></html>")


def write_run_report(root: Path, run: dict | None = None, out: Path | None = None) -> Path:
    """Write ``out`` (default ``root/report.html``) for run directory ``root``; ``run`` defaults to its manifest's."""
    from pocketfusion.artifact import atomic_write_text

    root = Path(root)
    if run is None:
        run = _read_json(root / "manifest.json")
        if not run or run.get("stage") != "run":
            raise UserError(f"{root} is not a run directory (no manifest.json of stage 'run')")
    out = Path(out) if out is not None else root / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"report output {out} must end in .html")
    atomic_write_text(out, render_run(root, run, base=out.parent))
    return out
