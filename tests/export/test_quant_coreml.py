"""Quantization grids lowered to Core ML: the package's compressed weights hold the grid's integers.

Core ML cannot run on Linux, so the checks read the saved ``.mlpackage`` back (its MIL program:
``constexpr_affine_dequantize`` / ``constexpr_blockwise_shift_scale`` data and scales).
"""

import sys

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

from pocketfusion.compress.quant import grid as G  # noqa: E402
from pocketfusion.export.base import ExportConfig  # noqa: E402
from pocketfusion.export.quant_coreml import QUANTIZED_SUFFIX  # noqa: E402
from pocketfusion.export.testing import export_entry, save_quantized  # noqa: E402

CFG = ExportConfig(targets=("coreml",), components=("unet",))  # fp16, iOS17 defaults
ON_MAC = sys.platform == "darwin"


# Two levels of 32 channels (one transformer block, a down- and an upsampler): converts in seconds
# and has layers of 4, 24, 32, 64 and 128 input channels (per-channel and per-block int4 both).
TINY = dict(sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"), block_out_channels=(32, 32), layers_per_block=1,
            attention_head_dim=4, cross_attention_dim=24, norm_num_groups=8, mid_block_type=None)


def _quantized_unet(dst, bits, group_size):
    """A tiny U-Net on an RTN grid, saved as a bare diffusers folder with its grid."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY).eval()
    return save_quantized(dst, lambda u: G.rtn_grid(u, bits, group_size=group_size), unet=unet)


def _export(folder, out, cfg=CFG):
    return export_entry(folder, cfg, out, "coreml/unet")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """w8 (iOS17) and w4 (groups of 16: raised to iOS18) exports of a tiny U-Net, fp16."""
    root = tmp_path_factory.mktemp("coreml-quant")
    out = {}
    for bits, gs in ((8, 32), (4, 16)):
        src = _quantized_unet(root / f"src-w{bits}", bits, gs)
        out[f"w{bits}"] = _export(src, root / f"w{bits}")
    return out


def _constexprs(path):
    """{op name: (op type, {input: value}, stored integer type)} of the saved package's program."""
    from coremltools.converters.mil.frontend.milproto.load import load
    from coremltools.converters.mil.mil import types

    m = ct.models.MLModel(str(path), skip_model_load=True)
    spec = m.get_spec()
    prog = load(spec, spec.specificationVersion, m.weights_dir)
    out = {}
    for op in prog.functions["main"].operations:
        if op.op_type.startswith("constexpr_"):
            data = op.inputs.get("data", op.inputs.get("quantized_data"))
            out[op.name] = (op.op_type, {k: v.val for k, v in op.inputs.items()}, types.builtin_to_string(data.dtype))
    return out


def _weights_bytes(path):
    return sum(f.stat().st_size for f in (path / "Data" / "com.apple.CoreML" / "weights").iterdir())


