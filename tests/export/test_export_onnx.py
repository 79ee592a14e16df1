import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from pocketfusion import artifact  # noqa: E402
from pocketfusion.checkpoint import load_model  # noqa: E402
from pocketfusion.errors import UserError  # noqa: E402
from pocketfusion.export.api import parity, torch_reference  # noqa: E402
from pocketfusion.export.base import ExportConfig  # noqa: E402
from pocketfusion.export.components import unet_spec  # noqa: E402
from pocketfusion.runtimes.base import load_session  # noqa: E402
from pocketfusion.testing.fixtures import FAMILIES, tiny_unet  # noqa: E402


@pytest.fixture(scope="module")
def onnx_export(tiny_onnx_export):
    return tiny_onnx_export


def test_export_dir_is_a_verified_artifact(onnx_export):
    m = artifact.load_manifest(onnx_export)
    assert m.stage == "export" and m.settings["targets"] == ["onnx"]
    assert m.targets() == ("onnx",)
    assert [c.key for c in m.components] == ["onnx/text_encoder", "onnx/unet", "onnx/vae_decoder", "tokenizer", "scheduler"]
    comps = m.metrics["components"]
    assert set(comps) == {"onnx/text_encoder", "onnx/unet", "onnx/vae_decoder"}
    unet = m.component("unet", "onnx")
    assert unet.path == "onnx/unet.onnx" and unet.format == "onnx" and unet.golden == "golden/unet.safetensors"
    assert [i.name for i in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.inputs[0].shape == (2, 4, 8, 8)  # CFG batch (the sampler's)
    assert [o.name for o in unet.outputs] == ["noise_pred"]
    e = comps["onnx/unet"]
    assert e["opset"]["ai.onnx"] == 18 and not e["external_data"]
    for e in comps.values():
        assert not {"path", "inputs", "outputs", "target", "component"} & set(e)  # typed fields, not metrics
        assert e["parity"]["status"] == "pass" and e["parity"]["rel_max"] < 1e-4 and "rel" not in e["parity"]
        assert e["size_bytes"] > 0 and e["export_seconds"] > 0
    assert comps["onnx/unet"]["parity"]["feeds"] == 4  # U-Net inputs from 4 timesteps of a real sampling run
    assert (onnx_export / "golden" / "unet.safetensors").is_file()
    assert not (onnx_export / "pipeline.json").exists()


def test_sampler_and_pipeline_files_are_typed(onnx_export, tiny_sd):
    from pocketfusion.checkpoint import sampler_of

    m = artifact.load_manifest(onnx_export)
    assert m.sampler == sampler_of(load_model(tiny_sd))
    assert m.sampler.unet_batch == 2 and m.sampler.guidance == "cfg" and m.sampler.latent_shape == (1, 4, 8, 8)
    for name in ("tokenizer", "scheduler"):
        c = m.component(name)
        assert c.format == name and (onnx_export / c.path).is_dir()


def test_layer_map_names_every_weight_initializer(onnx_export, tiny_sd):
    """A float export's layer map: each quantizable layer -> the initializer holding its weight, by value."""
    import onnx

    from pocketfusion.compress.quant.grid import quantizable_layers

    m = artifact.load_manifest(onnx_export)
    model = load_model(tiny_sd)
    for comp, source in (("unet", "unet"), ("text_encoder", "text_encoder"), ("vae_decoder", "vae")):
        c = m.component(comp, "onnx")
        layers = quantizable_layers(model.components[source])
        if source == "vae":  # the decoder half
            layers = {n: m for n, m in layers.items() if n.startswith("decoder.") or n == "post_quant_conv"}
        assert set(c.layer_map) == set(layers), comp
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(onnx_export / c.path)).graph.initializer}
        for name, mod in layers.items():
            a = inits[c.layer_map[name]]
            w = mod.weight.detach().numpy()
            assert np.array_equal(a, w) or np.array_equal(a.T, w), (comp, name)


def test_golden_unet_inputs_span_the_trajectory(onnx_export):
    m = artifact.load_manifest(onnx_export)
    ts = sorted({float(artifact.read_golden(onnx_export / m.component("unet", "onnx").golden, i)[0]["timestep"][0]) for i in range(4)})
    assert ts[0] < 200 and ts[-1] > 800


def test_runtime_pipeline_matches_pytorch(onnx_export, tiny_sd):
    from pocketfusion.generate import GenerateConfig, generate_images
    from pocketfusion.metrics import psnr
    from pocketfusion.runtimes.pipeline import RuntimePipeline

    prompt = "a large blue square on a yellow background, bottom left"
    rt = RuntimePipeline(onnx_export, "onnx")
    img = rt(prompt, steps=6, guidance=4.0, seed=3)
    ref, _ = generate_images(load_model(tiny_sd), [prompt], GenerateConfig(steps=6, guidance=4.0, seed=3))
    assert psnr(img, ref[0]) >= 35.0


