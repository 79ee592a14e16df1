"""compress.quant at full size: a plan said before the run (and a refusal over --max-minutes), each step's wall
time and peak RAM in the manifest, float32 Hessians and column blocks for wide layers, a projected W4 sensitivity that needs no U-Net
pass per layer, and calibration passes whose batch shrinks for a large U-Net."""

import json

import pytest

torch = pytest.importorskip("torch")

from test_quant import assert_on_grid, random_feeds  # noqa: E402

from pocketfusion.compress.quant import QuantConfig, quantize, quantize_unet  # noqa: E402
from pocketfusion.compress.quant import gptq as gptq_mod  # noqa: E402
from pocketfusion.compress.quant.feeds import batch_limit  # noqa: E402
from pocketfusion.errors import UserError  # noqa: E402
from pocketfusion.testing.fixtures import save_tiny_pipeline, tiny_unet  # noqa: E402


def test_float32_hessians_match_float64(monkeypatch):
    """The float32 path (SD-1.5's widest layers) gives the float64 path's integers on nearly every weight."""
    import copy

    unet = tiny_unet("sd15")
    feeds = random_feeds(unet, 4)
    cfg = QuantConfig(scheme="w8", group_size=8)
    a, b = copy.deepcopy(unet), copy.deepcopy(unet)
    ga = quantize_unet(a, feeds, cfg, progress=False)
    monkeypatch.setattr(gptq_mod, "FLOAT64_MAX_COLS", 0)
    assert gptq_mod.hessian_dtype(10) == torch.float32
    gb = quantize_unet(b, feeds, cfg, progress=False)
    assert_on_grid(b, gb)
    ia, ib = ga.integers(a), gb.integers(b)
    same = sum(int((ia[n] == ib[n]).sum()) for n in ia) / sum(ia[n].numel() for n in ia)
    assert same > 0.99, same


@pytest.mark.parametrize("mode", ["projected", "auto-projected", "auto-measured"])
def test_w4_sensitivity_modes(mode):
    unet = tiny_unet("sd15")
    feeds = random_feeds(unet, 4)
    kw = {"projected": {"sensitivity": "projected"}, "auto-projected": {"sensitivity_seconds": 0.0},
          "auto-measured": {"sensitivity_seconds": 1e6}}[mode]
    g = quantize_unet(unet, feeds, QuantConfig(scheme="w4", group_size=8, sensitivity_feeds=2, **kw), progress=False)
    assert_on_grid(unet, g)
    mixed = g.settings["mixed_precision"]
    want = "measured" if mode == "auto-measured" else "projected"
    assert mixed["sensitivity"] == want and mixed["sensitivity_reason"]
    assert all(c >= 0 for c in mixed["cost"].values()) and len(mixed["cost"]) == len(g.layers)
    phrase = "relative output MSE" + (" (projected" if want == "projected" else ",")
    assert all(phrase in layer.reason for layer in g.layers.values())


def test_projected_sensitivity_ranks_like_measured():
    """On the demo U-Net the projected cost (8 backward passes) orders the layers' 4-bit changes as measuring each
    one's output error does (Spearman > 0.8), at the same scale (median within 2x)."""
    import numpy as np

    from pocketfusion import calibration as C
    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.quant import grid as G
    from pocketfusion.compress.quant.feeds import stack_feeds, unet_outputs
    from pocketfusion.compress.quant.gptq import quantize_layer
    from pocketfusion.compress.quant.mixed import layer_sensitivity, projected_sensitivity
    from pocketfusion.suite import suite_for

    model = load_model()
    unet = model.unet
    feeds = C.capture(model, suite_for(model).calibration_prompts(2), steps=6, n_timesteps=2, progress=False).unet_feeds("all")
    pair = stack_feeds(feeds[:1])[0]
    cand, deltas = {}, {}
    for n, m in G.quantizable_layers(unet).items():
        lg, q = quantize_layer(m, n, 4, G.layer_group_size(m, 4, 32), "rtn")
        cand[n] = lg.dequantize(q)
        deltas[n] = cand[n] - m.weight.detach().float()
    measured = layer_sensitivity(unet, [pair], unet_outputs(unet, [pair]), cand)
    projected = projected_sensitivity(unet, pair, deltas)
    names = sorted(measured)
    ra = np.argsort(np.argsort([projected[n] for n in names]))
    rb = np.argsort(np.argsort([measured[n] for n in names]))
    rho = float(np.corrcoef(ra, rb)[0, 1])
    assert rho > 0.8, rho
    ratio = np.median([projected[n] for n in names]) / np.median([measured[n] for n in names])
    assert 0.5 < ratio < 2, ratio


