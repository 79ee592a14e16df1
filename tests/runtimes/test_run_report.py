"""The run's report page (``runtimes.run_report``) on a hand-built run directory: every figure comes from the
manifests and bench.json, every path is relative to the page, every image exists and carries its prompt."""

import html
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from pocketfusion.errors import UserError
from pocketfusion.runtimes.run_report import render_run, write_run_report

PROMPTS = ["a large red circle on a blue background, center", "a small <yellow> square & a black background, top left"]
COMPS = ("text_encoder", "unet", "vae_decoder")
ACC = {"shape": 0.75, "color": 1.0, "background": 1.0, "size": 0.875, "position": 1.0}
QACC = {"shape": 0.625, "color": 1.0, "background": 1.0, "size": 0.875, "position": 1.0}
# (export folder, runtime) -> end-to-end median ms, peak MiB; per-component medians are these / 10
E2E = {("teacher-export", "onnxruntime"): (500.0, 300.0), ("export", "onnxruntime"): (40.0, 200.0),
       ("export-w8", "onnxruntime"): (32.0, 150.0)}
SIZES = {"teacher-export": 20_000_000, "export": 10_000_000, "export-w8": 4_000_000}  # per target, split over COMPS


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _export_manifest(folder: str, quantized: bool) -> dict:
    comps = {}
    for target in ("onnx", "coreml"):
        for i, c in enumerate(COMPS):
            e = {"size_bytes": SIZES[folder] // 4 * (2 if c == "unet" else 1),
                 "parity": {"rel_max": 1e-6 * (i + 1), "status": "pass", "device": f"{target} device"}}
            if quantized and c == "unet":
                e["versus_fp32"] = {"snr_db": 41.25 if target == "onnx" else 40.5, "heldout_feeds": 8}
            comps[f"{target}/{c}"] = e
    return {"stage": "export", "metrics": {"components": comps}}


def _bench() -> dict:
    results = []
    for (folder, runtime), (ms, mib) in E2E.items():
        for c in (*COMPS, "end_to_end"):
            f = 1 if c == "end_to_end" else 10
            r = {"artifact": folder, "runtime": runtime, "component": c, "device": "cpu", "load_ms": 12.0,
                 "latency_ms": {"median": ms / f, "p90": ms / f * 1.1, "min": ms / f * 0.9, "max": ms / f * 1.2, "runs": 4},
                 "latencies_ms": [ms / f] * 4, "peak_rss_mib": mib / f, "rss_growth_mib": mib / f / 2,
                 "size_bytes": None if c == "end_to_end" else 1000}
            if c == "end_to_end":
                r.update(steps=50 if folder == "teacher-export" else 4, guidance_mode="cfg")
            results.append(r)
    return {"schema": "pocketfusion.bench", "schema_version": 1, "created": "2026-12-02T00:00:00+00:00",
            "host": {"processor": "Test CPU", "cpus": 2, "os": "Linux", "peak_gflops_fp32": 10.0},
            "versions": {"onnxruntime": "1"}, "settings": {"threads": None, "runs": 4, "warmup": 1, "rounds": 2},
            "artifacts": [{"label": f, "path": f"/somewhere/.run.x.partial/{f}", "manifest_sha256": "0" * 64} for f in SIZES],
            "results": results, "notes": ["Core ML artifacts are not timed: Core ML runs only on macOS"]}


def _images(root: Path, key: str, shift: int) -> list[str]:
    from PIL import Image

    paths = []
    for i in range(len(PROMPTS)):
        rel = f"images/{key}/{i:02d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i + shift, np.uint8)).save(root / rel)
        paths.append(rel)
    return paths


