"""Core ML export: ML Program packages checked statically here; prediction only on macOS."""

import sys

import pytest

ct = pytest.importorskip("coremltools")

from pocketfusion.errors import UserError  # noqa: E402
from pocketfusion.export.base import ExportConfig, ExportError  # noqa: E402
from pocketfusion.export.components import unet_spec  # noqa: E402
from pocketfusion.export.testing import export_tiny_unet  # noqa: E402
from pocketfusion.testing.fixtures import FAMILIES, tiny_unet  # noqa: E402

CFG = ExportConfig(targets=("coreml",))
ON_MAC = sys.platform == "darwin"


def _export(family, out_dir, cfg=CFG):
    """(spec, path, info) of ``tiny_unet(family)`` exported to Core ML (the layer map in ``info["_layer_map"]``)."""
    spec, path, res = export_tiny_unet("coreml", family, out_dir, cfg)
    return spec, path, {**res.info, "_layer_map": res.layer_map}


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """The tiny SD-1.5 U-Net, exported once (fp16, iOS17 defaults): (spec, path, info)."""
    return _export("sd15", tmp_path_factory.mktemp("coreml-sd15"))


def test_layer_map_names_every_weight_const(sd15):
    """A float program's layer map: each quantizable layer -> its weight const, by torch.export's name."""
    from pocketfusion.compress.quant.grid import quantizable_layers

    spec, _, info = sd15
    layer_map = info["_layer_map"]
    assert set(layer_map) == set(quantizable_layers(spec.source_module))
    assert layer_map["conv_in"] == "p_unet_conv_in_weight_to_fp16"


def _features(features):
    return [(f.name, tuple(f.type.multiArrayType.shape)) for f in features]


def test_package_matches_the_spec(sd15):
    from coremltools.proto import FeatureTypes_pb2

    spec, path, info = sd15
    assert path.is_dir() and (path / "Manifest.json").is_file()
    assert not list(path.parent.glob(".unet.mlpackage.*"))  # the staging directory is gone
    m = ct.models.MLModel(str(path), skip_model_load=True)
    desc = m.get_spec().description
    assert _features(desc.input) == [(s.name, s.shape) for s in spec.inputs]
    assert _features(desc.output) == [("noise_pred", (2, 4, 8, 8))]
    # the interface stays float32 even though the program computes in fp16
    assert {f.type.multiArrayType.dataType for f in (*desc.input, *desc.output)} == {FeatureTypes_pb2.ArrayFeatureType.FLOAT32}
    assert info["io_check"] == "ok" and info["frontend"] == "torch.export" and info["rewrites"] == []


def test_defaults_are_fp16_ios17_with_counted_ops(sd15):
    from pocketfusion.export.coreml import count_ops

    _, path, info = sd15
    assert info["deployment_target"] == "iOS17" and info["precision"] == "fp16"
    assert info["spec_version"] == 8 and info["opset"] == "CoreML7"
    assert info["heavy_op_dtypes"] == {"float16": sum(info["ops"][t] for t in ("conv", "linear", "matmul"))}
    assert info["ops"] == count_ops(ct.utils.load_spec(str(path)))
    assert info["ops"]["conv"] > 0 and info["ops"]["linear"] > 0 and info["ops"]["softmax"] > 0
    assert info["compute_ops"] == sum(n for t, n in info["ops"].items() if t != "const") > 0
    assert any("macOS" in n for n in info["notes"])


def test_validation_names_every_mismatch(sd15):
    import dataclasses

    from pocketfusion.artifact import TensorSpec
    from pocketfusion.export.coreml import validate_package

    spec, path, _ = sd15
    renamed = dataclasses.replace(spec, outputs=(TensorSpec("eps", (2, 4, 8, 8), "float32"),))
    with pytest.raises(ExportError, match=r"output names \['noise_pred'\] != spec \['eps'\]"):
        validate_package(path, renamed)
    reshaped = dataclasses.replace(spec, inputs=(TensorSpec("sample", (1, 4, 8, 8), "float32"), *spec.inputs[1:]))
    with pytest.raises(ExportError, match=r"input sample: package \[2, 4, 8, 8\] float32, spec \[1, 4, 8, 8\] float32"):
        validate_package(path, reshaped)