def test_batch_limit_shrinks_for_full_size():
    from diffusers import UNet2DConditionModel

    from pocketfusion.single_file import CONFIGS

    cfg = UNet2DConditionModel.load_config(str(CONFIGS / "sd15" / "unet"))
    with torch.device("meta"):
        big = UNet2DConditionModel.from_config(cfg)
    assert 2 <= batch_limit(big) <= 16
    assert batch_limit(tiny_unet("sd15")) == 256


def test_plan_steps_and_budget_refusal(tmp_path, capsys):
    from pocketfusion import artifact
    from pocketfusion.checkpoint import load_model

    save_tiny_pipeline(tmp_path / "pipe", "sd15")
    (tmp_path / "p.txt").write_text("a red circle\na blue square\na green triangle\n")
    model = load_model(tmp_path / "pipe")
    base = {"scheme": "w8", "calib": str(tmp_path / "p.txt"), "calib_steps": 4, "calib_timesteps": 2, "image_prompts": 1}
    with pytest.raises(UserError, match="estimated at .* over --max-minutes"):
        quantize(model, QuantConfig(**base, max_minutes=1e-6), tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".refused*"))
    man = quantize(model, QuantConfig(**base), tmp_path / "w8", progress=True)
    out = capsys.readouterr().out
    assert "plan (estimated" in out and "3 prompts x 4 sampling steps = 12 U-Net calls" in out
    m = artifact.load_manifest(tmp_path / "w8").metrics
    assert m == man.metrics
    names = [s["step"] for s in m["steps"]]
    assert names == ["calibrate", "quantize (gptq w8)", "held-out error", "images vs fp32", "write"]
    assert all(s["seconds"] >= 0 and s["peak_rss_gib"] > 0 for s in m["steps"])
    assert m["plan"]["total_seconds"] > 0 and m["plan"]["unet_call_seconds"] > 0
    assert set(m["plan"]["seconds"]) >= {"calibrate", "gptq", "held-out error", "images"}
    json.dumps(m)


def test_gptq_column_blocks():
    """A layer wider than ``gptq_max_cols`` is rounded in column blocks: on its grid, the blocks said in its reason,
    its error well below round-to-nearest's and close to GPTQ's over the whole layer."""
    import copy

    from pocketfusion.compress.quant.feeds import stack_feeds, unet_outputs
    from pocketfusion.metrics import output_error

    assert gptq_mod.column_blocks(23040, 8192) == [(0, 7680), (7680, 15360), (15360, 23040)]
    assert gptq_mod.column_blocks(100, 8192) == [(0, 100)] and gptq_mod.column_blocks(100, None) == [(0, 100)]
    unet = tiny_unet("sd15")
    feeds = random_feeds(unet, 6)
    held = stack_feeds(random_feeds(unet, 2, seed=50))
    ref = unet_outputs(unet, held)
    errs = {}
    for name, kw in (("whole", {"gptq_max_cols": None}), ("blocks", {"gptq_max_cols": 64}), ("rtn", {"method": "rtn"})):
        u = copy.deepcopy(unet)
        g = quantize_unet(u, feeds, QuantConfig(scheme="w4", group_size=8, mixed_threshold=None, **kw), progress=False)
        assert_on_grid(u, g)
        errs[name] = output_error(ref, unet_outputs(u, held))["rel_mse"]
        wide = [lg for lg in g.layers.values() if lg.shape[1] * (lg.shape[2] * lg.shape[3] if len(lg.shape) == 4 else 1) > 64]
        if name == "blocks":
            assert wide and all("column blocks" in lg.reason for lg in wide)
    assert max(errs["whole"], errs["blocks"]) < 0.8 * errs["rtn"], errs  # both compensate
    assert abs(errs["blocks"] - errs["whole"]) <= 0.25 * errs["whole"], errs  # and nearly as well
