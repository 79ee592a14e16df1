"""Quantization grids lowered to ONNX: QDQ int8 / int4 weights holding exactly the grid's integers."""


import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from pocketfusion.checkpoint import load_model  # noqa: E402
from pocketfusion.compress.quant.grid import QuantGrid, rtn_grid  # noqa: E402
from pocketfusion.export.base import TOLERANCE, ExportConfig  # noqa: E402
from pocketfusion.export.quant_onnx import read_integers  # noqa: E402
from pocketfusion.export.testing import export_entry, save_quantized  # noqa: E402

CFG = ExportConfig(targets=("onnx",), components=("unet",))
GROUP = 8  # the tiny U-Net is 8-32 channels wide: groups of 8 make most layers group-wise


def quantized_copy(src, dst, bits, *, scheme=None, activations=None):
    """A copy of the tiny pipeline whose U-Net is RTN-quantized on a grid (what `compress --quant` writes);
    ``activations(grid)`` gives the grid's activation settings."""

    def make(unet):
        grid = rtn_grid(unet, bits, group_size=GROUP, scheme=scheme)
        if activations:
            grid.activations = activations(grid)
        return grid

    return save_quantized(dst, make, copy_from=src)


@pytest.fixture(scope="module")
def exports(tiny_sd, tmp_path_factory):
    """fp32, w8 and w4 exports of the tiny U-Net: {name: export_entry(...)}."""
    root = tmp_path_factory.mktemp("qonnx")
    out = {}
    for name, bits in (("fp32", None), ("w8", 8), ("w4", 4)):
        src = tiny_sd if bits is None else quantized_copy(tiny_sd, root / f"m-{name}", bits)
        out[name] = export_entry(src, CFG, root / f"e-{name}", "onnx/unet")
    return out


def _initializer_bytes(path):
    m = onnx.load(str(path))
    return {t.name: (t, len(t.raw_data)) for t in m.graph.initializer}


@pytest.mark.parametrize("scheme,bits", [("w8", 8), ("w4", 4)])
def test_artifact_holds_the_grid_integers_bit_for_bit(exports, scheme, bits):
    x = exports[scheme]
    grid, entry = x.grid, x.entry
    assert isinstance(grid, QuantGrid) and grid.scheme == scheme
    assert x.component.grid is not None and x.component.grid.scheme == scheme
    assert set(x.component.layer_map) == set(grid.layers)  # recorded at export time
    assert list(x.component.layer_map.values()) == [f"q{i}" for i in range(len(grid.layers))]  # compact names
    want = grid.integers(x.model.components["unet"])
    got = read_integers(onnx.load(str(x.path)), x.component.layer_map)
    assert set(got) == set(grid.layers)
    for name, layer in grid.layers.items():
        assert got[name]["bits"] == bits
        assert np.array_equal(got[name]["q"], want[name].numpy()), name
        assert np.array_equal(got[name]["scale"].reshape(-1), layer.scale.numpy().reshape(-1)), name
        # group scales are stored in fp16 (exact: the grid rounds them so), per-channel ones in fp32
        assert got[name]["scale_dtype"] == ("float16" if layer.group_size else "float32"), name
    q = entry["quantization"]
    n16 = sum(1 for g in grid.layers.values() if g.group_size)
    assert q["scales"] == {"float16": n16, "float32": len(grid.layers) - n16}
    assert q["scheme"] == scheme and q[f"layers_int{bits}"] == len(grid.layers)
    assert q["layers_float"] == 0 and q["fallbacks"] == {} and q["activations"] is None
    # group-wise layers exist at 4 bits, and convolutions are quantized too (not only MatMul)
    ops = {v["op"] for v in got.values()}
    assert {"Conv", "MatMul", "Gemm"} <= ops
    if bits == 4:
        assert any(g.group_size for g in grid.layers.values()) and any(g.group_size is None for g in grid.layers.values())


@pytest.mark.parametrize("scheme", ["w8", "w4"])
def test_parity_and_opset(exports, scheme):
    entry = exports[scheme].entry
    assert entry["parity"]["status"] == "pass" and entry["parity"]["rel_max"] < TOLERANCE["onnx"], entry["parity"]
    assert entry["parity"]["tolerance"] == TOLERANCE["onnx"]
    if scheme == "w4":  # int4 and blocked DequantizeLinear need opset 21; the default is 18
        assert entry["opset"]["ai.onnx"] == 21
        assert any("opset raised from 18 to 21" in n for n in entry["notes"])
    else:
        assert entry["opset"]["ai.onnx"] == 18


