"""Smoke test of benchmarks/quant.py's row functions on the tiny SD-1.5 U-Net (real quantizers, real errors)."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bq():
    spec = importlib.util.spec_from_file_location("bench_quant", ROOT / "benchmarks" / "quant.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny():
    from pocketfusion.export.components import unet_spec
    from pocketfusion.testing.fixtures import TINY_SEQ_LEN, tiny_unet

    unet = tiny_unet("sd15")
    spec = unet_spec(unet, seq_len=TINY_SEQ_LEN)
    return unet, spec


def _refs(bq, unet, feeds):
    return [bq.torch_runner(unet)(f) for f in feeds]


def test_pytorch_rows_measure_what_they_claim(bq, tiny):
    import torch

    unet, spec = tiny
    feeds = spec.golden
    refs = _refs(bq, unet, feeds)
    before = [p.detach().clone() for p in unet.parameters()]

    same = bq.output_error(bq.torch_runner(unet), feeds, refs)
    assert same["rel"] == 0 and math.isinf(same["snr_db"]) and same["feeds"] == 3

    u8, g8 = bq.pf_rtn(unet, 8)
    u4, g4 = bq.pf_rtn(unet, 4)
    e8 = bq.output_error(bq.torch_runner(u8), feeds, refs)
    e4 = bq.output_error(bq.torch_runner(u4), feeds, refs)
    assert e8["snr_db"] > 30 and e4["snr_db"] < e8["snr_db"] - 10  # 4 bits cost ~24 dB more than 8
    assert abs(e8["snr_db"] + 20 * math.log10(e8["rel_l2"])) < 1e-6
    assert set(g8.integers(u8)) == set(g8.layers)  # the copy's weights lie on its grid
    fp32 = bq.param_bytes(unet)
    p8, p4 = bq.grid_packed_bytes(u8, g8) / fp32, bq.grid_packed_bytes(u4, g4) / fp32
    assert 0.25 < p8 < 0.40 and 0.12 < p4 < p8 - 0.08

    qu, notes = bq.peer_quanto(unet, 8)
    eq = bq.output_error(bq.torch_runner(qu), feeds, refs)
    assert eq["snr_db"] > 30 and "quantized" in notes[0]
    assert qu.conv_in.weight._data.dtype == torch.int8  # Conv2d too
    assert bq.state_dict_bytes(qu) < 0.8 * bq.state_dict_bytes(unet)  # tiny tensors: pickle overhead dominates

    tu, notes = bq.peer_torchao(unet, "int8")  # stock filter: Linear only, convs stay fp32
    et = bq.output_error(bq.torch_runner(tu), feeds, refs)
    assert et["snr_db"] > 30 and "Linear only" in notes[0]
    assert bq.state_dict_bytes(tu) > bq.state_dict_bytes(qu)

    for p, q in zip(before, unet.parameters()):  # every row quantized a copy
        assert bool((p == q).all())


def test_ort_dynamic_row_on_an_export(bq, tiny, tmp_path):
    pytest.importorskip("onnxruntime")
    from pocketfusion.runtimes.base import load_session
    from pocketfusion.testing.fixtures import export_tiny_unet

    unet, _ = tiny
    spec, path, _ = export_tiny_unet("onnx", "sd15", tmp_path)
    refs = _refs(bq, unet, spec.golden)
    out = bq.peer_ort_dynamic(path, tmp_path / "dyn.onnx", per_channel=False)
    assert not (tmp_path / "dyn.pre.onnx").exists()
    assert bq.artifact_bytes(out) < 0.95 * bq.artifact_bytes(path)  # tiny weights: graph overhead dominates
    ops = bq.onnx_op_counts(out)
    assert ops.get("MatMulInteger", 0) + ops.get("ConvInteger", 0) > 0
    err = bq.output_error(bq.session_runner(load_session(out, "onnx", threads=1)), spec.golden, refs)
    fp = bq.output_error(bq.session_runner(load_session(path, "onnx", threads=1)), spec.golden, refs)
    assert fp["rel"] < 1e-4 and 15 < err["snr_db"] < fp["snr_db"]


def test_table_latency_and_args(bq):
    ok = bq.Row("pocketfusion GPTQ w4", "pocketfusion", "pytorch", 4, size_bytes=2e6, size_kind="packed", fp32_bytes=1.4e7,
                error={"rel": 0.02, "snr_db": 38.7}, images={"mean_db": 30.0, "min_db": 25.0}, accuracy={"mean": 0.95},
                latency={"median_ms": 3.0}, notes=["a | b"])
    w8 = bq.Row("ORT quantize_dynamic int8", "onnxruntime", "onnx", 8, size_bytes=4e6, size_kind="file", fp32_bytes=1.4e7)
    na = bq.Row("pocketfusion GPTQ w8 -> coreml", "pocketfusion", "coreml", 8, status="not available", reason="no lowering yet")
    table = bq.format_table([ok, na, w8]).splitlines()
    assert len(table) == 5 and table[0].count("|") == table[2].count("|") == table[4].count("|")
    assert "ORT" in table[2] and "not available" in table[3] and "no lowering yet" in table[3]  # W8 rows before W4
    assert "14.3" in table[4] and "(packed)" in table[4] and "38.7" in table[4] and "a / b" in table[4]
    assert ok.to_dict()["size_pct_of_fp32"] == pytest.approx(100 * 2 / 14)

    calls = {"a": 0, "b": 0}

    def bump(k):
        calls[k] += 1

    lat = bq.interleaved_latency({"a": lambda: bump("a"), "b": lambda: bump("b")}, runs=3, rounds=2, warmup=1)
    assert calls == {"a": 7, "b": 7} and len(lat["a"]["samples_ms"]) == 6
    assert 0 <= lat["a"]["min_ms"] <= lat["a"]["median_ms"] <= lat["a"]["p90_ms"]

    a = bq.parse_args(["--skip", "quanto,coreml", "--skip", "images"])
    assert a.skip == ["quanto", "coreml", "images"] and a.prompts == 8
    with pytest.raises(SystemExit):
        bq.parse_args(["--skip", "nonsense"])


def test_swap_unet_into_an_export(bq, tiny_onnx_export, tmp_path):
    from pocketfusion import artifact
    from pocketfusion.pipeline import RuntimePipeline, psnr

    (tmp_path / "q").mkdir()
    q = bq.peer_ort_dynamic(tiny_onnx_export / "onnx" / "unet.onnx", tmp_path / "q" / "unet.onnx", per_channel=False)
    dst = bq.swap_unet(tiny_onnx_export, "onnx", {"unet.onnx": q}, tmp_path / "swapped")
    m = artifact.load_manifest(dst)  # checksums verified
    assert m.files["onnx/unet.onnx"]["sha256"] == artifact.sha256_file(q)
    assert m.metrics["components"]["onnx/unet"]["size_bytes"] == q.stat().st_size
    prompt = "a large red circle on a blue background, center"
    img_q = RuntimePipeline(dst, "onnx", threads=1)(prompt, steps=2, seed=0)
    img_f = RuntimePipeline(tiny_onnx_export, "onnx", threads=1)(prompt, steps=2, seed=0)
    assert img_q.shape == img_f.shape and np.isfinite(psnr(img_q, img_f))  # the swapped U-Net ran
