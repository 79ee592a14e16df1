"""TFLite / LiteRT export: litert-torch conversion, I/O name mapping, parity through ai-edge-litert."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

from pocketfusion.errors import UserError  # noqa: E402
from pocketfusion.export.api import parity, torch_reference  # noqa: E402
from pocketfusion.export.base import ExportConfig, ExportError  # noqa: E402
from pocketfusion.export.components import unet_spec  # noqa: E402
from pocketfusion.export.testing import export_tiny_unet  # noqa: E402
from pocketfusion.runtimes.base import load_session  # noqa: E402
from pocketfusion.testing.fixtures import FAMILIES, tiny_unet  # noqa: E402

CFG = ExportConfig(targets=("tflite",))


def _export(family, out_dir):
    """(spec, path, info) of ``tiny_unet(family)`` exported to TFLite (the layer map in ``info["_layer_map"]``)."""
    spec, path, res = export_tiny_unet("tflite", family, out_dir, CFG)
    return spec, path, {**res.info, "_layer_map": res.layer_map}


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """The tiny SD-1.5 U-Net, exported once for the whole module: (spec, path, info)."""
    return _export("sd15", tmp_path_factory.mktemp("tflite-sd15"))


def test_layer_map_names_every_weight_tensor(sd15):
    """A float export's layer map: each quantizable layer -> the tensor(s) holding its weight (or a folded copy)."""
    from pocketfusion.compress.quant.grid import quantizable_layers
    from pocketfusion.export import layer_map as lm
    from pocketfusion.export.quant_tflite import read_model, weight_map

    spec, path, info = sd15
    layer_map = info["_layer_map"]
    assert set(layer_map) == set(quantizable_layers(spec.source_module))
    model = read_model(path)
    names = {t.name.decode() for t in model.subgraphs[0].tensors}
    assert all(n in names for v in layer_map.values() for n in lm.split(v))
    # names are compact (t<i>) but for the graph's inputs and outputs, and the map still points at each layer's weight
    sg = model.subgraphs[0]
    io = set(sg.inputs) | set(sg.outputs)
    assert all(t.name.decode() == f"t{i}" for i, t in enumerate(sg.tensors) if i not in io)
    assert weight_map(model, spec.source_module, list(layer_map)) == layer_map


def test_io_json_maps_spec_names_to_signature(sd15):
    spec, path, info = sd15
    io = json.loads((path.parent / "unet.tflite.io.json").read_text())
    assert io == info["io"]
    assert io["signature"] == "serving_default"
    assert io["inputs"] == ["sample", "timestep", "encoder_hidden_states"]
    assert io["outputs"] == ["noise_pred"]
    assert io["input_map"] == {"sample": "args_0", "timestep": "args_1", "encoder_hidden_states": "args_2"}
    assert io["output_map"] == {"noise_pred": "output_0"}
    assert info["rewrites"] == [] and info["ops"]["CONV_2D"] > 0
    assert not list(path.parent.glob(".unet.tflite.*"))  # the staging directory is gone


def test_session_speaks_spec_names(sd15):
    spec, path, _ = sd15
    s = load_session(path, "tflite", threads=1)
    assert s.runtime == "litert"
    assert s.input_names == ("sample", "timestep", "encoder_hidden_states")
    assert s.output_names == ("noise_pred",)
    assert s.device.startswith("ai-edge-litert 2.") and "CPU" in s.device and "1 thread)" in s.device
    out = s.run(spec.golden[0])
    assert set(out) == {"noise_pred"} and out["noise_pred"].shape == (2, 4, 8, 8)
    assert out["noise_pred"].dtype == np.float32


def test_parity_on_golden_feeds(sd15):
    spec, path, _ = sd15
    assert len(spec.golden) >= 3 and len({float(f["timestep"][0]) for f in spec.golden}) >= 3
    s = load_session(path, "tflite")
    p = parity(s, spec, torch_reference(spec))
    assert p["feeds"] == len(spec.golden)
    assert p["rel_max"] < 1e-4, p


def test_missing_input_is_user_error(sd15):
    spec, path, _ = sd15
    s = load_session(path, "litert")
    feed = dict(spec.golden[0])
    del feed["timestep"]
    with pytest.raises(UserError, match="missing inputs \\['timestep'\\]"):
        s.run(feed)


