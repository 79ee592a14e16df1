import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # Workers share the cores: each gets one thread (two spinning thread pools per core make small calls many times
    # slower). OMP_NUM_THREADS reaches the CLI subprocesses the tests start; the worker's own torch is already imported
    # by a plugin by now, so it is told directly.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

# pytest-xdist (the default run: ``-n auto``, pyproject's addopts) sends each group below to one worker, whole: a test
# file, or the files that share a costly session fixture (each worker builds its own session fixtures: the mini
# ExecuTorch exports, the native bundle). Groups start longest first (measured on a 2-core host, serial run), so the
# last one to finish is a short one.
_XDIST_GROUPS = {"tests/apps/": "apps", "tests/benchmarks/test_unet_profile.py": "apps"}
_LONGEST_FIRST = ("apps", "tests/export/test_export_executorch.py", "tests/test_demo.py", "tests/export/test_quant_executorch.py",
                  "tests/compress/test_quant.py", "tests/benchmarks/test_bench_quant.py", "tests/test_run_paths.py",
                  "tests/export/test_export_tflite.py", "tests/export/test_quant_tflite.py", "tests/export/test_export_coreml.py")


def _group(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return next((g for prefix, g in _XDIST_GROUPS.items() if path.startswith(prefix)), path)


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # plain pytest: one process, nothing to schedule
    pass
else:
    class _GroupScheduling(LoadScopeScheduling):
        """xdist's scope scheduling with ``_group`` as the scope, in collection order (which puts the longest first).
        (xdist's own ``loadgroup`` does not group under pytest 9: it renames ``item._nodeid``, which pytest no longer
        reads.)"""

        def __init__(self, config, log=None):
            config.option.loadscopereorder = False
            super().__init__(config, log)

        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    def pytest_xdist_make_scheduler(config, log):
        return _GroupScheduling(config, log)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    rank = {g: i for i, g in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item.nodeid), len(rank)))  # stable: files keep their order otherwise
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A complete tiny SD-1.5-family diffusers folder with random weights (built once per run)."""
    from pocketfusion.testing.fixtures import save_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny") / "sd15"
    save_tiny_pipeline(path, "sd15")
    return path


@pytest.fixture(scope="session")
def tiny_onnx_export(tiny_sd, tmp_path_factory):
    """The tiny pipeline exported to ONNX (all three components), once per run."""
    pytest.importorskip("onnxruntime")
    from pocketfusion.checkpoint import load_model
    from pocketfusion.export.api import export
    from pocketfusion.export.base import ExportConfig

    out = tmp_path_factory.mktemp("onnx") / "exp"
    export(load_model(tiny_sd), ExportConfig(targets=("onnx",)), out, progress=False)
    return out


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("torch_one_thread")``): on a shared
    2-core machine, two spinning OpenMP threads make tiny calls up to 100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def _export_mini(tmp_path_factory, name: str, student: bool, target: str):
    """The mini pipeline (``save_mini_pipeline``) exported to ``target`` at one torch thread."""
    pytest.importorskip("executorch" if target == "executorch" else "onnxruntime")
    import torch

    from pocketfusion.checkpoint import load_model
    from pocketfusion.export.api import export
    from pocketfusion.export.base import ExportConfig

    root = tmp_path_factory.mktemp(name)
    save_mini_pipeline(root / "model", student=student)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = ExportConfig(targets=(target,), executorch_profile_runs=0)
        export(load_model(root / "model"), cfg, root / "export", progress=False)
    finally:
        torch.set_num_threads(before)
    return root / "export"


@pytest.fixture(scope="session")
def mini_et_export(tmp_path_factory):
    """The mini CFG pipeline exported to ExecuTorch (text encoder, U-Net at batch 2, VAE decoder)."""
    return _export_mini(tmp_path_factory, "mini-cfg", False, "executorch")


@pytest.fixture(scope="session")
def mini_student_et_export(tmp_path_factory):
    """The mini guidance-embedded student (U-Net at batch 1 with a guidance input, LCM) exported to ExecuTorch."""
    return _export_mini(tmp_path_factory, "mini-student", True, "executorch")


@pytest.fixture(scope="session")
def mini_onnx_export(tmp_path_factory):
    """The mini CFG pipeline exported to ONNX (the web page's target)."""
    return _export_mini(tmp_path_factory, "mini-cfg-onnx", False, "onnx")


@pytest.fixture(scope="session")
def mini_student_onnx_export(tmp_path_factory):
    """The mini guidance-embedded LCM student exported to ONNX."""
    return _export_mini(tmp_path_factory, "mini-student-onnx", True, "onnx")
