"""``benchmarks/unet_profile.py``: onnxruntime's per-node profile of an exported U-Net, against its MACs."""

import json

import pytest

pytest.importorskip("onnxruntime")


def test_profile_splits_a_call_by_operator_type(tiny_onnx_export, tmp_path, capsys):
    from pocketfusion.benchmarks.unet_profile import main

    out = tmp_path / "p.json"
    assert main([str(tiny_onnx_export), "--runs", "3", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["results"][str(tiny_onnx_export)]
    ops = r["ms_per_op_type"]
    assert "Conv" in ops and r["nodes_per_op_type"]["Conv"] >= 1 and r["nodes"] == sum(r["nodes_per_op_type"].values())
    assert r["calls"] == 3 + 5  # the timed calls and the warm-up, all profiled
    assert abs(sum(ops.values()) - r["kernel_ms"]) < 1e-9 and 0 < r["compute_ms"] <= r["kernel_ms"]
    assert r["macs"] > 0 and r["median_wall_ms"] > 0 and r["call_gflops"] == pytest.approx(2 * r["macs"] / (r["median_wall_ms"] * 1e6))
    assert "kernels a call" in capsys.readouterr().out


def test_executorch_profile_splits_a_call_by_xnnpack_operator(mini_et_export, tmp_path, capsys):
    pytest.importorskip("executorch")
    from pocketfusion.benchmarks.unet_profile import main

    out = tmp_path / "p.json"
    assert main([str(mini_et_export), "--runtime", "executorch", "--runs", "3", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["results"][str(mini_et_export)]
    ops = r["ms_per_op_type"]
    assert r["runtime"] == "executorch" and r["calls"] == 3  # the timed calls after the warm-up
    assert any(op.startswith("Convolution") for op in ops) and not any("#" in op for op in ops)  # per type, not per node
    assert r["nodes"] == sum(r["nodes_per_op_type"].values()) > 5
    assert abs(sum(ops.values()) - r["kernel_ms"]) < 1e-9 and 0 < r["compute_ms"] < r["kernel_ms"]
    assert r["median_wall_ms"] > 0 and r["profiled_wall_ms"] > 0 and r["macs"] > 0
    assert "convolutions / GEMMs" in capsys.readouterr().out
