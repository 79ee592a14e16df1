"""Smoke test of the quantization benchmark's row functions (pocketfusion.benchmarks.quant) on the tiny
SD-1.5 U-Net (real quantizers, real errors)."""

import math

import numpy as np
import pytest

from pocketfusion.benchmarks.quant import parse_args
from pocketfusion.benchmarks.quant.measure import artifact_bytes, param_bytes, session_runner, state_dict_bytes, torch_runner, unet_error
from pocketfusion.benchmarks.quant.output import format_table
from pocketfusion.benchmarks.quant.peers_onnx import onnx_op_counts, peer_ort_dynamic
from pocketfusion.benchmarks.quant.peers_pytorch import peer_quanto, peer_torchao
from pocketfusion.benchmarks.quant.pocketfusion_rows import grid_packed_bytes, pf_rtn
from pocketfusion.benchmarks.quant.rows import Row
from pocketfusion.benchmarks.quant.targets import swap_unet, unet_component, unet_path
from pocketfusion.runtimes.timing import interleaved_latency


@pytest.fixture(scope="module")
def tiny():
    from pocketfusion.export.components import unet_spec
    from pocketfusion.testing.fixtures import TINY_SEQ_LEN, tiny_unet

    unet = tiny_unet("sd15")
    spec = unet_spec(unet, seq_len=TINY_SEQ_LEN)
    return unet, spec


def _refs(unet, feeds):
    return [torch_runner(unet)(f) for f in feeds]


def test_pytorch_rows_measure_what_they_claim(tiny):
    import torch

    unet, spec = tiny
    feeds = spec.golden
    refs = _refs(unet, feeds)
    before = [p.detach().clone() for p in unet.parameters()]

    same = unet_error(torch_runner(unet), feeds, refs)
    assert set(same) == {"rel_max", "rel_rms", "snr_db", "feeds"}  # pocketfusion.metrics' names
    assert same["rel_max"] == 0 and same["rel_rms"] == 0 and math.isinf(same["snr_db"]) and same["feeds"] == 3

    u8, g8 = pf_rtn(unet, 8)
    u4, g4 = pf_rtn(unet, 4)
    e8 = unet_error(torch_runner(u8), feeds, refs)
    e4 = unet_error(torch_runner(u4), feeds, refs)
    assert e8["snr_db"] > 30 and e4["snr_db"] < e8["snr_db"] - 10  # 4 bits cost ~24 dB more than 8
    assert abs(e8["snr_db"] + 20 * math.log10(e8["rel_rms"])) < 1e-6
    assert set(g8.integers(u8)) == set(g8.layers)  # the copy's weights lie on its grid
    fp32 = param_bytes(unet)
    p8, p4 = grid_packed_bytes(u8, g8) / fp32, grid_packed_bytes(u4, g4) / fp32
    assert 0.25 < p8 < 0.40 and 0.12 < p4 < p8 - 0.08

    qu, notes = peer_quanto(unet, 8)
    eq = unet_error(torch_runner(qu), feeds, refs)
    assert eq["snr_db"] > 30 and "quantized" in notes[0]
    assert qu.conv_in.weight._data.dtype == torch.int8  # Conv2d too
    assert state_dict_bytes(qu) < 0.8 * state_dict_bytes(unet)  # tiny tensors: pickle overhead dominates

    tu, notes = peer_torchao(unet, "int8")  # stock filter: Linear only, convs stay fp32
    et = unet_error(torch_runner(tu), feeds, refs)
    assert et["snr_db"] > 30 and "Linear only" in notes[0]
    assert state_dict_bytes(tu) > state_dict_bytes(qu)

    for p, q in zip(before, unet.parameters()):  # every row quantized a copy
        assert bool((p == q).all())


