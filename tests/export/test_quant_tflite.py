"""Quantization grids lowered to TFLite: INT8 / INT4 weights holding exactly the grid's integers, run by LiteRT.

The default run converts once (litert-torch takes ~30 s for the tiny U-Net): a mixed-precision grid
with int8 per-channel, int4 per-channel and int4 group-wise layers (convolutions, 1x1 convolutions
and fully-connected layers), so every storage form is read back and checked; the dynamic path for its int8
weights (``export.litert_paths``) is made from a copy of that file. Whole-model w8 / w4
exports (file sizes) are slow tests.
"""


import numpy as np
import pytest

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

from pocketfusion.compress.quant.grid import QuantGrid, apply, layer_group_size, quantizable_layers, rtn, rtn_grid  # noqa: E402
from pocketfusion.export import layer_map as lm  # noqa: E402
from pocketfusion.export.base import TOLERANCE, ExportConfig  # noqa: E402
from pocketfusion.export.quant_tflite import Q_SUFFIX, expected_scale, read_integers, read_model  # noqa: E402
from pocketfusion.export.testing import export_entry, save_quantized  # noqa: E402
from pocketfusion.runtimes.base import load_session  # noqa: E402

# the exact weight-only path (DEQUANTIZE, fp32 kernels): these tests check the stored integers and parity at 1e-4;
# the dynamic path (export.litert_paths) is tested on a copy of the same file below
CFG = ExportConfig(targets=("tflite",), components=("unet",), tflite_weights="dequantize")
GROUP = 8  # the tiny U-Net is 8-32 channels wide: groups of 8 make most 4-bit layers group-wise
BLOCK = 32  # ... and groups of 32 where the input channels allow: the block size LiteRT's XNNPACK kernels take


def mixed_grid(unet) -> QuantGrid:
    """Every third layer at 8 bits, the rest at 4: group-wise where the input channels allow (groups of 32, else 8),
    but per channel for the stride-2 convolutions (so the dynamic path's strided im2col is exercised)."""
    grid = QuantGrid("w4", "rtn", settings={"group_size": GROUP})
    ints = {}
    for k, (name, mod) in enumerate(quantizable_layers(unet).items()):
        bits = 8 if k % 3 == 0 else 4
        gs = layer_group_size(mod, bits, BLOCK) or layer_group_size(mod, bits, GROUP)
        if getattr(mod, "stride", (1,))[0] > 1:
            gs = None
        grid.layers[name], ints[name] = rtn(mod, name, bits, gs)
    apply(unet, grid, ints)
    return grid


def quantized_copy(src, dst, make_grid):
    return save_quantized(dst, make_grid, copy_from=src)


