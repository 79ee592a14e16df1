"""pf-run (apps/native, ExecuTorch's C++ runtime) against the Python side on the mini exports (tests/apps/conftest.py):
tokens equal transformers' CLIPTokenizer, `check` passes on the golden sets, every scheduler's image matches the
runtime pipeline's (RuntimePipeline, same ExecuTorch programs) for the same noise, `bench` writes the
pocketfusion.bench schema. The bundle is built once per session (`pocketfusion app build native`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SCHEDULERS = ("ddim", "pndm", "euler", "euler-ancestral", "dpmpp-2m", "dpmpp-2m-karras", "lcm")
PROMPT = "a small red circle on a blue background, top left"


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)


def pf(bundle: Path) -> list:
    return [bundle / "bin" / "pf-run"]


def noise_for(pipe, steps: int, seed: int) -> np.ndarray:
    """What RuntimePipeline draws for ``seed``: the initial latents, then (stochastic schedulers) each step's noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(pipe.sampler.latent_shape), generator=g).numpy()
    extra = [torch.randn(x.shape, generator=g).numpy() for _ in range(steps - 1)] if pipe.scheduler.stochastic else []
    return np.stack([x, *extra])


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def generate(prefix: list, export: Path, out: Path, *args) -> np.ndarray:
    p = run([*prefix, "generate", export, "--prompt", PROMPT, "--threads", "1", "-o", out, *args])
    assert p.returncode == 0, p.stderr[-2000:]
    return read_png(out)


def test_version_and_usage(native_bundle):
    p = run([*pf(native_bundle), "version"])
    assert p.returncode == 0 and "executorch" in p.stdout and "XNNPACK" in p.stdout
    p = run([*pf(native_bundle), "generate"])
    assert p.returncode == 2 and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
    bundle = json.loads((native_bundle / "bundle.json").read_text())
    assert bundle["files"]["bin/pf-run"] > 0 and any(f.startswith("lib/libexecutorch") for f in bundle["files"])


def test_tokenizer_matches_transformers(native_bundle, mini_et_export):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(mini_et_export / "tokenizer"))
    prompts = [PROMPT, "A Large  WHITE triangle,on a green background!!", "", "circles' 3 big-red squares? (north) #1",
               "a small red circle on a blue background, top left and a large green square on a white background"]
    for prompt in prompts:
        want = tok([prompt], padding="max_length", max_length=16, truncation=True).input_ids[0]
        p = run([*pf(native_bundle), "tokenize", mini_et_export, "--prompt", prompt])
        assert p.returncode == 0, p.stderr
        assert [int(v) for v in p.stdout.split()] == want, prompt


def test_check_passes_on_the_golden_sets(native_bundle, mini_et_export, tmp_path):
    p = run([*pf(native_bundle), "check", mini_et_export, "--json", tmp_path / "check.json"])
    assert p.returncode == 0, p.stdout + p.stderr
    res = {r["component"]: r for r in json.loads((tmp_path / "check.json").read_text())["results"]}
    assert set(res) == {"text_encoder", "unet", "vae_decoder"}
    manifest = json.loads((mini_et_export / "manifest.json").read_text())
    for name, r in res.items():
        assert r["status"] == "pass" and r["rel_max"] < 1e-4 and r["feeds"] >= 2
        python = manifest["metrics"]["components"][f"executorch/{name}"]["parity"]["rel_max"]
        assert r["rel_max"] < 10 * python + 1e-6  # the same kernels as the Python runtime's parity check
    p = run([*pf(native_bundle), "check", mini_et_export, "--tolerance", "1e-30"])
    assert p.returncode == 1 and "FAIL" in p.stdout


