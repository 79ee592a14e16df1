"""``--scheduler NAME`` on generate, eval and calibrate: the PyTorch path (a diffusers scheduler built from the
model's config) and the runtime path (``runtimes.schedulers``) sample alike; an unknown name is one line, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from pocketfusion.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")
PROMPT = "a large red circle on a blue background, center"


@pytest.mark.parametrize("command", ["generate", "eval", "calibrate"])
def test_unknown_scheduler_is_one_line_exit_2(command, tmp_path):
    extra = ["--prompt", "x", "-o", "x.png"] if command == "generate" else ["-o", "out"] if command == "calibrate" else []
    r = subprocess.run([sys.executable, "-m", "pocketfusion", command, "--scheduler", "heun", *extra],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: argument --scheduler: invalid choice: 'heun'"), r.stderr
    assert "dpmpp-2m-karras" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_unknown_scheduler_in_the_library_is_a_user_error():
    from pocketfusion.errors import UserError
    from pocketfusion.generate import GenerateConfig

    with pytest.raises(UserError, match="unknown scheduler 'heun'; available: ddim, pndm"):
        GenerateConfig(scheduler="heun")


def test_generate_euler_on_the_demo_model(tmp_path):
    out, ddim = tmp_path / "euler.png", tmp_path / "ddim.png"
    assert main(["generate", "--prompt", PROMPT, "--steps", "4", "--scheduler", "euler", "-o", str(out)]) == 0
    assert main(["generate", "--prompt", PROMPT, "--steps", "4", "-o", str(ddim)]) == 0
    assert Image.open(out).size == Image.open(ddim).size
    assert out.read_bytes() != ddim.read_bytes()  # another sampler, another image


def test_with_scheduler_keeps_the_model_and_its_config():
    from pocketfusion.checkpoint import load_model
    from pocketfusion.generate import with_scheduler

    model = load_model(None)
    own = model.components["scheduler"]
    swapped = with_scheduler(model, "dpmpp-2m-karras")
    s = swapped.components["scheduler"]
    assert type(s).__name__ == "DPMSolverMultistepScheduler" and s.config.use_karras_sigmas
    assert s.config.prediction_type == own.config.prediction_type and s.config.beta_end == own.config.beta_end
    assert model.components["scheduler"] is own and with_scheduler(model, None) is model


@pytest.mark.parametrize("name", ["pndm", "euler", "euler-ancestral", "dpmpp-2m", "dpmpp-2m-karras"])
def test_runtime_pipeline_matches_pytorch_per_scheduler(name, tiny_onnx_export, tiny_sd):
    """The runtime pipeline over the ONNX export and diffusers' pipeline sample alike with each scheduler
    (init_noise_sigma, scale_model_input and the ancestral noise included)."""
    from pocketfusion.checkpoint import load_model
    from pocketfusion.generate import GenerateConfig, generate_images
    from pocketfusion.metrics import psnr
    from pocketfusion.runtimes.pipeline import RuntimePipeline

    cfg = GenerateConfig(steps=5, guidance=4.0, seed=3, scheduler=name)
    img = RuntimePipeline(tiny_onnx_export, "onnx", scheduler=name)(PROMPT, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed)
    ref, _ = generate_images(load_model(tiny_sd), [PROMPT], cfg)
    assert psnr(img, ref[0]) >= 35.0
