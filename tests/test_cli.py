import json
import subprocess
import sys

import pytest
from PIL import Image

from pocketfusion.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "pocketfusion", *args], capture_output=True, text=True)


def test_help_does_not_import_torch():
    code = "import sys; from pocketfusion.cli import build_parser; build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    r = _run("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "info" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("info", "/nonexistent"), "error: model folder /nonexistent does not exist"),
        (("generate", "--prompt", "x", "-o", "out.jpg"), "error: output out.jpg must end in .png"),
        (("frobnicate",), "error: argument COMMAND: invalid choice"),
        (("generate", "-o", "x.png"), "error: the following arguments are required: --prompt"),
        (("eval", "--steps", "0"), "error: --steps must be in 1..1000, got 0"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pocketfusion", *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [("compress", "--quant", "w8", "--device", "cuda", "-o", "out"),
                                  ("calibrate", "--device", "cuda", "-o", "out"),
                                  ("distill", "--steps", "4", "--device", "cuda", "-o", "out"),
                                  ("decoder", "--device", "cuda", "-o", "out"),
                                  ("prune", "--runtime", "onnxruntime", "--train-device", "cuda", "-o", "out")])
def test_device_cuda_without_a_gpu_is_one_line_exit_2(args, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device")
    r = subprocess.run([sys.executable, "-m", "pocketfusion", *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda but torch ") and "sees no CUDA device" in lines[0], r.stderr
    assert r.stdout == "" and list(tmp_path.iterdir()) == []


def test_corrupt_model_is_exit_2(tiny_sd, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_sd, bad)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 10)
    r = _run("info", str(bad))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_generate_grid_and_determinism(tiny_sd, tmp_path):
    out = tmp_path / "g.png"
    argv = ["generate", str(tiny_sd), "--prompt", "a small red circle on a blue background, center",
            "--prompt", "a large white square on a black background, top left", "--steps", "2", "--seed", "7", "-o", str(out)]
    assert main(argv) == 0
    img = Image.open(out)
    assert img.size == (2 * 64 + 2, 64)
    first = out.read_bytes()
    assert main(argv) == 0
    assert out.read_bytes() == first  # same seed, same pixels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]  # no temp files left


def test_info_json(tiny_sd, capsys):
    assert main(["info", str(tiny_sd), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    unet = info["components"]["unet"]
    assert unet["parameters"] == 139940 and unet["dtype"] == "float32"
    assert unet["call_inputs"]["arg0"] == [1, 4, 8, 8]
    assert unet["macs"]["attention"] > 0 and unet["macs"]["total"] > unet["macs"]["attention"]
    assert set(info["components"]) == {"text_encoder", "unet", "vae_decoder"}


def test_generate_needs_pipeline(tiny_sd, tmp_path, capsys):
    assert main(["generate", str(tiny_sd / "unet"), "--prompt", "x", "-o", str(tmp_path / "x.png")]) == 2
    assert "needs a full pipeline" in capsys.readouterr().err


def test_python_m_is_the_console_script():
    import shutil

    script = shutil.which("pocketfusion", path=str(__import__("pathlib").Path(sys.executable).parent))
    a = _run("--version")
    assert a.returncode == 0 and a.stdout.startswith("pocketfusion ")
    if script:
        b = subprocess.run([script, "--version"], capture_output=True, text=True)
        assert (b.returncode, b.stdout) == (a.returncode, a.stdout)


@pytest.mark.parametrize("sig, code, word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_kill_and_ctrl_c_leave_nothing_behind(tmp_path, sig, code, word):
    """A stage stopped by SIGTERM (kill, job schedulers) or Ctrl-C removes its staging directory,
    leaves no output, prints one line and exits non-zero."""
    import os
    import signal
    import time

    out = tmp_path / "cal"
    proc = subprocess.Popen([sys.executable, "-m", "pocketfusion", "run", "--target", "", "--quant", "none",
                             "--bench-runs", "0", "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a background CI job inherits SIGINT ignored; Ctrl-C reaches a foreground process
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not any(p.name.endswith(".partial") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1].startswith(f"error: {word}"), err
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_export_cli_with_default_flags(tiny_sd, tmp_path, capsys):
    """``pocketfusion export MODEL --target onnx -o DIR`` with every other flag at its default."""
    from pocketfusion import artifact

    out = tmp_path / "e"
    assert main(["export", str(tiny_sd), "--target", "onnx", "-o", str(out)]) == 0, capsys.readouterr().err
    m = artifact.load_manifest(out)
    assert {"onnx/unet", "onnx/text_encoder", "onnx/vae_decoder"} <= set(m.metrics["components"])
    assert m.settings["executorch_activations"] == "grid"