@pytest.mark.parametrize("scheme", ["w8", "w4"])
def test_integers_in_the_package_equal_the_grid(exports, scheme):
    x = exports[scheme]
    model, path, e, grid = x.model, x.path, x.entry, x.grid
    ints = grid.integers(model.unet)
    ops = _constexprs(path)
    layer_map = x.component.layer_map  # recorded at export time: the compressed op of each layer
    assert layer_map == {n: f"p_unet_{n.replace('.', '_')}_weight_to_fp16{QUANTIZED_SUFFIX}" for n in grid.layers}
    want_type = "constexpr_affine_dequantize" if scheme == "w8" else "constexpr_blockwise_shift_scale"
    want_int = "int8" if scheme == "w8" else "int4"
    assert len(ops) == len(grid.layers)
    mods = dict(model.unet.named_modules())
    for name, g in grid.layers.items():
        op_type, vals, stored = ops[layer_map[name]]
        assert (op_type, stored) == (want_type, want_int), name
        data = vals.get("data", vals.get("quantized_data"))
        assert np.array_equal(data.astype(np.int8), ints[name].numpy()), name  # bit for bit
        offset = vals.get("offset", vals.get("zero_point"))
        assert offset is None or not np.any(offset)  # symmetric
        # scale: stored in fp16, and exactly the grid's (Core ML computes it from the fp16 weights; the grid's
        # scales are exact in fp16 and chosen so that this fp16 observer gives them back)
        assert np.asarray(vals["scale"]).dtype == np.float16, name
        s = np.asarray(vals["scale"], dtype=np.float32).reshape(g.shape[0], -1)
        ref = g.scale.numpy().reshape(g.shape[0], -1)
        assert s.shape == ref.shape and np.array_equal(s, ref), name
        # dequantized (q * scale in fp16): exactly the on-grid fp32 weight cast to fp16
        full = np.repeat(s, g.shape[1] // s.shape[1], axis=1).reshape(g.shape[0], g.shape[1], *([1] * (len(g.shape) - 2)))
        w = mods[name].weight.detach().numpy()
        assert np.array_equal((data.astype(np.float32) * full).astype(np.float16), w.astype(np.float16)), name
    back = e["quantization"]["readback"]
    assert back["integers_equal"] == back["layers_checked"] == len(grid.layers)
    assert back["dequantized_exact"] == len(grid.layers) and back["scale_max_rel_diff"] == 0
    assert back["data_types"] == {want_int: len(grid.layers)}


def test_w8_keeps_ios17_and_w4_raises_it(exports):
    e8, e4 = exports["w8"].entry, exports["w4"].entry
    assert e8["deployment_target"] == "iOS17" and e8["opset"] == "CoreML7"
    assert e4["deployment_target"] == "iOS18" and e4["opset"] == "CoreML8"
    assert any("iOS18" in n for n in e4["quantization"]["notes"])
    for e, n8, n4 in ((e8, 1, 0), (e4, 0, 1)):
        q = e["quantization"]
        assert (q["layers_int8"] > 0) == bool(n8) and (q["layers_int4"] > 0) == bool(n4)
        assert q["layers_float"] == 0 and q["fallbacks"] == {} and q["activations"] == "float"
        if not ON_MAC:
            assert e["parity"]["status"] == "not run"


def test_files_shrink(exports):
    """Every layer is held (no fallback): the weights file holds 1 byte (w8) or half a byte (w4) per
    grid weight, fp16 scales, the other parameters in fp16 and Core ML's per-blob header and alignment."""
    import math

    for scheme, bits in (("w8", 8), ("w4", 4)):
        model, path, grid = exports[scheme].model, exports[scheme].path, exports[scheme].grid
        grid_n = sum(math.prod(g.shape) for g in grid.layers.values())
        other = sum(p.numel() for p in model.unet.parameters()) - grid_n
        n_scales = sum(g.scale.numel() for g in grid.layers.values())
        want = grid_n * bits // 8 + 2 * n_scales + 2 * other
        got = _weights_bytes(path)
        blobs = len(list(model.unet.parameters())) + len(grid.layers)
        # each const blob: a 64-byte header, data padded to 64 bytes (and a few float constants of the graph)
        assert want <= got <= want + 128 * (blobs + 2), (scheme, got, want)
        fp16 = 2 * (grid_n + other)
        # vs the same weights in fp16, measured here: 0.74 (w8) / 0.44 (w4) - a fixture of 8-64 channel
        # layers, where scales, norms and alignment weigh more than at scale (demo U-Net: see README)
        assert got / fp16 < (0.78 if bits == 8 else 0.48), (scheme, got / fp16)
    assert exports["w4"].entry["size_bytes"] < exports["w8"].entry["size_bytes"]


def test_plan_mapping_finds_every_layer_by_value():
    """Names from torch.jit.trace differ from torch.export's: the mapping falls back to the values."""
    import torch

    from pocketfusion.export import quant_coreml as qc
    from pocketfusion.testing.fixtures import tiny_unet

    unet = tiny_unet("sd15")
    grid = G.rtn_grid(unet, 8)

    class Op:
        def __init__(self, val):
            self.outputs = [type("V", (), {"val": val, "shape": val.shape})()]

    consts = {f"w{i}": Op(m.weight.detach().numpy().astype(np.float16))
              for i, m in enumerate(G.quantizable_layers(unet).values())}
    found, missing = qc.match_layers(grid.layers, unet, consts, np.float16, "unet")
    assert not missing and len(set(found.values())) == len(grid.layers)
    with torch.no_grad():
        unet.conv_in.weight.mul_(2)
    found, missing = qc.match_layers(grid.layers, unet, consts, np.float16, "unet")
    assert list(missing) == ["conv_in"] and "kept float" in missing["conv_in"]