@pytest.fixture(scope="module")
def mixed(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("qtflite")
    src = quantized_copy(tiny_sd, root / "m", mixed_grid)
    return export_entry(src, CFG, root / "e", "tflite/unet")


def test_mixed_grid_is_held_bit_for_bit_and_runs(mixed):
    grid, unet, entry, layer_map = mixed.grid, mixed.model.components["unet"], mixed.entry, mixed.component.layer_map
    q = entry["quantization"]
    assert q["layers_float"] == 0 and q["fallbacks"] == {}
    n8 = sum(g.bits == 8 for g in grid.layers.values())
    assert q["layers_int8"] == n8 and q["layers_int4"] == len(grid.layers) - n8
    grouped = [n for n, g in grid.layers.items() if g.group_size]
    assert q["layers_grouped"] == len(grouped) > 0
    vs = q["litert"]["versus_float"]  # the float model timed beside the quantized one at export, one round robin
    assert vs["float_ms"] > 0 and vs["quantized_ms"] > 0 and vs["speed"] == round(vs["float_ms"] / vs["quantized_ms"], 3)
    assert set(q["litert"]["measured"]) == {"dequantize", "float"} and vs["delegate_partitions"]["float"] >= 1
    assert any(n.startswith("measured at export (one thread): ") and "the float model's speed" in n for n in q["notes"])
    kinds = {(grid.layers[n].kind, grid.layers[n].shape[2:] if grid.layers[n].kind == "conv" else ()) for n in grouped}
    assert ("conv", (3, 3)) in kinds and ("conv", (1, 1)) in kinds and ("linear", ()) in kinds

    assert set(layer_map) == set(grid.layers)  # recorded at export time: the integer tensors, a split weight's pieces in row order
    assert sum(len(lm.split(v)) > 1 for v in layer_map.values()) == len(q["split"])
    want = grid.integers(unet)
    got = read_integers(read_model(mixed.path), layer_map)
    assert set(got) == set(grid.layers)
    for name, layer in grid.layers.items():
        assert got[name]["bits"] == layer.bits
        assert np.array_equal(got[name]["q"], want[name].numpy()), name
        # the grid's scales; where the converter folded a constant into a weight, times that constant
        assert np.array_equal(got[name]["scale"], expected_scale(layer, q["scale_factors"].get(name, 1.0))), name

    assert entry["parity"]["status"] == "pass" and entry["parity"]["rel_max"] < TOLERANCE["tflite"], entry["parity"]
    s = load_session(mixed.path, "tflite", threads=1)
    assert "XNNPACK" in s.device
    ops = entry["ops"]
    assert ops["DEQUANTIZE"] >= len(grid.layers) and ops["TRANSPOSE"] > 0  # 3x3 group-wise layers re-lay their rows
    # a per-channel weight is DEQUANTIZE of a constant (XNNPACK takes it); a vector the converter had folded into a
    # weight (LayerNorm's) is applied to the op's input: no weight comes out of a MUL
    from pocketfusion.export.quant_tflite import _Graph

    g = _Graph.of(read_model(mixed.path))
    made_by = {t: g.op(i) for i, op in enumerate(g.sg.operators) for t in op.outputs}
    weight_src = [made_by.get(op.inputs[1], "const") for i, op in enumerate(g.sg.operators) if g.op(i) in ("CONV_2D", "FULLY_CONNECTED")]
    assert "MUL" not in weight_src and weight_src.count("DEQUANTIZE") > 0


def test_integer_storage_widths(mixed):
    from ai_edge_litert import schema_py_generated as schema

    grid = mixed.grid
    m = read_model(mixed.path)
    tensors = {t.name.decode(): t for t in m.subgraphs[0].tensors}
    for name, layer in grid.layers.items():
        t = tensors.get(name + Q_SUFFIX)
        assert t is not None, name
        n = int(np.prod(layer.shape))
        assert t.type == (schema.TensorType.INT8 if layer.bits == 8 else schema.TensorType.INT4)
        assert len(m.buffers[t.buffer].data) == (n if layer.bits == 8 else (n + 1) // 2), name
        assert len(t.quantization.scale) == layer.scale.numel() and t.quantization.quantizedDimension == 0


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_whole_model_w8_w4_sizes(tiny_sd, tmp_path, bits):
    src = quantized_copy(tiny_sd, tmp_path / "m", lambda u: rtn_grid(u, bits, group_size=GROUP))
    x = export_entry(src, CFG, tmp_path / "e", "tflite/unet")
    fp32 = export_entry(tiny_sd, CFG, tmp_path / "f", "tflite/unet").entry
    entry, grid = x.entry, x.grid
    assert entry["quantization"][f"layers_int{bits}"] == len(grid.layers) and entry["parity"]["status"] == "pass"
    weight_bytes = sum(4 * int(np.prod(g.shape)) for g in grid.layers.values())
    stored = sum(int(np.prod(g.shape)) * bits // 8 + 12 * g.scale.numel() for g in grid.layers.values())  # + fp32 scale, int64 zero point
    assert entry["size_bytes"] <= fp32["size_bytes"] - weight_bytes + stored + 1024 * len(grid.layers)


def _copy_export(mixed, tmp_path):
    import shutil

    dst = tmp_path / "unet.tflite"
    shutil.copyfile(mixed.path, dst)
    shutil.copyfile(str(mixed.path) + ".io.json", str(dst) + ".io.json")
    return dst


def _spec(mixed):
    """The U-Net's spec with seeded random golden inputs and no held-out feeds (as a model without calibration)."""
    from pocketfusion.export.components import unet_spec

    comps = mixed.model.components
    return unet_spec(comps["unet"], seq_len=comps["tokenizer"].model_max_length)


def test_dynamic_path_feeds_every_integer_weight_to_its_op(mixed, tmp_path):
    """``make_dynamic``: every int8 weight and every int4 weight whose groups XNNPACK takes feeds a FULLY_CONNECTED /
    CONV_2D directly (no DEQUANTIZE): int4 convolutions as FULLY_CONNECTED (k x k and strided ones over im2col
    patches), groups of 32 as LiteRT block-wise weights with the grid's scales. The integers read back are still the
    grid's, fewer delegate partitions, and LiteRT runs it within the qd8 tolerance of the exact path (not identical:
    the activations are int8)."""
    import shutil
    from types import SimpleNamespace

    from pocketfusion.export import litert_paths
    from pocketfusion.export.quant_tflite import _Graph, check_held

    grid, layer_map, q = mixed.grid, mixed.component.layer_map, mixed.entry["quantization"]
    unet = mixed.model.components["unet"]
    factors = {t: c for layer, c in q["scale_factors"].items() for t in lm.split(layer_map[layer])}
    dst = tmp_path / "dyn.tflite"
    rep = litert_paths.make_dynamic(mixed.path, dst, factors)
    g = _Graph.of(read_model(dst))
    ints = {t.name.decode(): (i, t.type) for i, t in enumerate(g.sg.tensors) if t.name.decode().endswith(Q_SUFFIX)}
    direct = {op.inputs[1] for i, op in enumerate(g.sg.operators) if g.op(i) in ("CONV_2D", "FULLY_CONNECTED")}
    kept = {ints[name][0] for name in rep["kept"]}
    assert {i for i, _ in ints.values()} - kept <= direct
    dq_in = {op.inputs[0] for i, op in enumerate(g.sg.operators) if g.op(i) == "DEQUANTIZE"}
    assert dq_in == kept  # only the kept layers keep a DEQUANTIZE
    assert rep["int8"] == sum(t == 9 for _, t in ints.values()) > 0  # INT8
    assert rep["int4"] + len(rep["kept"]) == sum(t == 17 for _, t in ints.values())  # INT4
    assert set(rep["kept"].values()) == {"group of 8: XNNPACK's block-wise kernels take blocks of a multiple of 32"}

    by_tensor = {t: n for n, v in layer_map.items() for t in lm.split(v)}
    moved = [by_tensor[t] for t in ints if t not in rep["kept"]]
    four = [n for n in moved if grid.layers[n].bits == 4]
    convs = [n for n in four if grid.layers[n].kind == "conv"]
    patches = [n for n in convs if grid.layers[n].shape[2:] != (1, 1) or dict(unet.named_modules())[n].stride != (1, 1)]
    # block-wise: more than one group of 32 per output channel (one group is a per-channel scale)
    assert rep["grouped"] == sum(grid.layers[n].group_size == BLOCK < grid.layers[n].shape[1] for n in four) > 0
    assert rep["convs_as_fc"] == len(convs) > rep["im2col"] == len(patches) > 0
    assert any(dict(unet.named_modules())[n].stride == (2, 2) for n in patches)  # a strided im2col
    assert set(rep["input_factors"]) <= set(factors)
    fc_weights = {g.sg.operators[i].inputs[1] for i in range(len(g.sg.operators)) if g.op(i) == "FULLY_CONNECTED"}
    assert {ints[n + Q_SUFFIX][0] for n in convs if n + Q_SUFFIX in ints} <= fc_weights

    spec = SimpleNamespace(name="unet", grid=grid, source_module=unet)
    held = list(grid.layers)
    check_held(dst, spec, layer_map, held, q["scale_factors"], moved=rep["input_factors"])  # raises if not the grid's
    got = read_integers(read_model(dst), layer_map, {n: tuple(grid.layers[n].shape) for n in held})
    want = grid.integers(unet)
    assert set(got) == set(grid.layers) and all(np.array_equal(got[k]["q"], want[k].numpy()) for k in grid.layers)

    shutil.copyfile(str(mixed.path) + ".io.json", str(dst) + ".io.json")
    exact, dyn = load_session(mixed.path, "tflite", threads=1), load_session(dst, "tflite", threads=1)
    assert "XNNPACK" in dyn.device and dyn.delegate_partitions < exact.delegate_partitions
    for feed in _spec(mixed).golden:
        a, b = exact.run(feed)["noise_pred"], dyn.run(feed)["noise_pred"]
        rel = np.abs(a - b).max() / np.abs(a).max()
        assert 0 < rel < TOLERANCE["tflite-qd8"], rel


def test_dynamic_path_moves_a_folded_constant_to_the_input(mixed, tmp_path):
    """A block-wise layer whose stored scales carry a constant the converter folded in (as the attention scale in
    to_q / to_k): the product is not fp16-exact, so the dynamic path stores the grid's scales and multiplies the op's
    input by the constant. Made here by folding a constant into one block-wise layer of a copy of the exact model;
    the dynamic model then computes what that copy computes, within the qd8 tolerance."""
    import shutil

    from pocketfusion.export import litert_paths
    from pocketfusion.export.quant_tflite import _Graph, write_model

    grid, layer_map = mixed.grid, mixed.component.layer_map
    layer = next(n for n, g in grid.layers.items() if g.bits == 4 and g.kind == "linear" and g.group_size == BLOCK < g.shape[1])
    name, c = layer_map[layer], 0.4518010000164589
    model = read_model(mixed.path)
    g = _Graph.of(model)
    t = next(t for t in g.sg.tensors if t.name.decode() == name)
    want = expected_scale(grid.layers[layer])
    t.quantization.scale = expected_scale(grid.layers[layer], c)  # q * (s * c): the layer now computes c times its output
    assert not np.array_equal(t.quantization.scale.astype(np.float16).astype(np.float32), t.quantization.scale)
    src, dst = tmp_path / "folded.tflite", tmp_path / "dyn.tflite"
    write_model(model, src)
    rep = litert_paths.make_dynamic(src, dst, {name: c})
    assert rep["input_factors"] == {name: c} and name not in rep["kept"]

    g = _Graph.of(read_model(dst))
    ops = list(enumerate(g.sg.operators))
    fc = next(op for i, op in ops if g.op(i) == "FULLY_CONNECTED" and g.sg.tensors[op.inputs[1]].name.decode() == name)
    mul = next(op for i, op in ops if g.op(i) == "MUL" and op.outputs[0] == fc.inputs[0])
    k = next(i for i in mul.inputs if g.sg.tensors[i].name.decode().endswith(".input.factor"))
    assert np.frombuffer(bytes(g.model.buffers[g.sg.tensors[k].buffer].data), np.float32).tolist() == [np.float32(c)]
    got = read_integers(read_model(dst), {layer: name}, {layer: tuple(grid.layers[layer].shape)})[layer]
    assert np.array_equal(got["scale"], want) and np.array_equal(got["q"], grid.integers(mixed.model.components["unet"])[layer].numpy())

    for p in (src, dst):
        shutil.copyfile(str(mixed.path) + ".io.json", str(p) + ".io.json")
    a, b = load_session(src, "tflite", threads=1), load_session(dst, "tflite", threads=1)
    for feed in _spec(mixed).golden:
        x, y = a.run(feed)["noise_pred"], b.run(feed)["noise_pred"]
        assert np.abs(x - y).max() / np.abs(x).max() < TOLERANCE["tflite-qd8"]


def test_choose_measures_both_paths_and_applies_the_rule(mixed, tmp_path):
    """``auto`` times both paths and scores the dynamic one; it keeps ``dynamic`` exactly when it is faster and above
    the floor, and rewrites the file only then; a forced path is applied without measuring."""
    from pocketfusion.export import litert_paths

    spec = _spec(mixed)
    src = _copy_export(mixed, tmp_path)
    before = src.read_bytes()
    rec = litert_paths.choose(src, spec, "auto")
    ms = rec["measured"]
    assert set(ms) == {"dequantize", "dynamic"} and ms["dequantize"]["against"] == "dequantize path, golden inputs"
    assert ms["dequantize"]["snr_db"] == float("inf") and ms["dynamic"]["snr_db"] < 200
    fast = ms["dynamic"]["median_ms"] < ms["dequantize"]["median_ms"]
    floor = litert_paths.snr_floor(ms["dequantize"]["snr_db"])
    assert floor == litert_paths.SNR_FLOOR_DB and rec["dynamic"]["int8"] + rec["dynamic"]["int4"] == rec["dynamic_weights"] > 0
    assert rec["chosen"] == ("dynamic" if fast and ms["dynamic"]["snr_db"] >= floor else "dequantize")
    assert (src.read_bytes() != before) == (rec["chosen"] == "dynamic")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.tflite", "unet.tflite.io.json"]  # nothing left behind

    assert all(m["timed_calls"] == 25 for m in ms.values())  # the tiny model fits the budget: every call
    small = litert_paths.measure({"dequantize": src}, spec, budget_s=0.0)["dequantize"]  # as a full-size model would
    assert small["timed_calls"] == 2 and small["feeds"] == min(4, len(spec.golden)) and small["median_ms"] > 0

    for wanted in ("dequantize", "dynamic"):
        src = _copy_export(mixed, tmp_path)
        rec = litert_paths.choose(src, spec, wanted)
        assert rec["chosen"] == wanted and "measured" not in rec and rec["why"] == f"forced (--tflite-weights {wanted})"
        assert (src.read_bytes() == before) == (wanted == "dequantize")
