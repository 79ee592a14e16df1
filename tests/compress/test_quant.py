"""compress.quant: the algorithms keep the grid convention, calibration beats RTN, decisions are measured,
and quantize(model, QuantConfig, out) writes a typed artifact the next stage reads."""

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")

from pocketfusion.compress.quant import QuantConfig, quantize, quantize_unet  # noqa: E402
from pocketfusion.compress.quant import grid as G  # noqa: E402
from pocketfusion.compress.quant.feeds import stack_feeds, unet_outputs  # noqa: E402
from pocketfusion.errors import UserError  # noqa: E402
from pocketfusion.metrics import output_error  # noqa: E402
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
        # scales every target stores exactly: fp16 (ONNX, Core ML), group scales bf16 too (XNNPACK qb4w)
        assert torch.equal(g.scale.half().float(), g.scale), name
        assert g.group_size is None or torch.equal(g.scale.bfloat16().float(), g.scale), name
        assert G.scale_is_storable(g.scale, g.group_size) and bool((g.scale > 0).all()), name


def test_storable_scale_edges():
    """Rounded to fp16 (groups: then bf16); tiny scales stay > 0; float32 and fp16 abs-max observers
    (Core ML at fp16 quantizes fp16 weights) both give the scale back."""
    torch.manual_seed(0)
    s = torch.cat([torch.tensor([1e-9, 3e-8, 7.3e-6, 3.3e5]), torch.rand(20000) * 0.05 + 1e-4])
    for gs in (None, 32):
        for bits in (4, 8):
            r = G.storable_scale(s, bits, gs)
            assert bool((r > 0).all()) and torch.equal(r.half().float(), r) and G.scale_is_storable(r, gs)
            assert gs is None or torch.equal(r.bfloat16().float(), r)
            m = G.qmax(bits)
            assert torch.equal((r * m) / m, r)  # float32 observer
            fits = r * m <= 65504  # the weight itself is finite in fp16
            assert torch.equal(G.observed_fp16(r, bits)[fits], r[fits])  # fp16 observer
            assert float(r[0]) == G.FP16_TINY and float(r[3]) == G.FP16_BF16_MAX
            # normal fp16 range: within 1.5 ulps (rounding, plus the fp16 observer's one-ulp move)
            rel = ((r[4:] - s[4:]) / s[4:]).abs().max()
            assert rel <= (3 * 2.0 ** -8 + 2.0 ** -11 if gs else 3 * 2.0 ** -11), (gs, bits, float(rel))
    assert not G.scale_is_storable(torch.tensor([0.1]), None) and not G.scale_is_storable(torch.tensor([1.2345e-3]), 32)


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
    from pocketfusion.suite import suite_for

    model = load_model()
    return model, C.capture(model, suite_for(model).calibration_prompts(6), steps=10, n_timesteps=5, progress=False)


@pytest.mark.parametrize("scheme,method", [("w8", "rtn"), ("w8", "gptq"), ("w4", "rtn"), ("w4", "gptq"), ("w8a8", "gptq")])
def test_grid_convention_after_every_method(scheme, method, caplog):
    unet = tiny_unet("sd21")
    feeds = random_feeds(unet, 4)
    with caplog.at_level("WARNING", logger="pocketfusion.compress.quant"):
        qgrid = quantize_unet(unet, feeds, QuantConfig(scheme=scheme, method=method, group_size=8, sensitivity_feeds=2), progress=False)
    assert "needed snapping" not in caplog.text  # GPTQ keeps ±qmax in every group itself (error compensated)
    assert set(qgrid.layers) == set(G.quantizable_layers(unet))
    assert_on_grid(unet, qgrid)
    weights = {f"{n}.weight" for n in qgrid.layers}
    others = {n: p.detach() for n, p in unet.named_parameters() if n not in weights}
    on_fp16 = {n for n, p in others.items() if torch.equal(p.half().float(), p)}
    if scheme == "w4":
        assert any(g.group_size == 8 for g in qgrid.layers.values())  # group-wise layers exercised
        # W4: biases and norms on fp16 values (a target stores them at half the bytes and computes the same)
        assert G.floats_are_fp16(qgrid) and on_fp16 == set(others)
    else:
        assert not G.floats_are_fp16(qgrid) and on_fp16 != set(others)
    if scheme == "w8a8":
        acts = qgrid.activations["layers"]
        assert set(acts) == set(qgrid.layers) and all(a["bits"] in (8, 16) and len(a["range"]) == 2 for a in acts.values())


def test_gptq_beats_rtn_on_heldout_feeds(demo_calib):
    import copy

    model, cset = demo_calib
    held = stack_feeds(cset.unet_feeds("heldout"))
    ref = unet_outputs(model.unet, held)
    rtn = copy.deepcopy(model.unet)
    G.rtn_grid(rtn, 4)
    gptq = copy.deepcopy(model.unet)
    qgrid = quantize_unet(gptq, cset.unet_feeds("calib"), QuantConfig(scheme="w4", mixed_threshold=None), progress=False)
    assert_on_grid(gptq, qgrid)
    e_rtn = output_error(ref, unet_outputs(rtn, held))
    e_gptq = output_error(ref, unet_outputs(gptq, held))
    assert e_gptq["snr_db"] > e_rtn["snr_db"] + 2.0, (e_gptq, e_rtn)


