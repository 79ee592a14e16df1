"""compress --quant: the algorithms keep the grid convention, calibration beats RTN, decisions are measured."""

import json

import pytest

torch = pytest.importorskip("torch")

from pocketfusion.compress import grid as G  # noqa: E402
from pocketfusion.compress import quant as Q  # noqa: E402
from pocketfusion.testing.fixtures import FAMILIES, example_inputs, save_tiny_pipeline, tiny_unet  # noqa: E402


def assert_on_grid(unet, qgrid):
    """An independent abs-max observer (max|w| / qmax in float32) gives back every scale and integer."""
    mods = dict(unet.named_modules())
    ints = qgrid.integers(unet)  # raises when a weight is off its grid
    for name, g in qgrid.layers.items():
        w = mods[name].weight.detach().float()
        o = w.shape[0]
        if g.group_size is None:
            amax = w.reshape(o, -1).abs().amax(dim=1)
        else:
            amax = w.reshape(o, w.shape[1] // g.group_size, -1).abs().amax(dim=2)
        nz = amax > 0
        observed = amax / G.qmax(g.bits)
        assert torch.equal(observed[nz], g.scale[nz]), name
        q = torch.round(w / g.expand(torch.where(nz, observed, g.scale))).to(torch.int8)
        assert torch.equal(q, ints[name]), name
        assert int(q.abs().max()) <= G.qmax(g.bits)


def run_cli(argv):
    from pocketfusion.cli import main

    try:
        return main(argv)
    except SystemExit as e:  # argparse usage errors
        return e.code


def random_feeds(unet, n, seed=0):
    feeds = []
    for i in range(n):
        (sample, t, ctx), kw = example_inputs(unet, batch=2, seed=seed + i)
        f = {"sample": sample.numpy(), "timestep": t.float().numpy() * (i + 1) / n * 1.9, "encoder_hidden_states": ctx.numpy()}
        for k, v in kw.get("added_cond_kwargs", {}).items():
            f[k] = v.numpy()
        feeds.append(f)
    return feeds


@pytest.fixture(scope="module")
def demo_calib():
    from pocketfusion import calibration as C
    from pocketfusion.checkpoint import load_model

    model = load_model()
    return model, C.capture(model, C.demo_prompts(6), steps=10, n_timesteps=5, progress=False)


@pytest.mark.parametrize("scheme,method", [("w8", "rtn"), ("w8", "gptq"), ("w4", "rtn"), ("w4", "gptq"), ("w8a8", "gptq")])
def test_grid_convention_after_every_method(scheme, method, caplog):
    unet = tiny_unet("sd21")
    feeds = random_feeds(unet, 4)
    with caplog.at_level("WARNING", logger="pocketfusion.compress.quant"):
        qgrid = Q.quantize_unet(unet, feeds, scheme=scheme, method=method, group_size=8, progress=False, sensitivity_feeds=2)
    assert "needed snapping" not in caplog.text  # GPTQ keeps ±qmax in every group itself (error compensated)
    assert set(qgrid.layers) == set(G.quantizable_layers(unet))
    assert_on_grid(unet, qgrid)
    if scheme == "w4":
        assert any(g.group_size == 8 for g in qgrid.layers.values())  # group-wise layers exercised
    if scheme == "w8a8":
        acts = qgrid.activations["layers"]
        assert set(acts) == set(qgrid.layers) and all(a["bits"] in (8, 16) and len(a["range"]) == 2 for a in acts.values())


def test_gptq_beats_rtn_on_heldout_feeds(demo_calib):
    import copy

    model, cset = demo_calib
    held = Q.stack_feeds(cset.unet_feeds("heldout"))
    ref = Q.unet_outputs(model.unet, held)
    rtn = copy.deepcopy(model.unet)
    G.rtn_grid(rtn, 4)
    gptq = copy.deepcopy(model.unet)
    qgrid = Q.quantize_unet(gptq, cset.unet_feeds("calib"), scheme="w4", mixed_threshold=None, progress=False)
    assert_on_grid(gptq, qgrid)
    e_rtn = Q.output_error(ref, Q.unet_outputs(rtn, held))
    e_gptq = Q.output_error(ref, Q.unet_outputs(gptq, held))
    assert e_gptq["snr_db"] > e_rtn["snr_db"] + 2.0, (e_gptq, e_rtn)


def test_compress_cli_round_trip_on_demo(tmp_path, capsys):
    """The one end-to-end test: demo model -> w4 folder with measured mixed precision -> load, generate."""
    from pocketfusion import artifact
    from pocketfusion.checkpoint import load_model
    from pocketfusion.cli import main
    from pocketfusion.generate import GenerateConfig, generate_images

    out = tmp_path / "w4"
    assert main(["compress", "--quant", "w4", "--num-prompts", "4", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SNR" in printed and "of fp32" in printed
    model = load_model(out)
    assert model.quant is not None and model.quant.scheme == "w4" and model.quant.method == "gptq"
    assert_on_grid(model.unet, model.quant)
    m = artifact.load_manifest(out)
    assert m.stage == "compress" and m.source["path"]
    met = m.metrics
    assert met["unet_bytes"]["ratio_fp16_scales"] <= 0.14
    assert met["layers"]["int4"] > met["layers"]["int8"] > 0
    err = met["unet_heldout_error"]
    assert err["gptq"]["rel"] < err["rtn"]["rel"] and "rtn_all_4bit" in err
    assert {"gptq", "rtn"} <= set(met["image_psnr_vs_fp32"])
    kept = met["layers_8bit_by_sensitivity"]
    for name, g in model.quant.layers.items():  # every decision carries its measured figure
        assert "4-bit costs" in g.reason and "x the median" in g.reason, g.reason
        assert (g.bits == 8) == (name in kept) == ("kept at 8 bits" in g.reason)
    meta = json.loads((out / "unet" / G.GRID_JSON).read_text())
    assert meta["settings"]["mixed_precision"]["kept_8bit"] == kept
    from pocketfusion import calibration as C

    assert C.load(out / "calibration").unet_feeds("calib")
    # export measures the artifact against the fp32 U-Net on the held-out feeds, through onnxruntime
    exp = tmp_path / "exp"
    assert main(["export", str(out), "--target", "onnx", "--components", "unet", "-o", str(exp)]) == 0
    assert "vs fp32" in capsys.readouterr().out
    v = artifact.load_manifest(exp).metrics["components"]["onnx/unet"]["versus_fp32"]
    assert v["heldout_feeds"] > 0
    assert abs(v["snr_db"] - err["gptq"]["snr_db"]) < 0.5, (v, err["gptq"])
    assert 0.1 < v["size_ratio_to_fp32_weights"] < 0.25 and v["latency_ms_median"] > 0
    images, _ = generate_images(model, ["a large red circle on a blue background, center"], GenerateConfig(steps=4))
    assert images[0].shape == (64, 64, 3)


@pytest.mark.parametrize("argv,needle", [
    (["--quant", "w3"], "invalid choice"),
    (["--quant", "w8", "--method", "awq"], "invalid choice"),
    (["--quant", "w8", "--calib", "/nonexistent/prompts.txt"], "does not exist"),
])
def test_compress_bad_input_exit_2(tmp_path, capsys, argv, needle):
    out = tmp_path / "o"
    assert run_cli(["compress", *argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_bare_unet_needs_its_calibration_set(tiny_sd, tmp_path, capsys):
    from pocketfusion import calibration as C
    from pocketfusion.checkpoint import load_model
    from pocketfusion.cli import main

    bare = tiny_sd / "unet"
    assert main(["compress", str(bare), "--quant", "w8", "-o", str(tmp_path / "a")]) == 2
    assert "bare U-Net" in capsys.readouterr().err
    # a set made for another model is refused, the set made for it is used
    other = tmp_path / "other"
    save_tiny_pipeline(other, "sd15", seed=1)
    C.save(C.capture(load_model(other), ["a red circle", "a blue square"], steps=2, n_timesteps=2, progress=False), tmp_path / "cal_other")
    assert main(["compress", str(bare), "--quant", "w8", "--calib", str(tmp_path / "cal_other"), "-o", str(tmp_path / "b")]) == 2
    assert "another" in capsys.readouterr().err
    C.save(C.capture(load_model(tiny_sd), ["a red circle", "a blue square"], steps=2, n_timesteps=2, progress=False), tmp_path / "cal")
    assert main(["compress", str(bare), "--quant", "w8", "--calib", str(tmp_path / "cal"), "-o", str(tmp_path / "c")]) == 0
    model = load_model(tmp_path / "c")
    assert model.kind == "component" and model.quant.scheme == "w8"
    assert (tmp_path / "c" / "calibration").is_dir()


@pytest.mark.parametrize("family", FAMILIES)
def test_architecture_fixtures_quantize(family):
    unet = tiny_unet(family)
    qgrid = Q.quantize_unet(unet, random_feeds(unet, 3), scheme="w4", group_size=8, mixed_threshold=None, progress=False)
    assert_on_grid(unet, qgrid)
    assert {g.bits for g in qgrid.layers.values()} == {4}


PIPELINE_FAMILIES = [f if f == "sd21" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES if f != "sdxl"]


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_tiny_pipeline_compress(family, tmp_path):
    """compress() on each family's tiny pipeline (save_tiny_pipeline has no SDXL): a loadable quantized folder."""
    from pocketfusion import calibration as C
    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.api import compress

    src = tmp_path / "src"
    save_tiny_pipeline(src, family)
    model = load_model(src)
    C.save(C.capture(model, ["a red circle", "a blue square", "a green triangle"], steps=4, n_timesteps=2, progress=False),
           tmp_path / "cal")
    compress(model, tmp_path / "q", scheme="w4", calib=tmp_path / "cal", group_size=8, progress=False, image_prompts=1,
             image_steps=2, sensitivity_feeds=4)
    model = load_model(tmp_path / "q")
    assert_on_grid(model.unet, model.quant)