@pytest.mark.parametrize("scheme,bits", [("w8", 8), ("w4", 4)])
def test_weights_are_stored_at_their_width_and_the_file_shrinks(exports, scheme, bits):
    x = exports[scheme]
    entry, fentry, grid = x.entry, exports["fp32"].entry, x.grid
    assert exports["fp32"].grid is None and "quantization" not in fentry and "versus_fp32" not in fentry
    inits = _initializer_bytes(x.path)
    fp32_weight_bytes = q_bytes = 0
    for name, layer in grid.layers.items():
        n = int(np.prod(layer.shape))
        t, nbytes = inits[x.component.layer_map[name]]
        assert nbytes == (n if bits == 8 else (n + 1) // 2), name  # packed: 1 byte / 2 values per byte
        fp32_weight_bytes += 4 * n
        q_bytes += nbytes + (2 if layer.group_size else 4) * layer.scale.numel()
        t, nbytes = inits["s" + x.component.layer_map[name][1:]]
        assert nbytes == (2 if layer.group_size else 4) * layer.scale.numel(), name
    # no fp32 copy of a grid weight is left (in either layout)
    unet = x.model.components["unet"]
    mods = dict(unet.named_modules())
    weights = {mods[n].weight.detach().numpy().tobytes() for n in grid.layers}
    weights |= {np.ascontiguousarray(mods[n].weight.detach().numpy().T).tobytes() for n in grid.layers if len(grid.layers[n].shape) == 2}
    floats = [onnx.numpy_helper.to_array(t) for t, _ in inits.values() if t.data_type == onnx.TensorProto.FLOAT]
    assert not any(np.ascontiguousarray(a).tobytes() in weights for a in floats)
    # the fp32 weights are gone and only the integers + scales took their place (plus, per layer, a
    # DequantizeLinear node, maybe a Cast (fp16 scales) and a Reshape, and their names: < 600 bytes)
    assert entry["size_bytes"] <= fentry["size_bytes"] - fp32_weight_bytes + q_bytes + 600 * len(grid.layers)
    # (the tiny model is mostly graph, biases and norms: the demo figures are in the report)
    assert entry["size_bytes"] < fentry["size_bytes"] * 0.70
    v = entry["versus_fp32"]  # no calibration set: sizes only
    assert v["size_ratio_to_fp32_weights"] == entry["size_bytes"] / v["fp32_weight_bytes"] and "rel_rms" not in v
    # W4: the grid put the biases and norms on fp16 values, and the file holds them so (each behind a Cast); W8 not
    big = [t for t, _ in inits.values() if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) >= 64]
    q_scales = {"s" + x.component.layer_map[n][1:] for n in grid.layers}
    halves = [n for n, (t, _) in inits.items() if t.data_type == onnx.TensorProto.FLOAT16 and n not in q_scales]
    if bits == 4:
        assert grid.settings["float_params"] == "fp16" and not big, [t.name for t in big]
        assert entry["quantization"]["float_tensors_fp16"] == len(halves) > 0
    else:
        assert "float_params" not in grid.settings and not halves and entry["quantization"]["float_tensors_fp16"] == 0


def test_w8a16_static_activations_keep_the_weight_integers(tiny_sd, tmp_path):
    """Static QDQ activations through onnxruntime.quantization: our weight DQ nodes survive unchanged;
    a layer whose activation bits are None keeps a float input."""

    def acts(grid):
        names = list(grid.layers)
        return {"bits": 16, "layers": {n: {"bits": None if n == names[1] else 16, "reason": "test"} for n in names}}

    src = quantized_copy(tiny_sd, tmp_path / "m", 8, scheme="w8a16", activations=acts)
    x = export_entry(src, CFG, tmp_path / "e", "onnx/unet")
    names = list(x.grid.layers)
    keep_float = names[1]
    entry = x.entry
    q = entry["quantization"]
    assert q["activation_bits"] == 16 and q["activations"]["layers_a16"] == len(names) - 1
    assert q["activations"]["layers_float"] == 1 and keep_float in q["fallbacks"]
    assert entry["parity"]["tolerance"] == TOLERANCE["onnx-a16"] and entry["parity"]["status"] == "pass"
    assert any("golden feeds" in n for n in entry["notes"])  # no calibration set in this model folder
    m = onnx.load(str(x.path))
    got = read_integers(m, x.component.layer_map)
    want = x.grid.integers(x.model.components["unet"])
    assert all(np.array_equal(got[n]["q"], want[n].numpy()) for n in names)
    # 16-bit activation Q/DQ pairs were inserted (int16 zero points), and none on the float-kept layer
    q16 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT16]
    assert q16