def _run_dir(root: Path) -> dict:
    """A run directory as ``pocketfusion run`` lays it out (a distilled student with its teacher, W8), and its manifest."""
    for folder in SIZES:
        _write(root / folder / "manifest.json", _export_manifest(folder, quantized=folder == "export-w8"))
    _write(root / "compressed" / "manifest.json", {"stage": "compress", "metrics": {
        "unet_bytes": {"fp32": 7_000_000, "stored_fp16_scales": 1_750_000, "ratio_fp16_scales": 0.25}}})
    _write(root / "bench.json", _bench())
    for f in ("grid.png", "eval.png", "eval.json"):
        (root / f).write_bytes(b"x")
    rows = []
    for key, pipeline, runtime, ref, shift, psnr in [
        ("teacher", "teacher", "pytorch", None, 0, None),
        ("teacher-export.onnxruntime", "teacher", "onnxruntime", "teacher", 0, [None, None]),
        ("model", "model", "pytorch", "teacher", 5, [14.25, 15.75]),
        ("export.onnxruntime", "model", "onnxruntime", "model", 5, [None, 61.5]),
        ("compressed", "compressed", "pytorch", "model", 6, [45.5, 47.5]),
        ("export-w8.onnxruntime", "compressed", "onnxruntime", "compressed", 6, [None, None]),
    ]:
        p = None if psnr is None else {"mean_db": float(np.mean([v for v in psnr if v])) if any(psnr) else None,
                                       "min_db": min(v for v in psnr if v) if any(psnr) else None,
                                       "identical_images": psnr.count(None), "per_image_db": psnr}
        artifact = {"teacher": "teacher-export", "model": "export", "compressed": "export-w8"}[pipeline] if runtime != "pytorch" else None
        rows.append({"key": key, "pipeline": pipeline, "runtime": runtime, "artifact": artifact,
                     "steps": 50 if pipeline == "teacher" else 4,
                     "images": _images(root, key, shift), "reference": ref, "psnr_db": p})
    metrics = {
        "prompt_accuracy": ACC, "all_attributes_correct": 0.75, "eval_prompts": 8, "seconds_per_image_batch1": 0.1,
        "teacher": {"path": str(root.parent / "teacher-model"), "teacher_steps": 50, "student_steps": 4, "student_s": 0.125,
                    "teacher_s": 2.5, "speedup": 20.0,
                    "evaluation": {"steps": 50, "guidance": 4.0, "seed": 0, "prompts": 8, "all_correct": 0.875,
                                   "per_attribute": dict(ACC, shape=0.875), "from": "the teacher's manifest"}},
        "export": {"components": _export_manifest("export", False)["metrics"]["components"]},
        "compress": {"scheme": "w8", "method": "gptq", "unet_snr_db": 49.75, "eval_prompts": 8, "prompt_accuracy": QACC,
                     "all_attributes_correct": 0.625, "image_psnr_db": {"mean_db": 52.25, "min_db": 44.5}},
        "showcase": {"prompts": PROMPTS, "seed": 0, "guidance": 4.0, "rows": rows,
                     "skipped": {"teacher-export/coreml": "coreml runs only on macOS", "export/coreml": "coreml runs only on macOS",
                                 "export-w8/coreml": "coreml runs only on macOS"}},
    }
    run = {"stage": "run", "settings": {"steps": 4, "guidance": 4.0, "seed": 0, "targets": None, "quant": "w8", "bench_runs": 4},
           "source": {"path": str(root.parent / "student-model"), "sha256": "ab" * 32}, "metrics": metrics}
    _write(root / "manifest.json", run)  # the run writes it after the report; the page links it
    return run


def _cells(row_html: str) -> dict[str, str]:
    return {k: html.unescape(re.sub(r"<[^>]+>", " ", v)).strip() for k, v in re.findall(r"<td data-k='(\w+)'[^>]*>(.*?)</td>", row_html)}


