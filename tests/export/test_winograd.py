"""Winograd 3x3 convolutions in the ONNX export (``export.winograd``): the same function through onnxruntime, the
file's weights kept, only the convolutions it can express taken, and ``auto`` deciding by measurement."""

from __future__ import annotations

import numpy as np
import pytest

from pocketfusion.errors import UserError
from pocketfusion.export import winograd
from pocketfusion.export.base import ExportConfig

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _run(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _graph():
    """x (1, 8, 8, 12) -> [MHA over the 96 positions] -> conv3x3+bias -> relu -> conv3x3 stride 2 -> conv1x1 ->
    conv3x3 with a DequantizeLinear int8 weight, no bias. Two of the four convs are candidates."""
    rng = np.random.default_rng(0)
    c = 8
    inits = [
        numpy_helper.from_array((rng.standard_normal((c, c, 3, 3)) * 0.2).astype(np.float32), "conv_a.weight"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "conv_a.bias"),
        numpy_helper.from_array((rng.standard_normal((c, c, 3, 3)) * 0.2).astype(np.float32), "conv_s2.weight"),
        numpy_helper.from_array((rng.standard_normal((c, c, 1, 1)) * 0.2).astype(np.float32), "conv_1x1.weight"),
        numpy_helper.from_array(rng.integers(-127, 128, (6, c, 3, 3)).astype(np.int8), "conv_q.weight.q"),
        numpy_helper.from_array(np.full((6,), 0.002, np.float32), "conv_q.scale"),
        numpy_helper.from_array(np.array([1, c, 96], np.int64), "to_seq"),
        numpy_helper.from_array(np.array([1, c, 8, 12], np.int64), "to_map"),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "to_seq"], ["seq_t"]),
        helper.make_node("Transpose", ["seq_t"], ["seq"], perm=[0, 2, 1]),
        helper.make_node("MultiHeadAttention", ["seq", "seq", "seq"], ["att"], domain="com.microsoft", num_heads=2),
        helper.make_node("Transpose", ["att"], ["att_t"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["att_t", "to_map"], ["h0"]),
        helper.make_node("Conv", ["h0", "conv_a.weight", "conv_a.bias"], ["h1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("Conv", ["h2", "conv_s2.weight"], ["h3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["h2", "conv_1x1.weight"], ["h4"], kernel_shape=[1, 1]),
        helper.make_node("DequantizeLinear", ["conv_q.weight.q", "conv_q.scale"], ["conv_q.weight"], axis=0),
        helper.make_node("Conv", ["h4", "conv_q.weight"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 12]),
                               helper.make_tensor_value_info("h3", TensorProto.FLOAT, [1, c, 4, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def test_rewrite_computes_the_same_function_and_keeps_the_file_weights():
    """``on`` takes the two stride-1 3x3 convs (one behind onnxruntime's MultiHeadAttention, whose output shape onnx
    cannot infer, one with a DequantizeLinear weight) as F(4, 3) on their 8x12 maps, leaves the strided and 1x1
    ones, and computes the same outputs."""
    model = _graph()
    x = np.random.default_rng(1).standard_normal((1, 8, 8, 12)).astype(np.float32)
    ref = _run(model, x)
    cands = winograd.candidates(model)
    assert [c.node.input[1] for c in cands] == ["conv_a.weight", "conv_q.weight"]
    assert [c.x_shape for c in cands] == [(1, 8, 8, 12), (1, 8, 8, 12)] and winograd.tiles_for((1, 8, 8, 12)) == [4, 2]
    rep = winograd.rewrite(model, "on")
    assert rep["convs"] == 2 and rep["rewritten"] == {"F(4,3)": 2}
    assert rep["runtime_weight_bytes"] == {"direct": 4 * (8 + 6) * 8 * 9, "winograd": 4 * (8 + 6) * 8 * 36}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 2 + 2  # the strided and 1x1 convs, and each Winograd graph's input transform
    assert ops.count("DepthToSpace") == 2 and ops.count("Einsum") == 2
    onnx.checker.check_model(model)
    einsum_inputs = {n.input[1] for n in model.graph.node if n.op_type == "Einsum"}
    assert einsum_inputs == {"conv_a.weight", "conv_q.weight"}  # U is made from the file's own (integer) weights
    assert {t.name for t in model.graph.initializer} >= {"conv_a.weight", "conv_q.weight.q", "conv_s2.weight"}
    got = _run(model, x)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 5e-5


@pytest.mark.parametrize("m, tol", [(2, 2e-6), (4, 5e-5)])
def test_each_tile_size_matches_the_direct_convolution(m, tol):
    """F(2, 3) and F(4, 3), with and without a bias, non-square maps: output against the direct Conv."""
    x_shape, w_shape = (2, 5, 8, 16), (3, 5, 3, 3)
    x = np.random.default_rng(2).standard_normal(x_shape).astype(np.float32)
    ref = _run(winograd._single(x_shape, w_shape, None), x)
    got = _run(winograd._single(x_shape, w_shape, m), x)
    assert got.shape == ref.shape and np.abs(got - ref).max() / np.abs(ref).max() < tol


def test_transform_constants_are_winograds_identity():
    """``A^T [(G g G^T) * (B^T d B)] A`` is the correlation of a tile with the kernel, in float64, for each tile size."""
    rng = np.random.default_rng(3)
    for m in winograd.TILES:
        bt, g, at = winograd._matrices(m)
        d, k = rng.standard_normal((m + 2, m + 2)), rng.standard_normal((3, 3))
        y = at @ ((g @ k @ g.T) * (bt @ d @ bt.T)) @ at.T
        ref = np.array([[np.sum(d[i:i + 3, j:j + 3] * k) for j in range(m)] for i in range(m)])
        assert np.allclose(y, ref, atol=1e-12)


def test_auto_keeps_the_direct_convolution_where_winograd_is_slower():
    """At a tiny shape the Winograd graph's extra ops cost more than its multiplies save: ``auto`` measures every
    form, keeps the direct conv and records the figures; ``off`` measures nothing."""
    model = _graph()
    n_before = len(model.graph.node)
    rep = winograd.rewrite(model, "auto")
    assert rep["convs"] == 0 and len(model.graph.node) == n_before
    assert len(rep["shapes"]) == 2  # the two candidates differ in output channels
    for shape in rep["shapes"]:
        assert shape["chosen"] == "direct" and set(shape["measured"]) == {"direct", "F(4,3)", "F(2,3)"}
        assert all(v["median_ms"] > 0 for v in shape["measured"].values())
    off = winograd.rewrite(_graph(), "off")
    assert off["convs"] == 0 and off["shapes"] == []


def test_config_checks_the_mode():
    with pytest.raises(UserError, match="--winograd must be one of auto, on, off"):
        ExportConfig(winograd="always")


class _Net(__import__("torch").nn.Module):
    """Two stride-1 3x3 convs (16x16 and 8x8 maps) around a strided one: what every target's rewrite can take."""

    def __init__(self):
        import torch
        from torch import nn

        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1, stride=2),
                                 nn.Conv2d(4, 4, 3, padding=1, bias=False))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("target", ["onnx", "tflite", "executorch"])
def test_every_target_writes_the_winograd_form_with_parity(target, tmp_path):
    """``--winograd on`` rewrites the two stride-1 convs as F(4, 3) in each target's file (the ONNX graph builds U
    from the file's weights; the XNNPACK targets store U), records it, and the runtime's output matches PyTorch's."""
    import torch

    from pocketfusion import backends
    from pocketfusion.artifact import TensorSpec
    from pocketfusion.export.components import ComponentSpec
    from pocketfusion.runtimes.base import load_session

    b = backends.backend(target)
    pytest.importorskip(b.export_probe)
    pytest.importorskip(b.runtime_probe)
    x = np.random.default_rng(4).standard_normal((1, 8, 16, 16)).astype(np.float32)
    module = _Net().eval()
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    spec = ComponentSpec("unet", module, (TensorSpec("sample", x.shape, "float32"),),
                         (TensorSpec("noise_pred", ref.shape, "float32"),), [{"sample": x}], source="net")
    path = tmp_path / f"net{backends.backend(target).extension}"
    info = backends.exporter(target).export_component(spec, path, ExportConfig(targets=(target,), winograd="on")).info
    assert info["winograd"]["convs"] == 2 and info["winograd"]["rewritten"] == {"F(4,3)": 2}
    assert any(r.startswith("winograd: 2 3x3 convolutions as F(4,3) x2 (on;") for r in info["rewrites"])
    got = next(iter(load_session(path, backends.backend(target).runtime).run({"sample": x}).values()))
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    assert all(type(m).__name__ == "Conv2d" for m in module.net if "Conv" in type(m).__name__)  # the caller's module
    if target == "onnx":
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert ops.count("Einsum") == 2 and ops.count("DepthToSpace") == 2
    off = backends.exporter(target).export_component(spec, tmp_path / f"off{path.suffix}",
                                                     ExportConfig(targets=(target,), winograd="off")).info
    assert off["winograd"]["convs"] == 0 and not any(r.startswith("winograd") for r in off["rewrites"])


def test_xnnpack_auto_takes_only_large_maps_with_many_channels():
    from torch import nn

    big, small = nn.Conv2d(128, 128, 3, padding=1), nn.Conv2d(64, 128, 3, padding=1)
    assert winograd.xnnpack_tile(big, (2, 128, 32, 32), "auto") == 4
    assert winograd.xnnpack_tile(big, (2, 128, 16, 16), "auto") is None  # a small map
    assert winograd.xnnpack_tile(small, (2, 64, 64, 64), "auto") is None  # few channels
    assert winograd.xnnpack_tile(nn.Conv2d(128, 128, 3, padding=1, stride=2), (2, 128, 64, 64), "on") is None
    assert winograd.xnnpack_tile(nn.Conv2d(128, 128, 1), (2, 128, 64, 64), "on") is None
    assert winograd.xnnpack_tile(small, (1, 64, 8, 8), "on") == 4 and winograd.xnnpack_tile(small, (1, 64, 4, 4), "on") == 2
    assert winograd.xnnpack_tile(big, (2, 128, 32, 32), "off") is None
