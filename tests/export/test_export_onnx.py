import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from pocketfusion import artifact
from pocketfusion.checkpoint import load_model
from pocketfusion.errors import UserError
from pocketfusion.export.api import export_model, parity, torch_reference
from pocketfusion.export.base import ExportConfig
from pocketfusion.export.components import unet_spec
from pocketfusion.runtimes.base import load_session
from pocketfusion.testing.fixtures import FAMILIES, tiny_unet


@pytest.fixture(scope="module")
def onnx_export(tiny_onnx_export):
    return tiny_onnx_export


def test_export_dir_is_a_verified_artifact(onnx_export):
    m = artifact.load_manifest(onnx_export)
    assert m.stage == "export" and m.settings["targets"] == ["onnx"]
    comps = m.metrics["components"]
    assert set(comps) == {"onnx/text_encoder", "onnx/unet", "onnx/vae_decoder"}
    unet = comps["onnx/unet"]
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet["inputs"][0]["shape"] == [2, 4, 8, 8]  # CFG batch
    assert unet["opset"]["ai.onnx"] == 18 and not unet["external_data"]
    for e in comps.values():
        assert e["parity"]["status"] == "pass" and e["parity"]["rel"] < 1e-4
        assert e["size_bytes"] > 0 and e["export_seconds"] > 0
    assert unet["parity"]["feeds"] == 4  # U-Net inputs from 4 timesteps of a real sampling run
    assert (onnx_export / "golden" / "unet.safetensors").is_file()


def test_golden_unet_inputs_span_the_trajectory(onnx_export):
    from safetensors.numpy import load_file

    g = load_file(str(onnx_export / "golden" / "unet.safetensors"))
    ts = sorted({float(g[f"{i}.in.timestep"][0]) for i in range(4)})
    assert ts[0] < 200 and ts[-1] > 800


def test_runtime_pipeline_matches_pytorch(onnx_export, tiny_sd):
    from pocketfusion.generate import GenerateConfig, generate_images
    from pocketfusion.pipeline import RuntimePipeline, psnr

    prompt = "a large blue square on a yellow background, bottom left"
    rt = RuntimePipeline(onnx_export, "onnx")
    img = rt(prompt, steps=6, guidance=4.0, seed=3)
    ref, _ = generate_images(load_model(tiny_sd), [prompt], GenerateConfig(steps=6, guidance=4.0, seed=3))
    assert psnr(img, ref[0]) >= 35.0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_numpy_ddim_matches_diffusers(prediction, schedule):
    from diffusers import DDIMScheduler as Ref

    from pocketfusion.demo.configs import SCHEDULER
    from pocketfusion.pipeline import DDIMScheduler

    betas = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012)}[schedule]
    ref = Ref(**dict(SCHEDULER, prediction_type=prediction, beta_schedule=schedule, beta_start=betas[0], beta_end=betas[1]))
    ours = DDIMScheduler(dict(ref.config))
    ref.set_timesteps(10)
    assert np.array_equal(ours.timesteps(10), ref.timesteps.numpy())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    for t in ref.timesteps:
        eps = torch.randn(1, 4, 8, 8, generator=g)
        want = ref.step(eps, t, x).prev_sample
        got = ours.step(eps.numpy(), int(t), x.numpy(), 10)
        assert np.allclose(got, want.numpy(), atol=1e-5)
        x = want


def test_checksum_failure_blocks_runtime(onnx_export, tmp_path):
    import shutil

    from pocketfusion.pipeline import RuntimePipeline

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
    info = onnx_exporter.export_component(spec, path, ExportConfig(targets=("onnx",)))
    p = parity(load_session(path, "onnx"), spec, torch_reference(spec))
    assert p["rel"] < 1e-4, p
    assert info["nodes"] > 0
    if family == "sdxl":
        assert [i.name for i in load_session(path, "onnx")._s.get_inputs()][-2:] == ["text_embeds", "time_ids"]


def test_unknown_target_is_user_error():
    with pytest.raises(UserError, match="unknown target tensorrt; available: onnx, executorch, tflite, coreml"):
        ExportConfig(targets=("tensorrt",))