def test_ort_dynamic_row_on_an_export(tiny, tmp_path):
    pytest.importorskip("onnxruntime")
    from pocketfusion.export.testing import export_tiny_unet
    from pocketfusion.runtimes.base import load_session

    unet, _ = tiny
    spec, path, _ = export_tiny_unet("onnx", "sd15", tmp_path)
    refs = _refs(unet, spec.golden)
    out = peer_ort_dynamic(path, tmp_path / "dyn.onnx", per_channel=False)
    assert not (tmp_path / "dyn.pre.onnx").exists()
    assert artifact_bytes(out) < 0.95 * artifact_bytes(path)  # tiny weights: graph overhead dominates
    ops = onnx_op_counts(out)
    assert ops.get("MatMulInteger", 0) + ops.get("ConvInteger", 0) > 0
    err = unet_error(session_runner(load_session(out, "onnxruntime", threads=1)), spec.golden, refs)
    fp = unet_error(session_runner(load_session(path, "onnxruntime", threads=1)), spec.golden, refs)
    assert fp["rel_max"] < 1e-4 and 15 < err["snr_db"] < fp["snr_db"]


def test_table_latency_and_args():
    ok = Row("pocketfusion GPTQ w4", "pocketfusion", "pytorch", 4, size_bytes=2e6, size_kind="packed", fp32_bytes=1.4e7,
             error={"rel_max": 0.02, "snr_db": 38.7}, images={"mean_db": 30.0, "min_db": 25.0}, accuracy={"mean": 0.95},
             latency={"median_ms": 3.0}, notes=["a | b"])
    w8 = Row("ORT quantize_dynamic int8", "onnxruntime", "onnx", 8, size_bytes=4e6, size_kind="file", fp32_bytes=1.4e7)
    na = Row("pocketfusion GPTQ w8 -> coreml", "pocketfusion", "coreml", 8, status="not available", reason="no lowering yet")
    table = format_table([ok, na, w8]).splitlines()
    assert len(table) == 5 and table[0].count("|") == table[2].count("|") == table[4].count("|")
    assert "ORT" in table[2] and "not available" in table[3] and "no lowering yet" in table[3]  # W8 rows before W4
    assert "14.3" in table[4] and "(packed)" in table[4] and "2.00e-02" in table[4] and "38.7" in table[4] and "a / b" in table[4]
    assert ok.to_dict()["size_pct_of_fp32"] == pytest.approx(100 * 2 / 14)

    calls = {"a": 0, "b": 0}

    def bump(k):
        calls[k] += 1

    lat = interleaved_latency({"a": lambda: bump("a"), "b": lambda: bump("b")}, runs=3, rounds=2, warmup=1)
    assert calls == {"a": 7, "b": 7} and len(lat["a"]["samples_ms"]) == 6
    assert 0 <= lat["a"]["min_ms"] <= lat["a"]["median_ms"] <= lat["a"]["p90_ms"]

    a = parse_args(["--skip", "quanto,coreml", "--skip", "images"])
    assert a.skip == ["quanto", "coreml", "images"] and a.prompts == 8
    with pytest.raises(SystemExit):
        parse_args(["--skip", "nonsense"])


def test_swap_unet_into_an_export(tiny_onnx_export, tmp_path):
    from pocketfusion import artifact
    from pocketfusion.metrics import psnr
    from pocketfusion.runtimes.pipeline import RuntimePipeline

    src = unet_path(tiny_onnx_export, "onnx")  # found through the manifest's typed component
    (tmp_path / "q").mkdir()
    q = peer_ort_dynamic(src, tmp_path / "q" / src.name, per_channel=False)
    dst = swap_unet(tiny_onnx_export, "onnx", q, tmp_path / "swapped")
    m = artifact.load_manifest(dst)  # checksums verified
    comp = m.component("unet", "onnx")
    assert m.files[comp.path]["sha256"] == artifact.sha256_file(q)
    assert m.metrics["components"][comp.key]["size_bytes"] == q.stat().st_size
    assert m.sampler is not None and {c.key for c in m.components} >= {"onnx/text_encoder", "onnx/unet", "onnx/vae_decoder"}
    prompt = "a large red circle on a blue background, center"
    img_q = RuntimePipeline(dst, "onnx", threads=1)(prompt, steps=2, seed=0)
    img_f = RuntimePipeline(tiny_onnx_export, "onnx", threads=1)(prompt, steps=2, seed=0)
    assert img_q.shape == img_f.shape and np.isfinite(psnr(img_q, img_f))  # the swapped U-Net ran
    with pytest.raises(ValueError):
        swap_unet(tiny_onnx_export, "onnx", tmp_path / "q" / "other.onnx", tmp_path / "bad")