def test_corrupt_export_is_one_error_line(native_bundle, mini_et_export, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(mini_et_export, bad)
    (bad / "executorch" / "unet.pte").write_bytes(b"not a program")
    p = run([*pf(native_bundle), "check", bad])
    assert p.returncode == 2 and ("checksum mismatch" in p.stderr or "bytes, manifest says" in p.stderr), p.stderr


@pytest.fixture(scope="module")
def cfg_pipes(mini_et_export):
    from pocketfusion.runtimes.pipeline import RuntimePipeline

    return {s: RuntimePipeline(mini_et_export, "executorch", threads=1, scheduler=s) for s in (None, *SCHEDULERS)}


@pytest.mark.parametrize("scheduler", [None, *SCHEDULERS])
def test_generate_matches_the_runtime_pipeline(native_bundle, mini_et_export, cfg_pipes, scheduler, tmp_path):
    """The same noise (passed as .npy) gives the same image (PSNR >= 35 dB); deterministic schedulers also from the
    seed alone (pf-run's generator is torch's)."""
    from pocketfusion.metrics import psnr

    pipe, steps, seed = cfg_pipes[scheduler], 6, 7
    ref = pipe(PROMPT, steps=steps, seed=seed, guidance=3.0)
    np.save(tmp_path / "noise.npy", noise_for(pipe, steps, seed))
    extra = ["--scheduler", scheduler] if scheduler else []
    got = generate(pf(native_bundle), mini_et_export, tmp_path / "a.png", "--steps", steps, "--guidance", 3.0,
                   "--noise", tmp_path / "noise.npy", *extra)
    assert got.shape == ref.shape and ref.std() > 1  # a real image, not a constant
    assert psnr(got, ref) >= 35, (scheduler, psnr(got, ref))
    seeded = generate(pf(native_bundle), mini_et_export, tmp_path / "b.png", "--steps", steps, "--guidance", 3.0, "--seed", seed, *extra)
    assert psnr(seeded, ref) >= 35, (scheduler, psnr(seeded, ref))


def test_generate_student_embedded_guidance(native_bundle, mini_student_et_export, tmp_path):
    """A guidance-embedded student (batch-1 U-Net with the scale as an input, its own LCM scheduler, default steps)."""
    from pocketfusion.metrics import psnr
    from pocketfusion.runtimes.pipeline import RuntimePipeline

    pipe = RuntimePipeline(mini_student_et_export, "executorch", threads=1)
    assert pipe.sampler.guidance == "embedded" and pipe.scheduler.name == "lcm"
    for guidance in (1.5, 6.0):
        ref = pipe(PROMPT, steps=4, seed=1, guidance=guidance)
        np.save(tmp_path / "noise.npy", noise_for(pipe, 4, 1))
        got = generate(pf(native_bundle), mini_student_et_export, tmp_path / "s.png", "--steps", 4, "--guidance", guidance,
                       "--noise", tmp_path / "noise.npy")
        assert psnr(got, ref) >= 35, (guidance, psnr(got, ref))


def test_bad_noise_and_scheduler_are_one_error_line(native_bundle, mini_et_export, tmp_path):
    np.save(tmp_path / "n.npy", np.zeros((3, 5), dtype=np.float32))
    for args in (["--noise", tmp_path / "n.npy"], ["--scheduler", "heun"], ["--steps", "0"]):
        p = run([*pf(native_bundle), "generate", mini_et_export, "--prompt", "x", "-o", tmp_path / "x.png", *args])
        assert p.returncode == 2 and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
        assert not (tmp_path / "x.png").exists()


def test_bench_writes_the_bench_schema(native_bundle, mini_et_export, tmp_path):
    from pocketfusion.runtimes.bench import SCHEMA, SCHEMA_VERSION

    out = tmp_path / "bench.json"
    p = run([*pf(native_bundle), "bench", mini_et_export, "--json", out, "--runs", 3, "--warmup", 1, "--threads", 1, "--steps", 2])
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["schema"] == SCHEMA and res["schema_version"] == SCHEMA_VERSION
    assert {"created", "host", "versions", "settings", "artifacts", "results", "notes"} <= set(res)
    assert res["artifacts"][0]["label"] == mini_et_export.name and len(res["artifacts"][0]["manifest_sha256"]) == 64
    by = {r["component"]: r for r in res["results"]}
    assert set(by) == {"text_encoder", "unet", "vae_decoder", "end_to_end"}
    for name, r in by.items():
        assert r["runtime"] == "executorch" and r["runner"] == "pf-run" and "C++" in r["device"]
        lat = r["latency_ms"]
        assert lat["min"] <= lat["median"] <= lat["p90"] <= lat["max"] and lat["runs"] == len(r["latencies_ms"])
        assert r["load_ms"] > 0 and r["peak_rss_mib"] > 0 and r["rss_growth_mib"] >= 0
        assert (r["size_bytes"] or 0) > 0 or name == "end_to_end"
    assert by["end_to_end"]["steps"] == 2 and by["end_to_end"]["guidance_mode"] == "cfg"


def test_app_build_without_cmake_is_one_error_line(monkeypatch, capsys, tmp_path):
    from pocketfusion import app_build
    from pocketfusion.cli import main

    monkeypatch.setattr(app_build, "CMAKE_MIN", (99, 0))
    assert main(["app", "build", "native", "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the native build needs CMake >= 99.0")
    monkeypatch.setattr(app_build, "CMAKE_MIN", (3, 0))
    monkeypatch.setitem(app_build.COMPILERS, "x86_64", ("no-such-compiler++",))
    monkeypatch.setitem(app_build.COMPILERS, "aarch64", ("no-such-compiler++",))
    assert main(["app", "build", "native", "--arch", "aarch64", "-o", str(tmp_path / "b")]) == 2
    assert "no C++ compiler for aarch64" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------ aarch64 under qemu-user


def test_aarch64_check_and_generate_under_qemu(aarch64_bundle, mini_et_export, cfg_pipes, tmp_path):
    """The cross-compiled bundle (the aarch64 wheel's libraries) under qemu-aarch64: golden parity, and the image of
    the host's Python pipeline for the same noise."""
    from pocketfusion.metrics import psnr

    bundle, prefix = aarch64_bundle
    assert (bundle / "bin" / "pf-run").read_bytes()[18] == 0xB7  # ELF e_machine: EM_AARCH64
    p = run([*prefix, "check", mini_et_export])
    assert p.returncode == 0, p.stdout + p.stderr
    pipe = cfg_pipes["dpmpp-2m"]
    ref = pipe(PROMPT, steps=4, seed=2)
    np.save(tmp_path / "noise.npy", noise_for(pipe, 4, 2))
    got = generate(prefix, mini_et_export, tmp_path / "q.png", "--steps", 4, "--scheduler", "dpmpp-2m", "--noise", tmp_path / "noise.npy")
    assert psnr(got, ref) >= 35, psnr(got, ref)


@pytest.mark.slow
def test_aarch64_demo_export_under_qemu(aarch64_bundle, tmp_path_factory):
    """The demo model's ExecuTorch export (exported here, ~2-4 min) checked and sampled under emulation (~1 min)."""
    from pocketfusion.checkpoint import load_model
    from pocketfusion.export.api import export
    from pocketfusion.export.base import ExportConfig
    from pocketfusion.metrics import psnr
    from pocketfusion.runtimes.pipeline import RuntimePipeline

    bundle, prefix = aarch64_bundle
    out = tmp_path_factory.mktemp("demo-et") / "export"
    export(load_model("demo"), ExportConfig(targets=("executorch",), executorch_profile_runs=0), out, progress=False)
    p = run([*prefix, "check", out])
    assert p.returncode == 0, p.stdout + p.stderr
    pipe = RuntimePipeline(out, "executorch", threads=1)
    ref = pipe(PROMPT, steps=8, seed=0)
    got = generate(prefix, out, tmp_path_factory.mktemp("demo-img") / "d.png", "--steps", 8, "--seed", 0)
    assert psnr(got, ref) >= 35


def test_generate_pndm_with_runge_kutta_start(native_bundle, mini_et_export, tmp_path):
    """A PNDMScheduler config without skip_prk_steps (the Runge-Kutta warm-up, reachable only from a model's own
    config): the export's scheduler replaced, its manifest entry re-hashed."""
    import shutil

    from pocketfusion import artifact
    from pocketfusion.metrics import psnr
    from pocketfusion.runtimes.pipeline import RuntimePipeline

    export = tmp_path / "prk"
    shutil.copytree(mini_et_export, export)
    cfg = export / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_class_name": "PNDMScheduler", "skip_prk_steps": False}))
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["files"]["scheduler/scheduler_config.json"] = {"size": cfg.stat().st_size, "sha256": artifact.sha256_file(cfg)}
    (export / "manifest.json").write_text(json.dumps(manifest))
    pipe = RuntimePipeline(export, "executorch", threads=1)
    assert pipe.scheduler.name == "pndm" and not pipe.scheduler.skip_prk
    ref = pipe(PROMPT, steps=5, seed=4)
    got = generate(pf(native_bundle), export, tmp_path / "p.png", "--steps", 5, "--seed", 4)
    assert psnr(got, ref) >= 35, psnr(got, ref)
