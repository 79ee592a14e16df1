"""The distill stage on the tiny fixtures, a few iterations each: both methods, epsilon and v teachers, the
artifact (diffusers loads and samples it; pocketfusion reads its embedded guidance), resume after an
interruption, the student's starting point, the config's validation and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from pocketfusion.compress.distill import DistillConfig, distill, work_dir
from pocketfusion.errors import UserError

# tiny and fast: 8 teacher samples of 10 steps, a 16-wide guidance embedding
FAST = dict(n_pairs=8, teacher_steps=10, teacher_batch=8, batch_size=4, w_embedding_dim=16, iterations=3)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on a shared 2-core machine, two spinning OpenMP threads make tiny calls 100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(root, family: str, prediction: str):
    from pocketfusion.testing.fixtures import save_tiny_pipeline

    path = root / f"{family}-{prediction}"
    save_tiny_pipeline(path, family)
    cfg_path = path / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, prediction_type=prediction)))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-src")
    return {"v": _tiny(root, "sd15", "v_prediction"), "eps": _tiny(root, "sd15", "epsilon"), "sd21": _tiny(root, "sd21", "epsilon")}


@pytest.mark.parametrize("source,method,steps", [("v", "lcm", 4), ("eps", "regression", 1), ("sd21", "lcm", 2), ("v", "regression", 2)])
def test_distill_writes_a_student_diffusers_samples(sources, tmp_path, source, method, steps):
    import numpy as np
    from diffusers import LatentConsistencyModelPipeline

    from pocketfusion.checkpoint import load_model, sampler_of
    from pocketfusion.generate import GenerateConfig, generate_images

    cfg = DistillConfig(steps=steps, method=method, checkpoint_every=2, gradient_checkpointing=source == "sd21", **FAST)
    out = tmp_path / "student"
    manifest = distill(load_model(sources[source]), cfg, out, progress=False)
    assert not work_dir(out, cfg).exists()  # checkpoints and cached teacher samples removed once written
    assert manifest.stage == "distill" and DistillConfig.from_dict(manifest.settings) == cfg
    assert manifest.source is not None and manifest.sampler.guidance == "embedded" and manifest.sampler.default_steps == steps
    t = manifest.metrics["training"]
    assert t["iterations"] == 3 and t["device"] == "cpu" and np.isfinite(t["final_loss"]) and t["wall_s"] > 0
    assert {c.name for c in manifest.components} == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}

    model = load_model(out)  # verifies the manifest's checksums
    assert model.unet.config.time_cond_proj_dim == 16
    assert type(model.components["scheduler"]).__name__ == "LCMScheduler"
    s = sampler_of(model)
    assert s.guidance == "embedded" and s.unet_batch == 1 and s.default_steps == steps

    pipe = LatentConsistencyModelPipeline.from_pretrained(str(out), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    img = pipe("a large red circle on a blue background, center", num_inference_steps=steps, guidance_scale=4.0,
               output_type="np", generator=__import__("torch").Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    assert calls == [1] * steps  # one batch-1 U-Net call per step: the guidance is embedded, no CFG pair
    images, _ = generate_images(model, ["a small blue square on a white background, top left"], GenerateConfig(steps=steps))
    assert images[0].shape == (64, 64, 3)  # pocketfusion's own generate (StableDiffusionPipeline embeds the guidance itself)


def test_resume_after_interruption_matches_an_uninterrupted_run(sources, tmp_path, monkeypatch):
    import torch

    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.distill import methods

    model = load_model(sources["v"])
    base = dict(FAST, iterations=4, checkpoint_every=2)
    ref = distill(model, DistillConfig(**base), tmp_path / "ref", progress=False)

    real = methods.lcm_loss

    def interrupted(*a, **k):
        fn = real(*a, **k)

        def loss_fn(batch, ctx):
            if ctx.iteration == 3:
                raise KeyboardInterrupt
            return fn(batch, ctx)

        return loss_fn

    out = tmp_path / "student"
    monkeypatch.setattr(methods, "lcm_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill(model, DistillConfig(**base), out, progress=False)
    monkeypatch.setattr(methods, "lcm_loss", real)
    assert not out.exists()  # nothing finished-looking left behind
    work = work_dir(out, DistillConfig(**base))
    assert (work / "checkpoints" / "iter-00000002").is_dir() and (work / "pairs.safetensors").is_file()

    with pytest.raises(UserError, match=r"settings changed \(steps: 4 -> 2\)"):
        distill(model, DistillConfig(**dict(base, steps=2), resume=True), out, progress=False)
    resumed = distill(model, DistillConfig(**base, resume=True), out, progress=False)
    t = resumed.metrics["training"]
    assert t["resumed_from"] == 2 and t["teacher_pairs_cached"] and t["iterations"] == 4
    assert t["teacher_sampling_s"] > 0  # the cached set's recorded cost, not the cache read
    assert t["final_loss"] == ref.metrics["training"]["final_loss"]
    a, b = load_model(tmp_path / "ref").unet.state_dict(), load_model(out).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not work.exists()


def test_student_starts_as_the_teachers_conditional_branch_and_embeds_guidance_like_diffusers():
    import torch
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    from pocketfusion.compress.distill.student import guidance_embedding, lcm_timesteps, make_student
    from pocketfusion.testing.fixtures import example_inputs, tiny_unet

    teacher = tiny_unet("sd21")
    student = make_student(teacher, 32).eval()
    (x, t, ctx), _ = example_inputs(teacher, batch=2)
    g = torch.tensor([1.0, 7.5])
    emb = guidance_embedding(g, 32)
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, g - 1, embedding_dim=32)
    assert torch.equal(emb, ref)
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, ctx, timestep_cond=emb).sample, teacher(x, t, ctx).sample, rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="already takes a guidance input"):
        make_student(student, 32)
    for original in (10, 50):
        for steps in (1, 2, 4):
            sched = LCMScheduler(original_inference_steps=original)
            sched.set_timesteps(steps)
            assert lcm_timesteps(steps, original) == sched.timesteps.tolist()


@pytest.mark.parametrize("bad,match", [
    (dict(steps=3), "steps=3"), (dict(method="progressive"), "method='progressive'"), (dict(iterations=0), "iterations=0"),
    (dict(guidance_range=(6.0, 2.0)), "guidance_range"), (dict(guidance_range=(0.5, 2.0)), "guidance_range"),
    (dict(guidance_range="x"), "guidance_range"), (dict(w_embedding_dim=15), "w_embedding_dim"), (dict(ema_decay=1.0), "ema_decay"),
    (dict(device="tpu"), "device='tpu'"),
    (dict(precision="fp16"), "needs device='cuda'"), (dict(lr=0), "lr=0"), (dict(teacher_steps=1), "teacher_steps"),
])
def test_bad_configs_raise_one_line(bad, match):
    with pytest.raises(UserError, match=match) as e:
        DistillConfig(**bad)
    assert "\n" not in str(e.value)


def test_config_round_trip_and_unknown_keys():
    cfg = DistillConfig(steps=1, method="regression", guidance_range=[3, 5], prompts="p.txt")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert DistillConfig.from_dict(d) == cfg and cfg.guidance_range == (3.0, 5.0)
    with pytest.raises(UserError, match="unknown keys"):
        DistillConfig.from_dict({**d, "extra": 1})


def test_bad_inputs_raise_user_errors(sources, tmp_path):
    from pocketfusion.checkpoint import load_model

    model = load_model(sources["v"])
    with pytest.raises(UserError, match="source model folder"):
        distill(model, DistillConfig(**FAST), sources["v"], progress=False)
    shutil.copytree(sources["v"] / "unet", tmp_path / "bare")
    with pytest.raises(UserError, match="bare UNet2DConditionModel"):
        distill(load_model(tmp_path / "bare"), DistillConfig(**FAST), tmp_path / "o", progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(UserError, match="holds no prompts"):
        distill(model, DistillConfig(**FAST, prompts=str(empty)), tmp_path / "o", progress=False)
    with pytest.raises(UserError, match="is not a file"):
        DistillConfig(prompts=str(tmp_path / "missing.txt")).check_prompt_file()


def test_cli_distill(sources, tmp_path, capsys):
    from pocketfusion.checkpoint import load_model, sampler_of
    from pocketfusion.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle on a white background, center\na large blue square on a black background, top left\n")
    out = tmp_path / "s1"
    rc = main(["distill", str(sources["eps"]), "--steps", "1", "--method", "regression", "--prompts", str(prompts),
               "--iterations", "2", "--batch-size", "2", "--pairs", "4", "--teacher-steps", "5", "--guidance-range", "3", "5",
               "-o", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and f"wrote {out}/" in printed and "teacher sampling of 4 pairs" in printed
    assert "2 iterations of batch 2 x 1 process(es)" in printed
    assert sampler_of(load_model(out)).default_steps == 1
    assert main(["distill", str(sources["eps"]), "--steps", "1", "--prompts", str(tmp_path / "nope.txt"), "-o", str(out)]) == 2
    assert "error: --prompts" in capsys.readouterr().err
    assert main(["distill", str(sources["eps"]), "--steps", "1", "--iterations", "0", "-o", str(out)]) == 2
    assert "iterations=0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["distill", "--steps", "3", "-o", str(out)])
    assert e.value.code == 2


@pytest.mark.slow
def test_two_processes_with_accelerate(sources, tmp_path):
    """``accelerate launch`` with 2 CPU processes (gloo): both train, rank 0 alone writes the artifact (about 50 s here)."""
    pytest.importorskip("accelerate")
    from pocketfusion.checkpoint import load_model

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle on a white background, center\na large blue square on a black background, top left\n")
    out = tmp_path / "mp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29641"]
    args = ["-m", "pocketfusion", "distill", str(sources["v"]), "--steps", "2", "--iterations", "4", "--batch-size", "2",
            "--pairs", "4", "--teacher-steps", "5", "--prompts", str(prompts), "--checkpoint-every", "2", "-o", str(out)]
    subprocess.run([*launch, *args], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    manifest = load_model(out).manifest
    assert manifest.metrics["training"]["processes"] == 2 and manifest.metrics["training"]["iterations"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mp", "prompts.txt"]  # no work dir or partial output left