def _summary(page: str) -> dict[tuple[str, str], dict[str, str]]:
    table = re.search(r"<table class='summary'>(.*?)</table>", page).group(1)
    rows = re.findall(r"<tr data-artifact='([^']+)' data-runtime='([^']+)'[^>]*>(.*?)</tr>", table)
    return {(a, rt): _cells(body) for a, rt, body in rows}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The report written inside the staging folder, which is then renamed into place (as ``artifact.staged_dir`` does)."""
    pytest.importorskip("PIL")
    tmp_path = tmp_path_factory.mktemp("run-report")
    staging = tmp_path / ".run.abc123.partial"
    run = _run_dir(staging)
    write_run_report(staging, run, staging / "report.html")
    final = tmp_path / "run"
    os.replace(staging, final)
    return final, (final / "report.html").read_text(), run


def test_paths_are_relative_and_resolve_after_the_rename(page):
    root, text, _ = page
    assert ".partial" not in text and str(root.parent) not in text and "/somewhere" not in text
    assert "teacher-model" in text and "student-model" in text  # models by name, never by path
    refs = re.findall(r"(?:src|href)='([^']*)'", text)
    assert refs and all(not r.startswith(("/", "file:")) and "://" not in r for r in refs if not r.startswith("data:")), refs
    for r in refs:
        if not r.startswith("data:"):
            assert (root / html.unescape(r)).exists(), r
    # written elsewhere, the same run links from there
    other = root.parent / "pages" / "r.html"
    other.parent.mkdir()
    write_run_report(root, page[2], other)
    refs = [html.unescape(r) for r in re.findall(r"src='([^']*)'", other.read_text()) if not r.startswith("data:")]
    assert refs and all(r.startswith("../run/images/") and (other.parent / r).is_file() for r in refs)


def test_every_artifact_row_has_its_measured_figures(page):
    _, text, run = page
    rows = _summary(text)
    assert set(rows) == {("teacher", "pytorch"), ("teacher-export", "onnxruntime"), ("teacher-export", "coreml"),
                         ("model", "pytorch"), ("export", "onnxruntime"), ("export", "coreml"),
                         ("compressed", "pytorch"), ("export-w8", "onnxruntime"), ("export-w8", "coreml")}
    keys = {"accuracy", "psnr", "unet", "size", "latency", "memory", "speed_x", "size_x", "memory_x"}
    assert all(set(c) == keys for c in rows.values()), rows
    teacher_ms, teacher_mib = E2E[("teacher-export", "onnxruntime")]
    for folder in ("export", "export-w8"):  # each exported pipeline on a runtime that ran here: every cell a number
        c = rows[(folder, "onnxruntime")]
        ms, mib = E2E[(folder, "onnxruntime")]
        assert f"{ms:.2f} ms" in c["latency"] and f"{mib:.1f} MiB" in c["memory"]
        assert f"{SIZES[folder] / 1e6:.2f} MB" in c["size"]
        assert f"{teacher_ms / ms:.2f}×" in c["speed_x"] and f"{mib / teacher_mib:.2f}×" in c["memory_x"]
        assert f"{SIZES[folder] / SIZES['teacher-export']:.2f}×" in c["size_x"]
    assert "–" not in "".join(rows[("export-w8", "onnxruntime")][k] for k in ("psnr", "unet", "size", "latency", "memory"))
    assert "identical" in rows[("export-w8", "onnxruntime")]["psnr"] and "SNR 41.2 dB" in rows[("export-w8", "onnxruntime")]["unet"]
    assert "61.5 dB" in rows[("export", "onnxruntime")]["psnr"]
    m = run["metrics"]
    q = rows[("compressed", "pytorch")]  # quality against its source, from the run's manifest
    assert "62.5%" in q["accuracy"] and "-12.5 pt vs model" in q["accuracy"] and "52.2 dB" in q["psnr"] and "SNR 49.8 dB" in q["unet"]
    assert "1.75 MB" in q["size"]
    s = rows[("model", "pytorch")]
    assert "75.0%" in s["accuracy"] and "-12.5 pt vs teacher" in s["accuracy"] and "15.0 dB" in s["psnr"] and "125 ms" in s["latency"]
    assert f"{m['teacher']['speedup']:.2f}×" in s["speed_x"] and "7.00 MB" in s["size"]
    assert "87.5%" in rows[("teacher", "pytorch")]["accuracy"] and "2500 ms" in rows[("teacher", "pytorch")]["latency"]
    # a figure the run did not measure is "–" with its reason in the footnotes
    coreml = rows[("export-w8", "coreml")]
    assert coreml["latency"].startswith("–") and "SNR 40.5 dB" in coreml["unet"]
    notes = re.search(r"<ol class='notes'>(.*?)</ol>", text).group(1)
    assert notes.count("coreml runs only on macOS") == 1
    row = re.search(r"<tr data-artifact='export-w8' data-runtime='coreml'.*?</tr>", text).group(0)
    n = re.search(r"title='[^']*'>–<sup>(\d+)</sup>", row)
    assert n and int(n.group(1)) <= notes.count("<li>")


def test_each_section_has_quality_size_latency_and_captioned_images(page):
    root, text, _ = page
    sections = dict(re.findall(r"<section id='artifact-(\w+)' data-artifact='\1'>(.*?)</section>", text, re.S))
    assert list(sections) == ["teacher", "model", "compressed"]
    for key, sec in sections.items():
        assert "Quality against its source" in sec and "parity rel_max" in sec
        folder = {"teacher": "teacher-export", "model": "export", "compressed": "export-w8"}[key]
        ms, mib = E2E[(folder, "onnxruntime")]
        assert re.search(rf"<td data-k='latency'>{ms:.2f}</td>", sec) and re.search(rf"<td data-k='memory'>{mib:.1f}</td>", sec)
        assert f"<td data-k='size'>{SIZES[folder] / 1e6:.2f} MB</td>" in sec, key  # onnx: 1/4 + 2/4 + 1/4 of it
        if key != "teacher":
            assert "speed × teacher" in sec and f"<td data-k='speed_x'>{E2E[('teacher-export', 'onnxruntime')][0] / ms:.2f}×</td>" in sec
        acc = {"teacher": dict(ACC, shape=0.875), "model": ACC, "compressed": QACC}[key]
        for attr, v in acc.items():
            assert f"<td data-k='accuracy.{attr}'>{v:.1%}</td>" in sec
        # images: the original's row beside this pipeline's, PyTorch and each runtime; a caption with the prompt under each
        figs = re.findall(r"<figure><img src='([^']+)' alt='([^']*)'><figcaption>(.*?)</figcaption></figure>", sec)
        rows = re.findall(r"<tr data-row='([^']+)'>", sec)
        assert rows == {"teacher": ["teacher", "teacher-export.onnxruntime"], "model": ["teacher", "model", "export.onnxruntime"],
                        "compressed": ["teacher", "model", "compressed", "export-w8.onnxruntime"]}[key]
        assert len(figs) == len(rows) * len(PROMPTS)
        for i, (src, alt, cap) in enumerate(figs):
            prompt = PROMPTS[i % len(PROMPTS)]
            assert (root / html.unescape(src)).is_file() and html.unescape(alt) == prompt
            assert html.unescape(re.sub(r"<span class='db'>.*?</span>", "", cap)) == prompt
    assert "14.2 dB vs teacher" in sections["model"] and "identical to PyTorch" in sections["compressed"]


def test_a_run_without_teacher_bench_or_images(tmp_path):
    """The original is the run's model; what was skipped is "–" with why, and the page still renders."""
    run = _run_dir(tmp_path)
    m = run["metrics"]
    for k in ("teacher", "showcase"):
        m.pop(k)
    (tmp_path / "bench.json").unlink()
    run["settings"]["bench_runs"] = 0
    import shutil

    shutil.rmtree(tmp_path / "teacher-export")
    text = render_run(tmp_path, run)
    rows = _summary(text)
    assert ("teacher", "pytorch") not in rows and "The original is <b>model</b>" in text
    assert rows[("model", "pytorch")]["speed_x"].startswith("1") and rows[("export", "onnxruntime")]["size_x"].startswith("1")
    assert rows[("export-w8", "onnxruntime")]["size_x"] == f"{SIZES['export-w8'] / SIZES['export']:.2f}×"
    assert rows[("export-w8", "onnxruntime")]["latency"].startswith("–") and "not benchmarked (--bench-runs 0)" in text
    assert "this run recorded no showcase images" in text


def test_write_run_report_rejects_non_runs(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        write_run_report(tmp_path)
    _run_dir(tmp_path / "r")
    with pytest.raises(UserError, match="must end in .html"):
        write_run_report(tmp_path / "r", out=tmp_path / "r.txt")
