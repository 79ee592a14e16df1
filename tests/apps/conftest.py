"""Fixtures of the native-runner tests: a mini pipeline small enough that its ExecuTorch export takes seconds, not
minutes, on a shared 2-core machine (a 1-stage U-Net without mid-block, a 2-block VAE: 8x8 latents, 16x16 images), exported once
per session as a classifier-free-guided teacher and as a guidance-embedded LCM student; and the pf-run bundle,
built once per session (skipped, with the reason, where CMake >= 3.28 or a C++ compiler is missing)."""

from __future__ import annotations

import pytest


def save_mini_pipeline(out, *, student: bool = False, seed: int = 0) -> None:
    """A StableDiffusionPipeline folder with random weights and the demo grammar's tokenizer; ``student``: a U-Net
    that takes the guidance scale (``time_cond_proj_dim``) and an LCM scheduler, as a distilled student."""
    import shutil
    from pathlib import Path

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pocketfusion.demo import configs
    from pocketfusion.demo.tokenizer import write_tokenizer

    out = Path(out)
    write_tokenizer(out / "_tok")
    tok = CLIPTokenizer.from_pretrained(str(out / "_tok"))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        block_out_channels=(8,), layers_per_block=1, mid_block_type=None, attention_head_dim=2, cross_attention_dim=16,
        norm_num_groups=4, time_cond_proj_dim=8 if student else None,
    ).eval()
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )).eval()
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16).eval()
    sched = (LCMScheduler if student else DDIMScheduler)(**configs.SCHEDULER)
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(str(out), safe_serialization=True)
    shutil.rmtree(out / "_tok")


def _export(tmp_path_factory, name: str, student: bool):
    pytest.importorskip("executorch")
    import torch

    from pocketfusion.checkpoint import load_model
    from pocketfusion.export.api import export
    from pocketfusion.export.base import ExportConfig

    root = tmp_path_factory.mktemp(name)
    save_mini_pipeline(root / "model", student=student)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = ExportConfig(targets=("executorch",), executorch_profile_runs=0)
        export(load_model(root / "model"), cfg, root / "export", progress=False)
    finally:
        torch.set_num_threads(before)
    return root / "export"


@pytest.fixture(scope="session")
def mini_et_export(tmp_path_factory):
    """The mini CFG pipeline exported to ExecuTorch (text encoder, U-Net at batch 2, VAE decoder)."""
    return _export(tmp_path_factory, "mini-cfg", student=False)


@pytest.fixture(scope="session")
def mini_student_et_export(tmp_path_factory):
    """The mini guidance-embedded student (U-Net at batch 1 with a guidance input, LCM) exported to ExecuTorch."""
    return _export(tmp_path_factory, "mini-student", student=True)


def _bundle(tmp_path_factory, arch: str):
    from pocketfusion import app_build
    from pocketfusion.errors import UserError

    try:
        app_build.find_cmake()
        app_build.find_compiler(arch)
        if arch == "aarch64" and app_build.host_arch() != "aarch64" and app_build.find_qemu() is None:
            pytest.skip("no qemu-aarch64 (apt-get install qemu-user-static)")
        et = app_build.installed_executorch() if arch == app_build.host_arch() else app_build.aarch64_executorch()
    except UserError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp(f"bundle-{arch}") / "pf"
    app_build.build_native(out, arch=arch, executorch=et if arch != app_build.host_arch() else None, jobs=1)
    return out


@pytest.fixture(scope="session")
def native_bundle(tmp_path_factory):
    """``pocketfusion app build native`` for this host, once per session."""
    from pocketfusion import app_build

    return _bundle(tmp_path_factory, app_build.host_arch())


@pytest.fixture(scope="session")
def aarch64_bundle(tmp_path_factory):
    """The aarch64 bundle (cross-compiled), with the command prefix that runs it here (qemu-user)."""
    from pocketfusion import app_build

    out = _bundle(tmp_path_factory, "aarch64")
    prefix = [str(out / "bin" / "pf-run")] if app_build.host_arch() == "aarch64" else app_build.qemu_command(out)
    return out, prefix


def _export_onnx(tmp_path_factory, name: str, student: bool):
    pytest.importorskip("onnxruntime")
    import torch

    from pocketfusion.checkpoint import load_model
    from pocketfusion.export.api import export
    from pocketfusion.export.base import ExportConfig

    root = tmp_path_factory.mktemp(name)
    save_mini_pipeline(root / "model", student=student)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        export(load_model(root / "model"), ExportConfig(targets=("onnx",)), root / "export", progress=False)
    finally:
        torch.set_num_threads(before)
    return root / "export"


@pytest.fixture(scope="session")
def mini_onnx_export(tmp_path_factory):
    """The mini CFG pipeline exported to ONNX (the web page's target)."""
    return _export_onnx(tmp_path_factory, "mini-cfg-onnx", student=False)


@pytest.fixture(scope="session")
def mini_student_onnx_export(tmp_path_factory):
    """The mini guidance-embedded LCM student exported to ONNX."""
    return _export_onnx(tmp_path_factory, "mini-student-onnx", student=True)