def test_checksum_failure_blocks_runtime(onnx_export, tmp_path):
    import shutil

    from pocketfusion.runtimes.pipeline import RuntimePipeline

    bad = tmp_path / "bad"
    shutil.copytree(onnx_export, bad)
    with open(bad / "onnx" / "unet.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="onnx/unet.onnx"):
        RuntimePipeline(bad, "onnx")
    with pytest.raises(UserError, match="no executorch export"):
        RuntimePipeline(onnx_export, "executorch")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_with_parity(family, tmp_path):
    from pocketfusion.export import onnx as onnx_exporter

    unet = tiny_unet(family)
    spec = unet_spec(unet, seq_len=8)
    path = tmp_path / "unet.onnx"
    res = onnx_exporter.export_component(spec, path, ExportConfig(targets=("onnx",)))
    p = parity(load_session(path, "onnx"), spec, torch_reference(spec))
    assert p["rel_max"] < 1e-4, p
    assert res.info["nodes"] > 0 and res.layer_map
    if family == "sdxl":
        assert [i.name for i in load_session(path, "onnx")._s.get_inputs()][-2:] == ["text_embeds", "time_ids"]


def test_config_names_every_option():
    with pytest.raises(UserError, match="unknown target tensorrt; available: onnx, executorch, tflite, coreml"):
        ExportConfig(targets=("tensorrt",))
    with pytest.raises(UserError, match="unknown component vae; available: text_encoder, text_encoder_2, unet, vae_decoder"):
        ExportConfig(components=("vae",))
    with pytest.raises(UserError, match="executorch_activations must be one of grid, dynamic"):
        ExportConfig(executorch_activations="static")
    with pytest.raises(UserError, match="executorch_profile_runs must be >= 0"):
        ExportConfig(executorch_profile_runs=-1)
    cfg = ExportConfig(targets=["onnx"])
    assert cfg.targets == ("onnx",) and cfg.to_dict()["targets"] == ["onnx"] and "extra" not in cfg.to_dict()
    with pytest.raises(AttributeError):
        cfg.seed = 1  # frozen


def test_guidance_embedded_unet_is_batch_1_with_a_guidance_input(tmp_path):
    """A U-Net with time_cond_proj_dim (a guidance-distilled student) exports at batch 1 with the scale as an input."""
    import torch
    from diffusers import UNet2DConditionModel

    from pocketfusion.export import onnx as onnx_exporter
    from pocketfusion.testing.fixtures import TINY_CONFIGS

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_CONFIGS["sd15"], time_cond_proj_dim=16).eval()
    spec = unet_spec(unet, seq_len=8)
    assert [s.name for s in spec.inputs] == ["sample", "timestep", "encoder_hidden_states", "guidance"]
    assert spec.inputs[0].shape[0] == 1 and spec.outputs[0].shape[0] == 1
    path = tmp_path / "unet.onnx"
    onnx_exporter.export_component(spec, path, ExportConfig(targets=("onnx",)))
    s = load_session(path, "onnx")
    p = parity(s, spec, torch_reference(spec))
    assert p["rel_max"] < 1e-4, p
    feed = dict(spec.golden[0], guidance=np.full((1,), 7.5, dtype=np.float32))  # the scale changes the output
    assert not np.allclose(s.run(feed)["noise_pred"], s.run(spec.golden[0])["noise_pred"])


def test_attention_exports_as_onnxruntime_fused_multihead_attention(onnx_export, tiny_sd, tmp_path):
    """The U-Net's plain attentions become com.microsoft MultiHeadAttention (parity holds through onnxruntime's fused
    kernel); the VAE's (group norm + residual) keep the stock form; --no-rewrite keeps every attention decomposed."""
    import onnx

    from pocketfusion.backends import exporter

    m = artifact.load_manifest(onnx_export)
    comps = m.metrics["components"]
    graph = onnx.load(str(onnx_export / m.component("unet", "onnx").path))
    n_mha = sum(n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft" for n in graph.graph.node)
    unet = load_model(tiny_sd).unet
    n_attn = sum(type(mod).__name__ == "Attention" for mod in unet.modules())
    assert n_mha == n_attn > 0 and f"attention: {n_mha} plain diffusers attentions" in comps["onnx/unet"]["rewrites"][0]
    assert comps["onnx/unet"]["parity"]["status"] == "pass"
    vae = onnx.load(str(onnx_export / m.component("vae_decoder", "onnx").path))
    assert not any(n.op_type == "MultiHeadAttention" for n in vae.graph.node)
    spec = unet_spec(unet, seq_len=77)
    path = tmp_path / "plain.onnx"
    info = exporter("onnx").export_component(spec, path, ExportConfig(targets=("onnx",), rewrite=False)).info
    assert info["rewrites"] == [] and not any(n.op_type == "MultiHeadAttention" for n in onnx.load(str(path)).graph.node)
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(mod.processor, AttnProcessor2_0) for mod in unet.modules() if type(mod).__name__ == "Attention")


def test_winograd_choice_is_measured_and_recorded(onnx_export):
    """``--onnx-winograd auto`` (the default) timed every distinct 3x3 convolution shape of the U-Net at export and
    recorded each choice with its figures; the manifest's rewrite line names what was rewritten, if anything."""
    m = artifact.load_manifest(onnx_export)
    w = m.metrics["components"]["onnx/unet"]["winograd"]
    assert w["mode"] == "auto" and w["shapes"]
    for shape in w["shapes"]:
        ms = shape["measured"]
        assert "direct" in ms and len(ms) >= 2 and all(v["median_ms"] > 0 for v in ms.values())
        best = min(ms, key=lambda k: ms[k]["median_ms"])
        assert shape["chosen"] in ("direct", best)
    assert w["convs"] == sum(s["convs"] for s in w["shapes"] if s["chosen"] != "direct")
    lines = [r for r in m.metrics["components"]["onnx/unet"]["rewrites"] if r.startswith("winograd:")]
    assert len(lines) == (1 if w["convs"] else 0)
