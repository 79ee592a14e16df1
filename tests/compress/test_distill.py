"""The distill stage on the tiny fixtures, a few iterations each: both methods, epsilon and v teachers, the
artifact (diffusers loads and samples it; pocketfusion reads its embedded guidance), resume after an
interruption, the student's starting point, the config's validation and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pocketfusion.compress.distill import DistillConfig, distill, work_dir
from pocketfusion.errors import UserError

# tiny and fast: 8 teacher samples of 10 steps, a 16-wide guidance embedding
FAST = dict(n_pairs=8, teacher_steps=10, teacher_batch=8, batch_size=4, w_embedding_dim=16, iterations=3)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


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
    return {"v": _tiny(root, "sd15", "v_prediction"), "eps": _tiny(root, "sd15", "epsilon"), "sd21": _tiny(root, "sd21", "v_prediction"),
            "bk": _tiny(root, "bk-sdm-small", "epsilon")}


@pytest.mark.parametrize("source,method,steps", [("v", "lcm", 4), ("eps", "regression", 1), ("sd21", "lcm", 2), ("v", "regression", 2),
                                                 ("bk", "regression", 4)])
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
    if source in ("sd21", "bk"):  # every family's student exports: batch 1, the guidance input, parity
        from pocketfusion.export.api import export
        from pocketfusion.export.base import ExportConfig

        ex = export(model, ExportConfig(targets=("onnx",), components=("unet",)), tmp_path / "export")
        assert ex.metrics["components"]["onnx/unet"]["parity"]["rel_max"] < 1e-4
        assert [(s.name, s.shape[0]) for s in ex.component("unet", "onnx").inputs][-1] == ("guidance", 1)


def test_resume_after_interruption_matches_an_uninterrupted_run(sources, tmp_path, monkeypatch):
    import torch

    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.distill import methods

    model = load_model(sources["v"])
    base = dict(FAST, iterations=4, checkpoint_every=2, method="lcm")
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


def test_teacher_trajectory_states_are_the_ddim_states_nearest_the_student_timesteps(sources):
    """Multistep regression learns from points of the teacher's own trajectory: each kept state is the
    guided DDIM sample as it enters the teacher timestep nearest the student's."""
    import torch
    from diffusers import DDIMScheduler

    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.distill.stage import trajectory_timesteps
    from pocketfusion.compress.distill.teacher import Conditioning, sample

    assert trajectory_timesteps(DistillConfig(steps=4, method="regression", teacher_steps=10)) == (799, 499, 299)
    assert trajectory_timesteps(DistillConfig(steps=1, method="regression")) == ()
    assert trajectory_timesteps(DistillConfig(steps=4, method="lcm")) == ()
    model = load_model(sources["eps"])
    unet = model.unet.eval()
    c = unet.config
    noise = torch.randn((3, c.in_channels, c.sample_size, c.sample_size), generator=torch.Generator().manual_seed(0))
    cond = torch.randn((3, 16, c.cross_attention_dim), generator=torch.Generator().manual_seed(1))
    uncond = torch.zeros((1, 16, c.cross_attention_dim))
    g = torch.tensor([2.0, 4.0, 6.0])
    final, states = sample(model, unet, noise, Conditioning(cond), Conditioning(uncond), g, 10, device=torch.device("cpu"),
                           record=(799, 499, 299), progress=False)
    assert states.shape == (3, 3, *noise.shape[1:])
    sched = DDIMScheduler.from_config(model.components["scheduler"].config)
    sched.set_timesteps(10)
    x, seen = noise, {}
    with torch.no_grad():
        for t in sched.timesteps:
            seen[int(t)] = x
            e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.expand_as(cond), cond])).sample.chunk(2)
            x = sched.step(e_u + g.reshape(-1, 1, 1, 1) * (e_c - e_u), t, x).prev_sample
    torch.testing.assert_close(final, x)
    for k, t in enumerate((801, 501, 301)):  # DDIM's 10 timesteps are 901, 801, ..., 1
        torch.testing.assert_close(states[:, k], seen[t])
    assert sample(model, unet, noise, Conditioning(cond), Conditioning(uncond), g, 10, device=torch.device("cpu"),
                  progress=False)[1] is None


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