def test_quant_config_validates_and_round_trips(tmp_path):
    cfg = QuantConfig(scheme="w4", calib=tmp_path / "p.txt", clip_grid=[1.0, 0.9])
    assert cfg.calib == str(tmp_path / "p.txt") and cfg.clip_grid == (1.0, 0.9)
    d = cfg.to_dict()
    assert d["version"] == 1 and d["clip_grid"] == [1.0, 0.9] and "rel" not in d
    assert json.loads(json.dumps(d)) == d
    assert QuantConfig.from_dict(d) == cfg
    assert QuantConfig.from_dict({**d, "calibration_feeds": 12}) == cfg  # a manifest's extra settings are ignored
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.scheme = "w8"
    for kw, needle in [({"scheme": "w3"}, "unknown quantization scheme 'w3'"),
                       ({"scheme": "w8", "method": "awq"}, "unknown quantization method"),
                       ({"scheme": "w4", "group_size": 1}, "--group-size must be >= 2"),
                       ({"scheme": "w8", "n_prompts": 1}, "--num-prompts must be >= 2"),
                       ({"scheme": "w4", "size_budget": 0}, "size_budget"), ({"scheme": "w4", "clip_grid": ()}, "clip_grid"),
                       ({"scheme": "w8", "chunks": 0}, "chunks must be >= 1"), ({"scheme": "w8", "image_prompts": -1}, "image_prompts")]:
        with pytest.raises(UserError, match=needle):
            QuantConfig(**kw)
    with pytest.raises(UserError, match="version 2"):
        QuantConfig.from_dict({**d, "version": 2})


def test_quantize_round_trip_on_demo(tmp_path):
    """The one end-to-end test: demo model -> w4 artifact with measured mixed precision -> load (grid through
    the typed manifest), generate; export measures it against fp32 with the same figure."""
    from pocketfusion import artifact
    from pocketfusion import calibration as C
    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.quant import load_grid, summary
    from pocketfusion.generate import GenerateConfig, generate_images

    out = tmp_path / "w4"
    man = quantize(load_model(), QuantConfig(scheme="w4", n_prompts=4), out, progress=False)
    text = summary(man)
    assert "SNR" in text and "of fp32" in text
    model = load_model(out)
    assert model.quantized
    grid = load_grid(model)
    assert grid.scheme == "w4" and grid.method == "gptq"
    assert_on_grid(model.unet, grid)
    m = artifact.load_manifest(out)
    assert m.stage == "compress" and m.source.path and m.settings["scheme"] == "w4" and m.settings["version"] == 1
    assert QuantConfig.from_dict(m.settings) == QuantConfig(scheme="w4", n_prompts=4)
    assert sorted(c.name for c in m.components) == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert m.component("unet").grid == artifact.GridRef("unet", "w4", "gptq") and m.component("vae").grid is None
    assert m.component("text_encoder").format == "transformers" and m.component("tokenizer").format == "tokenizer"
    assert m.calibration.path == "calibration" and m.calibration.sha256 == artifact.content_hash(out / "calibration")
    assert m.sampler is not None and m.sampler.guidance == "cfg" and m.sampler.scheduler == "scheduler"
    met = m.metrics
    assert met["unet_bytes"]["ratio_fp16_scales"] <= 0.14
    assert met["layers"]["int4"] > met["layers"]["int8"] > 0
    err = met["unet_heldout_error"]
    assert err["gptq"]["rel_rms"] < err["rtn"]["rel_rms"] and "rtn_all_4bit" in err
    assert "rel" not in _keys(met)  # the one vocabulary: rel_rms, never a bare "rel"
    assert {"gptq", "rtn"} <= set(met["image_psnr_vs_fp32"])
    kept = met["layers_8bit_by_sensitivity"]
    for name, g in grid.layers.items():  # every decision carries its measured figure
        assert "4-bit costs" in g.reason and "x the median" in g.reason, g.reason
        assert (g.bits == 8) == (name in kept) == ("kept at 8 bits" in g.reason)
    meta = json.loads((out / "unet" / G.GRID_JSON).read_text())
    assert meta["settings"]["mixed_precision"]["kept_8bit"] == kept
    assert C.load(out / "calibration").unet_feeds("calib")
    with pytest.raises(UserError, match="already quantized"):
        quantize(model, QuantConfig(scheme="w8"), tmp_path / "again", progress=False)
    images, _ = generate_images(model, ["a large red circle on a blue background, center"], GenerateConfig(steps=4))
    assert images[0].shape == (64, 64, 3)
    _export_versus_fp32(model, tmp_path / "exp", err["gptq"])


def _keys(d) -> set:
    if isinstance(d, dict):
        return set(d) | set().union(*(_keys(v) for v in d.values()))
    return set().union(*(_keys(v) for v in d)) if isinstance(d, list) else set()


