"""The scale benchmark's per-target child (pocketfusion.benchmarks.scale.child) on the tiny SD-1.5 U-Net."""

import pytest

from pocketfusion.benchmarks import scale


def test_child_exports_measures_and_checks_parity(monkeypatch, tmp_path):
    pytest.importorskip("onnxruntime")
    from pocketfusion.testing import fixtures

    monkeypatch.setitem(fixtures.FULL_CONFIGS, "sd15", fixtures.TINY_CONFIGS["sd15"])  # the full size takes minutes and GiBs
    res = scale.child(["onnx", "sd15", str(tmp_path), "1", "fp32", "w8", "32"])
    assert res["target"] == "onnx" and res["quant"] == "w8" and res["size_bytes"] > 0 and res["peak_rss_gib"] > 0
    assert res["info"]["quantization"] and res["parity"]["rel_max"] < 1e-3


def test_unknown_target_is_refused():
    with pytest.raises(SystemExit):
        scale.main(["--targets", "onnx,nonsense"])
