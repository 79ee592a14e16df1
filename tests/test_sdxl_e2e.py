"""SDXL end to end (issue 13) on the tiny SDXL fixture: both text encoders (the second with its pooled
projection), the added time ids and the U-Net with ``added_cond_kwargs`` exported, run through the runtime
pipeline and compared with diffusers' ``StableDiffusionXLPipeline`` from the same initial latents.

ONNX runs by default; ExecuTorch and TFLite lower the same pipeline more slowly and are marked slow
(``--runslow``). Each target is exported once per module.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest

from pocketfusion import artifact

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPT = "a large red circle on a blue background, center"
STEPS, GUIDANCE, SEED = 6, 4.0, 3
RUNTIME = {"onnx": "onnxruntime", "executorch": "executorch", "tflite": "litert"}
TARGETS = [
    pytest.param("onnx", id="onnx"),
    pytest.param("executorch", id="executorch", marks=pytest.mark.slow),
    pytest.param("tflite", id="tflite", marks=pytest.mark.slow),
]
PSNR_MIN = 35.0


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from pocketfusion.testing.fixtures import save_tiny_pipeline

    path = tmp_path_factory.mktemp("sdxl") / "model"
    save_tiny_pipeline(path, "sdxl")
    return path


@pytest.fixture(scope="module")
def exports(sdxl, tmp_path_factory):
    """target -> export directory, each target exported once per module (on first use)."""
    from pocketfusion.checkpoint import load_model
    from pocketfusion.export.api import export
    from pocketfusion.export.base import ExportConfig

    done: dict[str, object] = {}

    def get(target: str):
        if target not in done:
            pytest.importorskip({"onnx": "onnxruntime", "executorch": "executorch", "tflite": "ai_edge_litert"}[target])
            out = tmp_path_factory.mktemp(target) / "exp"
            export(load_model(sdxl), ExportConfig(targets=(target,), executorch_profile_runs=0), out, progress=False)
            done[target] = out
        return done[target]

    return get


def _diffusers_image(sdxl, prompt: str, *, force_zeros: bool = True) -> np.ndarray:
    """diffusers' StableDiffusionXLPipeline on the fixture, from the initial latents the runtime pipeline draws."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl), local_files_only=True, force_zeros_for_empty_prompt=force_zeros)
    pipe.set_progress_bar_config(disable=True)
    s = pipe.unet.config.sample_size
    latents = torch.randn((1, pipe.unet.config.in_channels, s, s), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        out = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents, output_type="np")
    return (np.clip(out.images[0], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@pytest.fixture(scope="module")
def reference(sdxl):
    return _diffusers_image(sdxl, PROMPT)


def test_manifest_records_the_sdxl_sampler_and_components(exports, sdxl):
    from pocketfusion.checkpoint import load_model, sampler_of

    out = exports("onnx")
    m = artifact.load_manifest(out)
    s = m.sampler
    assert s == sampler_of(load_model(sdxl))
    assert s.sdxl and s.tokenizer_2 == "tokenizer_2" and s.zero_negative and s.guidance == "cfg"
    assert s.time_ids == (64.0, 64.0, 0.0, 0.0, 64.0, 64.0)  # original size, crop top-left, target size (8x8 latents, VAE x8)
    assert [c.key for c in m.components] == ["onnx/text_encoder", "onnx/text_encoder_2", "onnx/unet", "onnx/vae_decoder",
                                             "tokenizer", "scheduler", "tokenizer_2"]
    assert m.component("tokenizer_2").format == "tokenizer" and (out / "tokenizer_2").is_dir()
    te, te2, unet = m.component("text_encoder", "onnx"), m.component("text_encoder_2", "onnx"), m.component("unet", "onnx")
    assert [(o.name, o.shape) for o in te.outputs] == [("penultimate_hidden_state", (1, 16, 16))]
    assert [(o.name, o.shape) for o in te2.outputs] == [("penultimate_hidden_state", (1, 16, 16)), ("text_embeds", (1, 16))]
    assert [(i.name, i.shape) for i in unet.inputs] == [
        ("sample", (2, 4, 8, 8)), ("timestep", (2,)), ("encoder_hidden_states", (2, 16, 32)), ("text_embeds", (2, 16)),
        ("time_ids", (2, 6))]
    raw = json.loads((out / artifact.MANIFEST).read_text())["sampler"]
    assert raw["time_ids"] == [64.0, 64.0, 0.0, 0.0, 64.0, 64.0] and raw["tokenizer_2"] == "tokenizer_2"


def test_sampler_schema_stays_backward_compatible():
    old = {"scheduler": "scheduler", "latent_shape": [1, 4, 8, 8], "scaling_factor": 0.18215, "max_length": 16,
           "guidance": "cfg", "default_steps": 50, "tokenizer": "tokenizer"}
    s = artifact.Sampler.from_dict(old)
    assert not s.sdxl and s.tokenizer_2 is None and s.time_ids is None and not s.zero_negative
    assert s.to_dict() == old  # an SD 1.x/2.x sampler writes exactly what it wrote before
    xl = dataclasses.replace(s, tokenizer_2="tokenizer_2", time_ids=(64, 64, 0, 0, 64, 64), zero_negative=True)
    assert artifact.Sampler.from_dict(json.loads(json.dumps(xl.to_dict()))) == xl
    with pytest.raises(artifact.ManifestError, match="time_ids must hold 6 numbers"):
        dataclasses.replace(s, time_ids=(64, 64))


def test_sampler_follows_force_zeros_for_empty_prompt(sdxl, tmp_path):
    import shutil

    from pocketfusion.checkpoint import load_model, sampler_of

    other = tmp_path / "m"
    shutil.copytree(sdxl, other)
    index = json.loads((other / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True
    (other / "model_index.json").write_text(json.dumps(dict(index, force_zeros_for_empty_prompt=False)))
    assert not sampler_of(load_model(other)).zero_negative


@pytest.mark.parametrize("target", TARGETS)
def test_parity_is_recorded_per_component(exports, target):
    m = artifact.load_manifest(exports(target))
    figures = m.metrics["components"]
    for name in ("text_encoder", "text_encoder_2", "unet", "vae_decoder"):
        p = figures[f"{target}/{name}"]["parity"]
        assert p["status"] == "pass" and p["rel_max"] < p["tolerance"], (name, p)
        print(f"{target}/{name}: rel_max {p['rel_max']:.2e} ({p['feeds']} feeds), export {figures[f'{target}/{name}']['export_seconds']} s")
    assert figures[f"{target}/unet"]["parity"]["feeds"] == 4  # real CFG inputs (with text_embeds, time_ids) of a sampling run
    outputs = figures[f"{target}/text_encoder_2"]["parity"]["outputs"]  # each of its two outputs on its own
    assert set(outputs) == {"penultimate_hidden_state", "text_embeds"}
    assert all(o["rel_max"] < 1e-4 for o in outputs.values()), outputs


def test_text_encoders_give_diffusers_prompt_embeddings(exports, sdxl):
    """The exported encoders, combined as the runtime pipeline does, give encode_prompt's embeddings."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from pocketfusion.runtimes.pipeline import RuntimePipeline

    rt = RuntimePipeline(exports("onnx"), "onnx")
    cond, uncond = rt._encode(PROMPT), rt._negative()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl), local_files_only=True)
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=True)
    np.testing.assert_allclose(cond["encoder_hidden_states"], pe.numpy(), atol=1e-5)
    np.testing.assert_allclose(cond["text_embeds"], pooled.numpy(), atol=1e-5)
    assert not npe.any() and not npooled.any()  # force_zeros_for_empty_prompt
    assert not uncond["encoder_hidden_states"].any() and not uncond["text_embeds"].any()


@pytest.mark.parametrize("target", TARGETS)
def test_runtime_image_matches_diffusers(exports, target, reference):
    from pocketfusion.metrics import psnr
    from pocketfusion.runtimes.pipeline import RuntimePipeline

    img = RuntimePipeline(exports(target), RUNTIME[target])(PROMPT, steps=STEPS, guidance=GUIDANCE, seed=SEED)
    assert img.shape == reference.shape == (64, 64, 3)
    print(f"{target}: image PSNR vs diffusers {psnr(img, reference):.2f} dB")
    assert psnr(img, reference) >= PSNR_MIN, psnr(img, reference)


def test_empty_prompt_negative_when_not_forced_to_zeros(exports, sdxl):
    """force_zeros_for_empty_prompt=False: the unconditional half is the empty prompt's encoding, as in diffusers."""
    from pocketfusion.metrics import psnr
    from pocketfusion.runtimes.pipeline import RuntimePipeline

    rt = RuntimePipeline(exports("onnx"), "onnx")
    rt.sampler = dataclasses.replace(rt.sampler, zero_negative=False)
    img = rt(PROMPT, steps=STEPS, guidance=GUIDANCE, seed=SEED)
    ref = _diffusers_image(sdxl, PROMPT, force_zeros=False)
    assert psnr(img, ref) >= PSNR_MIN
    assert psnr(img, _diffusers_image(sdxl, PROMPT)) < psnr(img, ref)  # the negative mode changes the image


@pytest.mark.slow
def test_coreml_converts_every_sdxl_component(sdxl, tmp_path):
    """Core ML (about 80 s here): all four components convert and validate statically; parity needs macOS."""
    pytest.importorskip("coremltools")
    from pocketfusion.checkpoint import load_model
    from pocketfusion.export.api import export
    from pocketfusion.export.base import ExportConfig

    m = export(load_model(sdxl), ExportConfig(targets=("coreml",)), tmp_path / "exp", progress=False)
    figures = m.metrics["components"]
    for name in ("text_encoder", "text_encoder_2", "unet", "vae_decoder"):
        e = figures[f"coreml/{name}"]
        assert e["io_check"] == "ok", (name, e)
        assert e["parity"]["status"] == ("pass" if sys.platform == "darwin" else "not run"), (name, e["parity"])
    assert [o.name for o in m.component("text_encoder_2", "coreml").outputs] == ["penultimate_hidden_state", "text_embeds"]


def test_cli_export_generate_bench(sdxl, tmp_path, capsys):
    """``pocketfusion export`` (default components), ``generate --runtime`` and ``bench`` on an SDXL export."""
    from pocketfusion.cli import main

    pytest.importorskip("onnxruntime")
    out = tmp_path / "e"
    assert main(["export", str(sdxl), "--target", "onnx", "-o", str(out)]) == 0, capsys.readouterr().err
    m = artifact.load_manifest(out)
    assert {"onnx/text_encoder", "onnx/text_encoder_2", "onnx/unet", "onnx/vae_decoder"} <= set(m.metrics["components"])
    png = tmp_path / "x.png"
    assert main(["generate", str(out), "--runtime", "onnx", "--prompt", PROMPT, "--steps", "2", "-o", str(png)]) == 0
    assert png.is_file()
    res = tmp_path / "bench.json"
    assert main(["bench", str(out), "--runs", "1", "--warmup", "0", "--steps", "2", "--threads", "1", "--json", str(res)]) == 0
    rows = {r["component"] for r in json.loads(res.read_text())["results"]}
    assert rows == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "end_to_end"}