def test_coreml_rows_read_weights_back_through_the_layer_map(tiny_sd, tmp_path):
    pytest.importorskip("coremltools")
    from pocketfusion.benchmarks.quant.coreml_readback import coreml_weights, unet_with_coreml_weights
    from pocketfusion.benchmarks.quant.peers_coreml import peer_coreml
    from pocketfusion.checkpoint import load_model
    from pocketfusion.export.api import export
    from pocketfusion.export.base import ExportConfig

    model = load_model(tiny_sd)
    out = tmp_path / "exp"
    export(model, ExportConfig(targets=("coreml",), components=("unet",), coreml_precision="fp32"), out, progress=False)
    comp = unet_component(out, "coreml")
    assert comp.layer_map  # the export recorded where each weight lies
    feeds = _tiny_feeds(model.unet)
    refs = _refs(model.unet, feeds)

    same, matched, total = unet_with_coreml_weights(model.unet, coreml_weights(unet_path(out, "coreml")), comp.layer_map)
    assert matched == total > 0 and unet_error(torch_runner(same), feeds, refs)["rel_max"] == 0  # fp32 package: the weights

    q = peer_coreml(unet_path(out, "coreml"), tmp_path / "q" / unet_path(out, "coreml").name, "linear8")
    u8, matched8, _ = unet_with_coreml_weights(model.unet, coreml_weights(q), comp.layer_map)  # names kept, suffixed
    err = unet_error(torch_runner(u8), feeds, refs)
    assert matched8 == total and 0 < err["rel_max"] and err["snr_db"] > 30


def _tiny_feeds(unet, seq_len=None):
    from pocketfusion.export.components import unet_spec
    from pocketfusion.testing.fixtures import TINY_SEQ_LEN

    return unet_spec(unet, seq_len=seq_len or TINY_SEQ_LEN).golden


def test_pocketfusion_export_rows_on_the_tiny_pipeline(tiny_sd, tmp_path):
    pytest.importorskip("onnxruntime")
    import argparse

    from pocketfusion.benchmarks.quant.context import Bench
    from pocketfusion.benchmarks.quant.plan import plan
    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.quant.grid import load_grid, rtn_grid
    from pocketfusion.export.testing import save_quantized

    model = load_model(tiny_sd)
    folder = save_quantized(tmp_path / "w8", lambda u: rtn_grid(u, 8), copy_from=tiny_sd)
    qm = load_model(folder)
    a = argparse.Namespace(steps=2, guidance=4.0, seed=0, threads=1, skip=[], group_size=32, calib_dir=None)
    feeds = _tiny_feeds(model.unet, model.components["tokenizer"].model_max_length)  # what the exports take
    b = Bench(a, model, feeds, ["a large red circle on a blue background, center"], None, tmp_path / "work")
    b.compressed[("w8", "gptq")] = (folder, qm, load_grid(qm, "unet"), 0.0)  # an RTN grid stands in for the calibrated model
    b.ref_images, _ = b.torch_generate(model.unet)(b.prompts)
    for p in plan(b):
        if p.name in ("fp32 onnx", "pocketfusion GPTQ w8 -> onnx", "ORT quantize_dynamic int8"):
            b.add(p)
    rows = {r.name: r for r in b.rows}
    assert len(rows) == 3 and all(r.status == "ok" for r in rows.values()), [(r.name, r.reason) for r in rows.values()]
    fp, pf, ort = rows["fp32 onnx"], rows["pocketfusion GPTQ w8 -> onnx"], rows["ORT quantize_dynamic int8"]
    assert fp.error["rel_max"] < 1e-4 and fp.size_bytes == fp.fp32_bytes
    assert pf.size_bytes < pf.fp32_bytes == fp.size_bytes and pf.bits_detail.startswith("8")
    assert pf.extra["parity_vs_on_grid"]["rel_max"] < 1e-3
    assert 0 < pf.error["rel_max"] < 0.1 and pf.images is not None and pf.accuracy is None  # images through the swapped export
    assert ort.size_bytes < ort.fp32_bytes and "quantized ops" in ort.notes[0] and ort.images is not None