@pytest.mark.skipif(ON_MAC, reason="Core ML runs on macOS")
def test_runtime_refuses_linux_in_one_line(sd15):
    from pocketfusion.runtimes.base import load_session

    _, path, _ = sd15
    with pytest.raises(UserError, match="^Core ML cannot run on Linux: MLModel.predict needs macOS") as e:
        load_session(path, "coreml")
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not ON_MAC, reason="MLModel.predict needs macOS")
def test_parity_on_macos(sd15):
    from pocketfusion.export.api import parity, torch_reference
    from pocketfusion.export.base import TOLERANCE
    from pocketfusion.runtimes.coreml import load

    spec, path, _ = sd15
    p = parity(load(path, compute_units="CPU_ONLY"), spec, torch_reference(spec))
    assert p["rel_max"] < TOLERANCE["coreml-fp16"], p


def test_torch_export_failure_falls_back_to_jit_trace(monkeypatch, tmp_path):
    import torch

    from pocketfusion.compress.quant import grid as G
    from pocketfusion.export import coreml

    def boom(*a, **k):
        raise RuntimeError("Unsupported fx node alias")

    monkeypatch.setattr(torch.export, "export", boom)
    spec = unet_spec(tiny_unet("bk-sdm-tiny"), seq_len=8)
    res = coreml.export_component(spec, tmp_path / "unet.mlpackage", CFG)
    info = res.info
    assert set(res.layer_map) == set(G.quantizable_layers(spec.source_module))  # by value: the traced names differ
    assert info["frontend"] == "torch.jit.trace" and info["io_check"] == "ok"
    assert "torch.export path failed (RuntimeError: Unsupported fx node alias)" in info["notes"][0]


@pytest.mark.slow
def test_ios18_fp32(tmp_path):
    _, _, info = _export("sd15", tmp_path, ExportConfig(targets=("coreml",), coreml_deployment_target="iOS18", coreml_precision="fp32"))
    assert info["deployment_target"] == "iOS18" and info["precision"] == "fp32"
    assert info["spec_version"] == 9 and info["opset"] == "CoreML8"
    assert set(info["heavy_op_dtypes"]) == {"float32"}


# the default run: sd15 (the shared fixture) and sdxl (two more inputs, deeper transformers); sd21 and the BK-SDM
# cuts (removed blocks: covered by the ExecuTorch and ONNX family tests) run with --runslow, over a minute each here
@pytest.mark.parametrize("family", [f if f in ("sd15", "sdxl") else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_every_family_converts_and_validates(family, sd15, tmp_path):
    spec, path, info = sd15 if family == "sd15" else _export(family, tmp_path)
    assert info["io_check"] == "ok" and info["compute_ops"] > 0 and info["ops"]["conv"] > 0
    names = [f.name for f in ct.utils.load_spec(str(path)).description.input]
    assert names == [s.name for s in spec.inputs]
    if family == "sdxl":
        assert names[-2:] == ["text_embeds", "time_ids"]


@pytest.mark.slow
def test_pipeline_export_records_why_parity_was_not_run(tiny_sd, tmp_path):
    from pocketfusion.checkpoint import load_model
    from pocketfusion.export.api import export

    out = tmp_path / "exp"
    comps = export(load_model(tiny_sd), CFG, out, progress=False).metrics["components"]
    assert set(comps) == {"coreml/text_encoder", "coreml/unet", "coreml/vae_decoder"}
    # coremltools 9.0 has no converter for the aten.alias node in CLIP's exported graph
    te = comps["coreml/text_encoder"]
    assert te["frontend"] == "torch.jit.trace" and "torch.export path failed" in te["notes"][0]
    assert any("overflowed" in n for n in te["notes"])  # the causal mask's float32 minimum -> fp16 -inf
    for e in comps.values():
        assert e["io_check"] == "ok"
        if not ON_MAC:
            assert e["parity"]["status"] == "not run" and "macOS" in e["parity"]["reason"]