def test_without_io_json_the_signature_names_are_used(sd15, tmp_path):
    spec, path, _ = sd15
    bare = tmp_path / "unet.tflite"
    shutil.copy(path, bare)
    s = load_session(bare, "tflite", threads=1)
    assert s.input_names == ("args_0", "args_1", "args_2") and s.output_names == ("output_0",)
    out = s.run({f"args_{i}": spec.golden[0][t.name] for i, t in enumerate(spec.inputs)})
    assert out["output_0"].shape == (2, 4, 8, 8)


def test_map_io_rejects_a_signature_that_differs_from_the_spec(sd15):
    from pocketfusion.export.tflite import map_io

    spec, _, _ = sd15
    sig_in = {"args_0": ((2, 4, 8, 8), "float32"), "args_1": ((2,), "float32"), "args_2": ((2, 8, 16), "float32")}
    sig_out = {"output_0": ((2, 4, 8, 8), "float32")}
    assert map_io(spec, sig_in, sig_out)["input_map"]["encoder_hidden_states"] == "args_2"
    with pytest.raises(ExportError, match="timestep: spec \\[2\\] float32, tflite args_1 \\[2\\] int32"):
        map_io(spec, {**sig_in, "args_1": ((2,), "int32")}, sig_out)
    with pytest.raises(ExportError, match="the spec has 3 inputs"):
        map_io(spec, {"args_0": sig_in["args_0"]}, sig_out)


def test_converter_failure_is_an_export_error(monkeypatch, tmp_path):
    import litert_torch

    from pocketfusion.export import tflite

    def boom(*a, **k):
        raise RuntimeError("failed to legalize operation 'foo'\nmore detail")

    monkeypatch.setattr(litert_torch, "convert", boom)
    spec = unet_spec(tiny_unet("sd15"), seq_len=8)
    with pytest.raises(ExportError, match="tflite: unet failed to convert \\(RuntimeError: failed to legalize operation 'foo'\\)"):
        tflite.export_component(spec, tmp_path / "unet.tflite", CFG)
    assert not list(tmp_path.iterdir())


# the default run: sd15 (the shared fixture) and sdxl (two more inputs, deeper transformers); sd21 and the BK-SDM
# cuts (removed blocks: covered by the ExecuTorch and ONNX family tests) run with --runslow, over a minute each here
@pytest.mark.parametrize("family", [f if f in ("sd15", "sdxl") else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_every_family_converts_with_parity(family, sd15, tmp_path):
    spec, path, info = sd15 if family == "sd15" else _export(family, tmp_path)
    s = load_session(path, "tflite")
    assert list(s.input_names) == [t.name for t in spec.inputs]
    p = parity(s, spec, torch_reference(spec))
    assert p["rel_max"] < 1e-4, p
    assert info["rewrites"] == []
    if family == "sdxl":
        assert s.input_names[-2:] == ("text_embeds", "time_ids")


@pytest.mark.slow
def test_pipeline_export_passes_parity_and_generates(tiny_sd, tmp_path):
    from pocketfusion.checkpoint import load_model
    from pocketfusion.export.api import export
    from pocketfusion.generate import GenerateConfig, generate_images
    from pocketfusion.metrics import psnr
    from pocketfusion.runtimes.pipeline import RuntimePipeline

    out = tmp_path / "exp"
    m = export(load_model(tiny_sd), CFG, out, progress=False)
    comps = m.metrics["components"]
    assert set(comps) == {"tflite/text_encoder", "tflite/unet", "tflite/vae_decoder"}
    assert m.component("unet", "tflite").path == "tflite/unet.tflite" and m.component("unet", "tflite").layer_map
    for e in comps.values():
        assert e["parity"]["status"] == "pass" and e["parity"]["rel_max"] < 1e-4, e["parity"]
    assert comps["tflite/text_encoder"]["io"]["input_map"] == {"input_ids": "args_0"}
    prompt = "a large blue square on a yellow background, bottom left"
    img = RuntimePipeline(out, "tflite")(prompt, steps=6, guidance=4.0, seed=3)
    ref, _ = generate_images(load_model(tiny_sd), [prompt], GenerateConfig(steps=6, guidance=4.0, seed=3))
    assert psnr(img, ref[0]) >= 35.0