def test_student_calibrates_on_its_own_sampler_then_quantizes_and_exports(sources, tmp_path):
    """distill -> quantize: the calibration set records the student's own calls (its LCM steps, batch 1, the
    guidance input); GPTQ runs on them; the quantized student exports at batch 1 with the guidance input."""
    import numpy as np
    import torch

    from pocketfusion.calibration import capture
    from pocketfusion.checkpoint import find_source, load_model
    from pocketfusion.compress.quant import QuantConfig, quantize
    from pocketfusion.export.api import export
    from pocketfusion.export.base import ExportConfig
    from pocketfusion.guidance import guidance_embedding

    distill(load_model(sources["eps"]), DistillConfig(steps=2, method="regression", **FAST), tmp_path / "s", progress=False)
    student = load_model(tmp_path / "s")
    assert find_source(student) == sources["eps"].resolve()
    from pocketfusion.generate import GenerateConfig
    from pocketfusion.run import _pytorch_against_teacher, _teacher

    teacher = _teacher(student)
    assert Path(teacher.path).resolve() == sources["eps"].resolve()
    vs = _pytorch_against_teacher(student, teacher, GenerateConfig(steps=2), "a large red circle on a blue background, center",
                                  rounds=1)
    assert vs["teacher_steps"] == 50 and vs["student_steps"] == 2 and vs["speedup"] > 1  # 2 batch-1 calls vs 50 CFG pairs
    prompts = ["a large red circle on a blue background, center", "a small blue square on a white background, top left",
               "a large green triangle on a black background, bottom right"]
    cset = capture(student, prompts, guidance=5.0, progress=False)
    assert cset.embedded and cset.settings["steps"] == 2 and cset.settings["guidance_input"] == "embedded"
    assert cset.settings["timesteps"] == [999.0, 499.0]  # LCM's timesteps for 2 of the teacher's 10 steps
    feeds = cset.unet_feeds("all")
    assert len(feeds) == 6 and feeds[0]["sample"].shape[0] == 1 and feeds[0]["guidance"].tolist() == [5.0]
    unet = student.unet.eval()
    with torch.no_grad():
        f = {k: torch.from_numpy(v) for k, v in feeds[1].items()}
        out = unet(f["sample"], f["timestep"], f["encoder_hidden_states"],
                   timestep_cond=guidance_embedding(f["guidance"], unet.config.time_cond_proj_dim)).sample
    np.testing.assert_allclose(out.numpy(), cset.unet_outputs("all")[1]["noise_pred"], rtol=0, atol=1e-5)

    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    man = quantize(student, QuantConfig(scheme="w8", calib=str(tmp_path / "p.txt"), image_prompts=1, sensitivity_feeds=2),
                   tmp_path / "q", progress=False)
    assert man.sampler.guidance == "embedded" and man.settings["calibration"]["steps"] == 2
    assert man.metrics["image_psnr_vs_fp32"]["steps"] == 2
    assert man.metrics["unet_heldout_error"]["gptq"]["snr_db"] > 20
    ex = export(load_model(tmp_path / "q"), ExportConfig(targets=("onnx",), components=("unet",)), tmp_path / "e")
    (key, e), = ex.metrics["components"].items()
    assert key == "onnx/unet" and e["parity"]["rel_max"] < 1e-3 and e["versus_fp32"]["snr_db"] > 20
    assert [s.name for s in ex.component("unet", "onnx").inputs][-1] == "guidance"


@pytest.mark.parametrize("method", ["lcm", "regression"])
def test_sdxl_student_takes_the_added_conditions(tmp_path, method):
    """SDXL: the teacher's CFG pairs and the student carry the pooled text embedding and time ids; diffusers'
    StableDiffusionXLPipeline samples the student at batch 1; calibration records its calls; it exports with parity."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    from pocketfusion.calibration import capture
    from pocketfusion.checkpoint import load_model, sampler_of
    from pocketfusion.export.api import export
    from pocketfusion.export.base import ExportConfig

    src = _tiny(tmp_path, "sdxl", "epsilon")
    man = distill(load_model(src), DistillConfig(steps=2, method=method, **FAST), tmp_path / "s", progress=False)
    assert np.isfinite(man.metrics["training"]["final_loss"])
    student = load_model(tmp_path / "s")
    assert student.class_name == "StableDiffusionXLPipeline" and sampler_of(student).guidance == "embedded"
    assert {"text_encoder_2", "tokenizer_2"} <= set(student.components)

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "s"))
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_hook(lambda m, a, kw, o: calls.append((a[0].shape[0], kw.get("timestep_cond") is not None)),
                                    with_kwargs=True)
    img = pipe("a large red circle on a blue background, center", num_inference_steps=2, guidance_scale=4.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(img).all() and calls == [(1, True)] * 2

    cset = capture(student, ["a small blue square on a white background, top left"], progress=False)
    feeds = cset.unet_feeds()
    assert len(feeds) == 2 and list(feeds[0]) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "guidance"]
    assert all(v.shape[0] == 1 for v in feeds[0].values())
    ex = export(student, ExportConfig(targets=("onnx",), components=("unet",)), tmp_path / "e")
    assert ex.metrics["components"]["onnx/unet"]["parity"]["rel_max"] < 1e-4



def test_cli_compress_distills_then_quantizes(sources, tmp_path, capsys):
    """(prune ->) distill -> quantize in one command: the float student beside the output, the output its W8 version,
    calibrated on the student's own steps."""
    from pocketfusion import artifact
    from pocketfusion.cli import main

    out = tmp_path / "c"
    rc = main(["compress", str(sources["eps"]), "--distill-steps", "2", "--distill-method", "regression", "--distill-iterations", "2",
               "--distill-pairs", "4", "--distill-batch-size", "2", "--quant", "w8", "--num-prompts", "4", "-o", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "stage 1/2" in printed and "stage 2/2" in printed
    student, quant = artifact.load_manifest(tmp_path / "c-student"), artifact.load_manifest(out)
    assert student.stage == "distill" and student.sampler.default_steps == 2
    assert quant.source.sha256 == artifact.content_hash(tmp_path / "c-student") and quant.sampler.guidance == "embedded"
    assert quant.settings["calibration"]["steps"] == 2