def test_calibration_set_by_reference_measures_versus_fp32(tiny_sd, tmp_path):
    """The calibration set the model's manifest names (CalibrationRef, content hash checked) gives the
    static activation ranges and the held-out error against fp32 (rel_rms, snr_db)."""
    from pocketfusion import calibration
    from pocketfusion.errors import UserError
    from pocketfusion.export.api import export

    cset = calibration.capture(load_model(tiny_sd), ["a red circle", "a blue square", "a green circle"], steps=4,
                               n_timesteps=2, progress=False)
    calibration.save(cset, tmp_path / "calib")
    src = save_quantized(tmp_path / "m", lambda u: rtn_grid(u, 8, group_size=GROUP), copy_from=tiny_sd, calibration=tmp_path / "calib")
    x = export_entry(src, CFG, tmp_path / "e", "onnx/unet")
    v = x.entry["versus_fp32"]
    assert v["heldout_feeds"] == len(cset.unet_feeds("heldout")) > 0
    assert 0 < v["rel_rms"] < 0.1 and v["snr_db"] > 20 and "rel" not in v
    # a calibration set changed after compress is refused
    (src / "calibration" / "extra.txt").write_text("x")
    with pytest.raises(UserError, match="content hash mismatch"):
        export(load_model(src, verify=False), CFG, tmp_path / "e2", progress=False)


@pytest.mark.parametrize("scheme", ["w8", "w4"])
def test_onnxruntime_kernel_path_is_measured_stamped_and_applied(exports, scheme, tmp_path):
    """A weight-only graph: both onnxruntime paths timed at export, the faster stamped in the graph's metadata and
    applied by the runtime's session; the two paths compute the same numbers; --onnx-weights forces one."""
    import json

    from pocketfusion.export import ort_paths
    from pocketfusion.export.testing import export_entry
    from pocketfusion.runtimes.ort import SESSION_CONFIG_KEY, OrtSession

    assert SESSION_CONFIG_KEY == ort_paths.METADATA_KEY
    x = exports[scheme]
    rec = x.entry["quantization"]["onnxruntime"]
    ms = rec["measured"]
    assert set(ms) == {"qdq", "fold"} and all(v["median_ms"] > 0 for v in ms.values())
    assert rec["chosen"] == min(ms, key=lambda n: ms[n]["median_ms"]) and rec["session_config"] == ort_paths.PATHS[rec["chosen"]]
    assert ms["fold"]["max_abs_diff_vs_qdq"] < 1e-4  # the same on-grid weights either way
    meta = {p.key: p.value for p in onnx.load(str(x.path)).metadata_props}
    assert json.loads(meta[ort_paths.METADATA_KEY]) == rec["session_config"]
    assert OrtSession(x.path).session_config == rec["session_config"]
    assert "onnxruntime" not in (exports["fp32"].entry.get("quantization") or {})
    forced = export_entry(x.model.path, ExportConfig(targets=("onnx",), components=("unet",), onnx_weights="fold"),
                          tmp_path / "forced", "onnx/unet")
    assert forced.entry["quantization"]["onnxruntime"]["why"].startswith("forced")
    assert OrtSession(forced.path).session_config == {"session.disable_quant_qdq": "1"}
    assert forced.entry["quantization"]["scales"] == x.entry["quantization"]["scales"]
    if scheme == "w4":  # forced qdq: fp32 group scales, so that DequantizeLinear -> MatMul fuses into MatMulNBits
        qdq = export_entry(x.model.path, ExportConfig(targets=("onnx",), components=("unet",), onnx_weights="qdq"),
                           tmp_path / "qdq", "onnx/unet")
        assert x.entry["quantization"]["scales"]["float16"] > 0
        assert qdq.entry["quantization"]["scales"] == {"float16": 0, "float32": len(x.grid.layers)}
        assert {v["scale_dtype"] for v in read_integers(onnx.load(str(qdq.path)), qdq.component.layer_map).values()} == {"float32"}
        assert qdq.entry["parity"]["status"] == "pass"
