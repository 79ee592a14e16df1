"""``benchmarks/export_images.py``: an export's images against a reference export's through one runtime."""

import json

import pytest

pytest.importorskip("onnxruntime")


def test_an_export_against_itself_is_identical(tiny_onnx_export, tmp_path):
    from pocketfusion.benchmarks.export_images import main

    out = tmp_path / "r.json"
    d = str(tiny_onnx_export)
    assert main([d, d, "--runtime", "onnxruntime", "--prompts", "2", "--steps", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["prompts"] == 2 and 0 <= r["reference_all_correct"] <= 1
    e = r["exports"][d]
    assert e["identical_images"] == 2 and e["all_correct"] == r["reference_all_correct"]