def _export_versus_fp32(model, out, err):
    """Export measures the artifact against the fp32 U-Net on the held-out feeds (found through the manifest)."""
    pytest.importorskip("onnxruntime")
    from pocketfusion import artifact
    from pocketfusion.export.api import export
    from pocketfusion.export.base import ExportConfig

    export(model, ExportConfig(targets=("onnx",), components=("unet",)), out, progress=False)
    v = artifact.load_manifest(out).metrics["components"]["onnx/unet"]["versus_fp32"]
    assert v["heldout_feeds"] > 0
    assert abs(v["snr_db"] - err["snr_db"]) < 0.5, (v, err)
    assert 0.1 < v["size_ratio_to_fp32_weights"] < 0.25 and v["latency_ms_median"] > 0


def test_load_grid_reads_the_manifest_and_checks_the_weights(tmp_path):
    """load_grid finds a grid only through the typed manifest, and refuses weights off their grid."""
    from pocketfusion import artifact
    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.quant import load_grid

    unet = tiny_unet("sd15")
    grid = G.rtn_grid(unet, 8)
    out = tmp_path / "bare"
    unet.save_pretrained(str(out), safe_serialization=True)
    grid.save(out, unet)
    assert load_grid(load_model(out)) is None  # a grid file without a manifest naming it is not found
    artifact.write_manifest(out, stage="compress", settings={}, source=None,
                            components=[artifact.Component("unet", ".", "diffusers", grid=artifact.GridRef(".", "w8", "rtn"))])
    model = load_model(out)
    assert model.quantized and set(load_grid(model).layers) == set(grid.layers)
    assert load_grid(model, "vae") is None
    with torch.no_grad():
        next(iter(G.quantizable_layers(model.unet).values())).weight.add_(1e-3)
    with pytest.raises(UserError, match="not on their quantization grid"):
        load_grid(model)


def test_quantize_bad_input_writes_nothing(tmp_path):
    from pocketfusion.checkpoint import load_model

    out = tmp_path / "o"
    with pytest.raises(UserError, match="does not exist"):
        quantize(load_model(), QuantConfig(scheme="w8", calib="/nonexistent/prompts.txt"), out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bare_unet_needs_its_calibration_set(tiny_sd, tmp_path):
    from pocketfusion import artifact
    from pocketfusion import calibration as C
    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.quant import load_grid

    bare = load_model(tiny_sd / "unet")
    with pytest.raises(UserError, match="bare U-Net"):
        quantize(bare, QuantConfig(scheme="w8"), tmp_path / "a", progress=False)
    # a set made for another model is refused, the set made for it is used
    other = tmp_path / "other"
    save_tiny_pipeline(other, "sd15", seed=1)
    C.save(C.capture(load_model(other), ["a red circle", "a blue square"], steps=2, n_timesteps=2, progress=False), tmp_path / "cal_other")
    with pytest.raises(UserError, match="another"):
        quantize(bare, QuantConfig(scheme="w8", calib=str(tmp_path / "cal_other")), tmp_path / "b", progress=False)
    C.save(C.capture(load_model(tiny_sd), ["a red circle", "a blue square"], steps=2, n_timesteps=2, progress=False), tmp_path / "cal")
    quantize(bare, QuantConfig(scheme="w8", calib=str(tmp_path / "cal")), tmp_path / "c", progress=False)
    model = load_model(tmp_path / "c")
    assert model.kind == "component" and load_grid(model).scheme == "w8"
    m = artifact.load_manifest(tmp_path / "c")
    assert [(c.name, c.path, c.grid.path) for c in m.components] == [("unet", ".", ".")]
    assert m.sampler is None and m.calibration.path == "calibration" and (tmp_path / "c" / "calibration").is_dir()


@pytest.mark.parametrize("family", FAMILIES)
def test_architecture_fixtures_quantize(family):
    unet = tiny_unet(family)
    qgrid = quantize_unet(unet, random_feeds(unet, 3), QuantConfig(scheme="w4", group_size=8, mixed_threshold=None), progress=False)
    assert_on_grid(unet, qgrid)
    assert {g.bits for g in qgrid.layers.values()} == {4}


PIPELINE_FAMILIES = [f if f == "sd21" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES if f != "sdxl"]


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_tiny_pipeline_quantize(family, tmp_path):
    """quantize() on each family's tiny pipeline (save_tiny_pipeline has no SDXL): a loadable quantized folder."""
    from pocketfusion import calibration as C
    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.quant import load_grid

    src = tmp_path / "src"
    save_tiny_pipeline(src, family)
    model = load_model(src)
    C.save(C.capture(model, ["a red circle", "a blue square", "a green triangle"], steps=4, n_timesteps=2, progress=False),
           tmp_path / "cal")
    cfg = QuantConfig(scheme="w4", calib=str(tmp_path / "cal"), group_size=8, image_prompts=1, image_steps=2, sensitivity_feeds=4)
    quantize(model, cfg, tmp_path / "q", progress=False)
    model = load_model(tmp_path / "q")
    assert_on_grid(model.unet, load_grid(model))
