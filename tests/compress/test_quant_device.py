"""``device`` of the quantize and calibrate stages: ``cpu`` given explicitly is the default bit for bit; ``cuda``
(where a GPU exists) samples with the CPU's noise and gives the CPU's grid on nearly every weight, and leaves the
caller's modules and the grid on the CPU."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_quant import assert_on_grid, random_feeds  # noqa: E402

from pocketfusion.calibration import CalibrationConfig, capture  # noqa: E402
from pocketfusion.compress.quant import QuantConfig, quantize, quantize_unet  # noqa: E402
from pocketfusion.errors import UserError  # noqa: E402
from pocketfusion.testing.fixtures import tiny_unet  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
PROMPTS = ["a small red circle on a blue background, center", "a large white square on a black background, top left"]


def test_device_is_validated_and_recorded():
    cfg = QuantConfig(scheme="w8", device="cpu")
    assert cfg.to_dict()["device"] == "cpu" and QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert QuantConfig.from_dict({"scheme": "w8"}).device == "cpu"  # manifests written before the field
    assert CalibrationConfig(device="cpu").to_dict()["device"] == "cpu"
    for make in (lambda: QuantConfig(scheme="w8", device="tpu"), lambda: CalibrationConfig(device="gpu")):
        with pytest.raises(UserError, match="unknown device"):
            make()
    if not torch.cuda.is_available():
        unet = tiny_unet("sd15")
        with pytest.raises(UserError, match="--device cuda but torch .* sees no CUDA device"):
            quantize_unet(unet, random_feeds(unet, 2), QuantConfig(scheme="w8", device="cuda"), progress=False)


@pytest.mark.parametrize("scheme,kw", [("w8", {}), ("w4", {"sensitivity": "projected"})])
def test_explicit_cpu_is_the_default(scheme, kw):
    unet = tiny_unet("sd15")
    feeds = random_feeds(unet, 4)
    base = {"scheme": scheme, "group_size": 8, "sensitivity_feeds": 2, **kw}
    a, b = copy.deepcopy(unet), copy.deepcopy(unet)
    ga = quantize_unet(a, feeds, QuantConfig(**base), progress=False)
    gb = quantize_unet(b, feeds, QuantConfig(**base, device="cpu"), progress=False)
    ia, ib = ga.integers(a), gb.integers(b)
    assert set(ia) == set(ib)
    for n in ia:
        assert torch.equal(ia[n], ib[n]) and torch.equal(ga.layers[n].scale, gb.layers[n].scale), n
        assert ga.layers[n].reason == gb.layers[n].reason


def test_capture_explicit_cpu_is_the_default(tiny_sd):
    from pocketfusion.checkpoint import load_model

    model = load_model(tiny_sd)
    a = capture(model, PROMPTS, steps=2, n_timesteps=2, progress=False)
    b = capture(model, PROMPTS, steps=2, n_timesteps=2, progress=False, device="cpu")
    assert a.tensors.keys() == b.tensors.keys() and all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@cuda
@pytest.mark.parametrize("scheme", ["w8", "w4"])
def test_quantize_unet_on_cuda_matches_cpu(scheme):
    unet = tiny_unet("sd15")
    feeds = random_feeds(unet, 4)
    base = {"scheme": scheme, "group_size": 8, "mixed_threshold": None}  # the same bits per layer on both devices
    a, b = copy.deepcopy(unet), copy.deepcopy(unet)
    ga = quantize_unet(a, feeds, QuantConfig(**base), progress=False)
    gb = quantize_unet(b, feeds, QuantConfig(**base, device="cuda"), progress=False)
    assert next(b.parameters()).device.type == "cpu"  # put back where it was
    assert all(g.scale.device.type == "cpu" for g in gb.layers.values())
    assert_on_grid(b, gb)
    ia, ib = ga.integers(a), gb.integers(b)
    same = sum(int((ia[n] == ib[n]).sum()) for n in ia) / sum(ia[n].numel() for n in ia)
    assert same >= 0.99, same


@cuda
def test_capture_and_quantize_stage_on_cuda(tiny_sd, tmp_path):
    """The CPU's noise on the GPU: the feeds are the CPU's up to rounding; the stage writes a grid from the CPU and
    leaves the model there."""
    from pocketfusion import artifact
    from pocketfusion.checkpoint import load_model

    model = load_model(tiny_sd)
    a = capture(model, PROMPTS, steps=4, n_timesteps=2, progress=False)
    b = capture(model, PROMPTS, steps=4, n_timesteps=2, progress=False, device="cuda")
    for k in a.tensors:
        x, y = a.tensors[k].astype(np.float64), b.tensors[k].astype(np.float64)
        assert np.linalg.norm(x - y) <= 1e-3 * max(np.linalg.norm(x), 1e-12), k
    assert all(p.device.type == "cpu" for m in model.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS + ["a small green triangle on a white background, center"]) + "\n")
    cfg = QuantConfig(scheme="w8", calib=str(tmp_path / "p.txt"), calib_steps=4, calib_timesteps=2, image_prompts=1, device="cuda")
    man = quantize(model, cfg, tmp_path / "w8", progress=False)
    assert man.settings["device"] == "cuda" and man.metrics["unet_heldout_error"]["gptq"]["snr_db"] > 20
    assert all(p.device.type == "cpu" for m in model.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    q = load_model(tmp_path / "w8")
    assert artifact.load_manifest(tmp_path / "w8").stage == "compress" and q.quantized
