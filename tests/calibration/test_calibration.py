import json
import shutil

import numpy as np
import pytest
import torch

from pocketfusion import artifact
from pocketfusion.calibration import CalibrationConfig, calibrate, capture, heldout_count, load, resolve, save
from pocketfusion.checkpoint import build_pipeline, load_model
from pocketfusion.cli import main
from pocketfusion.errors import UserError
from pocketfusion.export.components import capture_golden, text_encoder_spec, unet_spec, vae_decoder_spec
from pocketfusion.suite import read_prompts

STEPS, K = 6, 4


@pytest.fixture(scope="module")
def demo():
    return load_model()


def demo_prompts(n, seed=0):
    """The demo suite's calibration draw (what the calibration stage uses for the demo model)."""
    from pocketfusion.demo.suite import demo_suite

    return demo_suite().calibration_prompts(n, seed)


@pytest.fixture(scope="module")
def cset(demo):
    return capture(demo, demo_prompts(5), steps=STEPS, n_timesteps=K, guidance=4.0, seed=3, progress=False)


@pytest.fixture(scope="module")
def saved(cset, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "set"
    save(cset, out)
    return out


def test_timesteps_cover_the_trajectory(cset, demo):
    sched = type(demo.components["scheduler"]).from_config(demo.components["scheduler"].config)
    sched.set_timesteps(STEPS)
    idx = cset.settings["step_indices"]
    assert idx[0] == 0 and idx[-1] == STEPS - 1 and len(idx) == K and idx == sorted(set(idx))
    assert cset.settings["timesteps"] == [float(sched.timesteps[i]) for i in idx]
    assert cset.settings["timesteps"][0] > 800 and cset.settings["timesteps"][-1] < 200
    t = cset.tensors["unet.timestep"]
    assert t.shape == (5 * K, 2) and t.dtype == np.float32
    np.testing.assert_array_equal(t[:, 0], np.tile(cset.settings["timesteps"], 5))
    np.testing.assert_array_equal(cset.tensors["unet.step_index"], np.tile(idx, 5))
    np.testing.assert_array_equal(cset.tensors["unet.prompt_index"], np.repeat(np.arange(5), K))
    assert cset.seeds == [3, 4, 5, 6, 7]


def test_shapes_and_cfg_pair(cset, demo):
    L, D = demo.components["tokenizer"].model_max_length, demo.components["unet"].config.cross_attention_dim
    T = cset.tensors
    assert T["unet.sample"].shape == (5 * K, 2, 4, 8, 8) and T["unet.sample"].dtype == np.float32
    assert T["unet.encoder_hidden_states"].shape == (5 * K, 2, L, D)
    assert T["text_encoder.input_ids"].shape == (5, 1, L) and T["text_encoder.input_ids"].dtype == np.int32
    assert T["vae_decoder.latent"].shape == (5, 1, 4, 8, 8)
    ctx = T["unet.encoder_hidden_states"]
    assert not np.allclose(ctx[:, 0], ctx[:, 1])  # cond vs uncond context
    np.testing.assert_array_equal(ctx[:, 1], np.broadcast_to(ctx[0, 1], ctx[:, 1].shape))  # one uncond ("")
    np.testing.assert_array_equal(T["unet.sample"][:, 0], T["unet.sample"][:, 1])  # same latent in both halves
    np.testing.assert_array_equal(T["unet.timestep"][:, 0], T["unet.timestep"][:, 1])
    assert len({T["unet.sample"][r, 0].tobytes() for r in range(5 * K)}) == 5 * K  # seeds and steps differ


def test_names_match_export_specs(cset, demo):
    c = demo.components
    u = unet_spec(c["unet"], seq_len=c["tokenizer"].model_max_length, golden=cset.unet_feeds())
    te = text_encoder_spec(c["text_encoder"], c["tokenizer"], cset.prompts)
    vd = vae_decoder_spec(c["vae"], [f["latent"] for f in cset.vae_decoder_feeds()])
    for spec, feeds in ((u, cset.unet_feeds()), (te, cset.text_encoder_feeds()), (vd, cset.vae_decoder_feeds())):
        for feed in feeds:
            assert list(feed) == [s.name for s in spec.inputs]
            assert all(feed[s.name].shape == s.shape and feed[s.name].dtype == np.dtype(s.dtype) for s in spec.inputs)
    for feed, g in zip(cset.text_encoder_feeds(), te.golden):  # same tokenization as export's
        np.testing.assert_array_equal(feed["input_ids"], g["input_ids"])


def test_feeds_reproduce_the_unet_and_the_trajectory(demo):
    c = demo.components
    prompt = "a small red circle on a blue background, top left"
    cs = capture(demo, [prompt], steps=5, n_timesteps=5, guidance=4.0, seed=11, progress=False)
    wrapper = unet_spec(c["unet"], seq_len=c["tokenizer"].model_max_length).module
    sched = type(c["scheduler"]).from_config(c["scheduler"].config)
    sched.set_timesteps(5)
    feeds, outs = cs.unet_feeds(), cs.unet_outputs()
    for k, (feed, out) in enumerate(zip(feeds, outs)):
        with torch.no_grad():
            eps = wrapper(*(torch.from_numpy(feed[n]) for n in cs.unet_input_names))
        np.testing.assert_allclose(eps.numpy(), out["noise_pred"], rtol=0, atol=1e-6)
        e_c, e_u = eps.chunk(2)
        lat = torch.from_numpy(feed["sample"][:1])  # DDIM: scale_model_input is the identity
        nxt = sched.step(e_u + 4.0 * (e_c - e_u), sched.timesteps[k], lat).prev_sample
        want = feeds[k + 1]["sample"][:1] if k + 1 < len(feeds) else cs.vae_decoder_feeds()[0]["latent"] * c["vae"].config.scaling_factor
        np.testing.assert_allclose(nxt.numpy(), want, rtol=0, atol=1e-5)
    # the same latents as diffusers' own pipeline at the same seed
    ref = build_pipeline(demo)(prompt, num_inference_steps=5, guidance_scale=4.0, generator=torch.Generator().manual_seed(11),
                               output_type="latent").images
    np.testing.assert_allclose(cs.vae_decoder_feeds()[0]["latent"] * c["vae"].config.scaling_factor, ref.numpy(), rtol=0, atol=1e-4)


def test_save_load_round_trip_bit_for_bit(cset, saved, demo):
    back = load(saved, model=demo)
    assert back.prompts == cset.prompts and back.seeds == cset.seeds and back.settings == cset.settings
    assert back.source == cset.source
    assert sorted(back.tensors) == sorted(cset.tensors)
    for k, v in cset.tensors.items():
        assert back.tensors[k].dtype == v.dtype and back.tensors[k].shape == v.shape and back.tensors[k].tobytes() == v.tobytes(), k
    m = artifact.load_manifest(saved)
    s = m.settings
    assert m.stage == "calibrate" and set(m.files) == {"calibration.safetensors"}
    assert s["prompts"] == cset.prompts and s["seeds"] == [3, 4, 5, 6, 7] and s["steps"] == STEPS and s["guidance"] == 4.0
    assert s["scheduler"]["class"] == "DDIMScheduler" and s["scheduler"]["config"]["prediction_type"] == "v_prediction"
    assert s["step_indices"] == cset.settings["step_indices"] and len(s["timesteps"]) == K
    assert m.schema_version == 2 and m.source.sha256 == artifact.content_hash(demo.path)
    assert m.metrics["heldout_prompt_indices"] == [4] and m.metrics["unet_pairs"] == 5 * K


def test_load_rejects_tampering_and_other_stages(saved, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    with open(bad / "calibration.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(UserError, match="checksum mismatch"):
        load(bad)
    other = tmp_path / "other"
    with artifact.staged_dir(other) as tmp:
        artifact.write_manifest(tmp, stage="export", settings={}, source=None)
    with pytest.raises(UserError, match="not a calibration set"):
        load(other)
    with pytest.raises(UserError, match="does not exist"):
        load(tmp_path / "missing")


def test_heldout_split_is_disjoint(cset):
    calib, held = cset.prompt_indices("calib"), cset.prompt_indices("heldout")
    assert calib == [0, 1, 2, 3] and held == [4] and not set(calib) & set(held)
    assert len(cset.unet_feeds("calib")) == 4 * K and len(cset.unet_feeds("heldout")) == K
    assert len(cset.unet_feeds()) == 5 * K and len(cset.vae_decoder_feeds("heldout")) == 1
    held_rows = {f["sample"].tobytes() for f in cset.unet_feeds("heldout")}
    assert not held_rows & {f["sample"].tobytes() for f in cset.unet_feeds("calib")}
    assert [heldout_count(n) for n in (1, 4, 5, 10, 13, 32)] == [1, 1, 1, 2, 3, 6]
    with pytest.raises(ValueError):
        cset.prompt_indices("train")


def test_load_with_another_model_is_rejected(saved, tiny_sd, tmp_path):
    from pocketfusion.testing.fixtures import save_tiny_pipeline

    tiny = load_model(tiny_sd)
    with pytest.raises(UserError, match="was made for another model") as e:
        load(saved, model=tiny)
    assert str(tiny_sd) in str(e.value) and "demo" in str(e.value) and "\n" not in str(e.value)
    # same architecture, other weights: caught by the content hash
    cs = capture(tiny, ["a small red circle on a blue background, center"], steps=2, n_timesteps=2, progress=False)
    save(cs, tmp_path / "tiny-set")
    load(tmp_path / "tiny-set", model=tiny)
    save_tiny_pipeline(tmp_path / "twin", "sd15", seed=1)
    with pytest.raises(UserError, match="was made for .* not .*twin"):
        load(tmp_path / "tiny-set", model=load_model(tmp_path / "twin"))


def test_read_prompts_and_suite_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n\n  second prompt  \nthird\n")
    assert read_prompts(f) == ["first prompt", "second prompt", "third"]
    assert read_prompts(f, 2) == ["first prompt", "second prompt"]
    with pytest.raises(UserError, match="holds 3 prompts, fewer than the 4"):
        read_prompts(f, 4)
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(UserError, match="holds no prompts"):
        read_prompts(tmp_path / "e.txt")
    with pytest.raises(UserError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")
    from pocketfusion.demo.scenes import split_scenes

    train, held = split_scenes()
    p = demo_prompts(40)
    assert p == demo_prompts(40) and len(set(p)) == 40 and p != demo_prompts(40, seed=1)
    assert set(p) <= {s.prompt for s in train} and not set(p) & {s.prompt for s in held}
    import random

    assert p == [s.prompt for s in random.Random(0).sample(train, 40)]  # the draw the calibration module always made
    with pytest.raises(UserError):
        demo_prompts(len(train) + 1)


def test_resolve(demo, tiny_sd, saved, tmp_path):
    tiny = load_model(tiny_sd)  # uses the demo tokenizer: built-in prompts fit
    cs = resolve(tiny, None, n_prompts=2, steps=2, n_timesteps=2, progress=False)
    assert cs.prompts == demo_prompts(2)
    f = tmp_path / "p.txt"
    f.write_text("a large red square on a blue background, center\n")
    assert resolve(tiny, str(f), steps=2, n_timesteps=2, progress=False).prompts == ["a large red square on a blue background, center"]
    assert resolve(demo, str(saved)).prompts == load(saved).prompts
    with pytest.raises(UserError, match="fewer than the 9"):
        resolve(demo, str(saved), n_prompts=9)
    other = tmp_path / "other-tok"
    shutil.copytree(tiny_sd, other)
    vocab_path = other / "tokenizer" / "vocab.json"
    vocab = json.loads(vocab_path.read_text())
    vocab["red</w>"], vocab["blue</w>"] = vocab["blue</w>"], vocab["red</w>"]
    vocab_path.write_text(json.dumps(vocab))
    with pytest.raises(UserError, match="--calib"):
        resolve(load_model(other), None, n_prompts=2)
    with pytest.raises(UserError, match="needs a full pipeline"):
        resolve(load_model(tiny_sd / "unet"), str(f))
    # any prompt suite can stand in for the built-in one
    from pocketfusion.suite import from_file

    two = ["a small red circle on a blue background, center", "a large white square on a black background, top left"]
    (tmp_path / "two.txt").write_text("\n".join(two) + "\n")
    cs = resolve(load_model(other), None, n_prompts=2, steps=2, n_timesteps=2, progress=False, suite=from_file(tmp_path / "two.txt"))
    assert sorted(cs.prompts) == sorted(two)


def test_calibrate_stage(tiny_sd, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a small red circle on a blue background, center\n")
    with pytest.raises(UserError, match="--timesteps must be in 1..2"):
        CalibrationConfig(steps=2, n_timesteps=3)
    with pytest.raises(UserError, match="--num-prompts must be >= 1"):
        CalibrationConfig(n_prompts=0)
    with pytest.raises(UserError, match="does not exist"):
        CalibrationConfig(prompts=str(tmp_path / "nope.txt")).check_prompt_file()
    tiny = load_model(tiny_sd)
    cs = calibrate(tiny, CalibrationConfig(prompts=f, steps=2, n_timesteps=2, seed=4), tmp_path / "a", progress=False)
    assert cs.prompts == ["a small red circle on a blue background, center"] and cs.seeds == [4]
    assert load(tmp_path / "a", model=tiny).prompts == cs.prompts
    cs = calibrate(tiny, CalibrationConfig(n_prompts=3, steps=2, n_timesteps=1), tmp_path / "b", progress=False)
    assert cs.prompts == demo_prompts(3)  # the demo tokenizer: the built-in suite fits
    m = artifact.load_manifest(tmp_path / "b")
    assert m.stage == "calibrate" and m.schema_version == 2 and m.source.path == str(tiny_sd.resolve())


def test_sdxl_unet_without_second_encoder_is_a_user_error(tiny_sd):
    from pocketfusion.testing.fixtures import tiny_unet

    m = load_model(tiny_sd)
    m.components["unet"] = tiny_unet("sdxl")
    with pytest.raises(UserError, match="text_encoder_2"):
        capture(m, ["x"], steps=2, n_timesteps=2, progress=False)


def _save_tiny_sdxl(out):
    from pocketfusion.testing.fixtures import save_tiny_pipeline

    save_tiny_pipeline(out, "sdxl")


def test_sdxl_pipeline_records_added_embeddings(tmp_path):
    _save_tiny_sdxl(tmp_path / "sdxl")
    m = load_model(tmp_path / "sdxl")
    cs = capture(m, ["a small red circle on a blue background, center", "a large white square on a black background, top left"],
                 steps=3, n_timesteps=2, progress=False)
    spec = unet_spec(m.components["unet"], seq_len=16, golden=cs.unet_feeds())
    for feed, out in zip(cs.unet_feeds(), cs.unet_outputs()):
        assert list(feed) == [s.name for s in spec.inputs] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
        assert all(feed[s.name].shape == s.shape for s in spec.inputs)
        np.testing.assert_array_equal(feed["time_ids"], [[64, 64, 0, 0, 64, 64]] * 2)
        assert not np.allclose(feed["text_embeds"][0], feed["text_embeds"][1])
        with torch.no_grad():
            eps = spec.module(*(torch.from_numpy(feed[s.name]) for s in spec.inputs))
        np.testing.assert_allclose(eps.numpy(), out["noise_pred"], rtol=0, atol=1e-6)
    save(cs, tmp_path / "set")
    back = load(tmp_path / "set", model=m)
    assert back.sdxl and back.settings["unet_inputs"][-2:] == ["text_embeds", "time_ids"]


def test_golden_capture_is_the_calibration_capture(demo):
    prompts = ["a large red circle on a blue background, center", "a small white square on a black background, top left"]
    g = capture_golden(demo, prompts, steps=8, n_unet=4)
    cs = capture(demo, prompts, steps=8, n_timesteps=4, progress=False)
    first = cs.unet_feeds()[:4]  # rows are ordered by prompt: the first prompt's 4 steps
    assert len(g["unet"]) == 4 and len(g["vae_decoder"]) == 2
    for a, b in zip(g["unet"], first):
        assert list(a) == ["sample", "timestep", "encoder_hidden_states"]
        assert all(np.array_equal(a[k], b[k]) for k in a)
    for a, b in zip(g["vae_decoder"], cs.vae_decoder_feeds()):
        np.testing.assert_array_equal(a, b["latent"])


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "two.txt").write_text("a red circle\na blue square\n")
    assert "holds no prompts" in _cli_error(capsys, ["calibrate", "--prompts", str(tmp_path / "empty.txt"), "-o", str(out)])
    two = str(tmp_path / "two.txt")
    assert "fewer than the 3" in _cli_error(capsys, ["calibrate", "--prompts", two, "--num-prompts", "3", "-o", str(out)])
    assert "does not exist" in _cli_error(capsys, ["calibrate", "--prompts", str(tmp_path / "nope.txt"), "-o", str(out)])
    argv = ["calibrate", "--num-prompts", "1", "--steps", "2", "--timesteps", "3", "-o", str(out)]
    assert "--timesteps must be in 1..2" in _cli_error(capsys, argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "two.txt"]  # nothing written, no temp dirs


def test_cli_calibrate(tiny_sd, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a small red circle on a blue background, center\n\na large white square on a black background, top left\n")
    out = tmp_path / "set"
    assert main(["calibrate", str(tiny_sd), "--prompts", str(f), "--steps", "3", "--timesteps", "2", "--seed", "5", "-o", str(out)]) == 0
    assert "2 prompts x 2 timesteps" in capsys.readouterr().out
    cs = load(out, model=load_model(tiny_sd))
    assert cs.seeds == [5, 6] and cs.settings["step_indices"] == [0, 2] and len(cs.unet_feeds()) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt", "set"]
