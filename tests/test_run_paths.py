"""``pocketfusion run`` stages its folder (``.NAME.xxxx.partial``) and renames it into place: nothing it writes may
name the staging folder. Paths inside the run (the W8 export's source ``compressed/``, bench.json's exports) are
recorded relative, so the finished folder still resolves after it is moved elsewhere."""

import json
import os
import shutil

import pytest

from pocketfusion import artifact

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tiny_run(tiny_sd, tmp_path_factory):
    """The tiny pipeline through the whole run at its smallest (ONNX, W8 on 2 prompts, 1 timed call), then moved."""
    pytest.importorskip("onnxruntime")
    from pocketfusion.checkpoint import load_model
    from pocketfusion.run import RunConfig, run

    base = tmp_path_factory.mktemp("run-paths")
    cfg = RunConfig(steps=2, eval_prompts=2, targets=("onnx",), quant="w8", quant_prompts=2, bench_runs=1)
    prompts = ["a large red circle on a blue background, center", "a small yellow square on a black background, top left"]
    run(load_model(tiny_sd), cfg, base / "run", showcase=prompts)
    moved = base / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(base / "run", moved)
    return base, moved


def test_no_staging_path_in_the_finished_run(tiny_run):
    base, moved = tiny_run
    assert not [p for p in base.rglob("*") if ".partial" in p.name]
    texts = {p: p.read_text() for p in moved.rglob("*") if p.suffix in (".json", ".html")}
    assert moved / "bench.json" in texts and moved / "export-w8" / "manifest.json" in texts and moved / "report.html" in texts
    for p, text in texts.items():
        assert ".partial" not in text and str(base) not in text, p
    bench = json.loads(texts[moved / "bench.json"])
    assert [a["path"] for a in bench["artifacts"]] == ["export", "export-w8"]


def test_moved_run_resolves_its_exports_source(tiny_run):
    from pocketfusion.runtimes.report import load_results

    _, moved = tiny_run
    raw = json.loads((moved / "export-w8" / "manifest.json").read_text())
    assert raw["source"]["path"] == "../compressed"
    assert {c["grid"]["path"] for c in raw["components"] if c.get("grid")} == {"../compressed/unet"}
    m = artifact.load_manifest(moved / "export-w8")  # verifies every file
    assert m.source.path == str((moved / "compressed").resolve())
    assert m.source.sha256 == artifact.content_hash(moved / "compressed")
    assert artifact.load_manifest(moved / "compressed").stage == "compress"
    assert [os.path.realpath(a["path"]) for a in load_results([moved / "bench.json"])[0]["artifacts"]] == [
        os.path.realpath(moved / "export"), os.path.realpath(moved / "export-w8")]


def test_eval_runtime_of_the_moved_export_finds_its_pytorch_reference(tiny_run):
    from pocketfusion.cli import main

    base, moved = tiny_run
    out = base / "eval.json"
    assert main(["eval", str(moved / "export-w8"), "--runtime", "onnx", "--prompts", "1", "--steps", "2", "-o", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "psnr_vs_pytorch_db" in res and "pytorch_reference" in res, res  # the W8 PyTorch pipeline, found through the source
