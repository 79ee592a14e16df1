"""The runtime schedulers against diffusers' own: the same initial noise and the same (fake, deterministic)
model outputs give the same latents, to float precision, for every scheduler, prediction type and spacing."""

from __future__ import annotations

import inspect
import json
import re

import numpy as np
import pytest

from pocketfusion.errors import UserError
from pocketfusion.runtimes.schedulers import CLASS_NAMES, SCHEDULERS, from_config
from pocketfusion.scheduler_names import NAMES, diffusers_scheduler

BASES = {
    "sd-leading": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False,
                       steps_offset=1, timestep_spacing="leading", clip_sample=False),
    "linear-trailing": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="trailing", clip_sample=False),
    "linspace": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="linspace", clip_sample=False),
}
# registry name -> (diffusers class, what the name adds to a config), written out here rather than read from NAMES
REFERENCE = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
}
PREDICTIONS = {
    "ddim": ("epsilon", "v_prediction", "sample"), "pndm": ("epsilon", "v_prediction"),
    "euler": ("epsilon", "v_prediction", "sample"), "euler-ancestral": ("epsilon", "v_prediction"),
    "dpmpp-2m": ("epsilon", "v_prediction", "sample"), "dpmpp-2m-karras": ("epsilon", "v_prediction", "sample"),
    "lcm": ("epsilon", "v_prediction", "sample"),
}
PATTERN = np.random.default_rng(7).standard_normal((1, 4, 8, 8)).astype(np.float32)


def _fake_unet(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the U-Net: a fixed function of its input and timestep."""
    return (0.8 * np.tanh(x) + 0.3 * np.sin(t / 97.0 + PATTERN)).astype(np.float32)


def _reference(name: str, config: dict):
    import diffusers

    cls, extra = REFERENCE[name]
    keys = inspect.signature(getattr(diffusers, cls).__init__).parameters
    return getattr(diffusers, cls)(**{k: v for k, v in {**config, **extra}.items() if k in keys})


def _sample(ref, ours, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Final latents of diffusers' scheduler and ours, driven alike (as a pipeline does: initial noise times
    init_noise_sigma, scale_model_input, step noise from a generator after the initial latents)."""
    import torch

    ref.set_timesteps(steps)
    ts = ours.timesteps(steps)
    if ts.dtype == np.int64:
        np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    else:  # Euler's fractional timesteps: torch's float32 square root is not always correctly rounded, numpy's is
        np.testing.assert_allclose(ts, ref.timesteps.numpy(), rtol=1e-6)
    g_ref, g_ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    xt = torch.randn((1, 4, 8, 8), generator=g_ref) * ref.init_noise_sigma
    x = torch.randn((1, 4, 8, 8), generator=g_ours).numpy() * ours.init_noise_sigma(steps)
    np.testing.assert_allclose(x, xt.numpy(), rtol=1e-6)
    ours.reset()
    kw = {"generator": g_ref} if ours.stochastic else {}
    for i, t in enumerate(ref.timesteps):
        out = _fake_unet(ref.scale_model_input(xt, t).numpy(), float(t))
        xt = ref.step(torch.from_numpy(out), t, xt, **kw).prev_sample
        noise = torch.randn(x.shape, generator=g_ours).numpy() if ours.stochastic and i < len(ts) - 1 else None
        x = ours.step(_fake_unet(ours.scale_model_input(x, ts[i], steps), float(ts[i])), ts[i], x, steps, noise=noise)
    return x, xt.numpy()


def _close(x: np.ndarray, ref: np.ndarray, rel: float = 1e-5) -> None:
    assert np.isfinite(ref).all() and x.dtype == np.float32
    err = float(np.abs(x - ref).max() / max(1.0, np.abs(ref).max()))
    assert err <= rel, f"max abs error {err:.2e} of max |ref| {np.abs(ref).max():.3g}"


CASES = [(n, p, b) for n in REFERENCE for p in PREDICTIONS[n] for b in BASES]


@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize(("name", "prediction", "base"), CASES)
def test_matches_diffusers(name, prediction, base, steps):
    ref = _reference(name, {**BASES[base], "prediction_type": prediction})
    ours = from_config(dict(ref.config, _class_name=type(ref).__name__))  # the config's own class
    assert ours.name == name
    # one step down from t=999 of the linear schedule (alpha_bar 4e-5) subtracts terms ~150 times the result:
    # float32 rounding (in diffusers' result as much as in ours) grows as much
    rel = 1e-4 if steps == 1 and base == "linear-trailing" else 1e-5
    _close(*_sample(ref, ours, steps), rel)
    _close(*_sample(ref, ours, steps, seed=1), rel)  # a second run on the same objects: no state carried over


EXTRA = {  # options SD-style and other configs use, beyond the base cases
    "pndm-prk": ("pndm", dict(BASES["sd-leading"], skip_prk_steps=False), (4, 20)),
    "pndm-prk-v": ("pndm", dict(BASES["linear-trailing"], skip_prk_steps=False, prediction_type="v_prediction"), (5,)),
    "ddim-clip": ("ddim", dict(BASES["sd-leading"], clip_sample=True, clip_sample_range=0.5, set_alpha_to_one=True), (4, 20)),
    "ddim-zero-snr": ("ddim", dict(BASES["linear-trailing"], rescale_betas_zero_snr=True, prediction_type="v_prediction"), (4, 20)),
    "euler-zero-snr": ("euler", dict(BASES["linear-trailing"], rescale_betas_zero_snr=True, prediction_type="v_prediction"), (4, 20)),
    "euler-karras": ("euler", dict(BASES["sd-leading"], use_karras_sigmas=True), (4, 20)),
    "euler-sigma-min": ("euler", dict(BASES["linspace"], final_sigmas_type="sigma_min"), (4, 20)),
    "euler-a-zero-snr": ("euler-ancestral", dict(BASES["linear-trailing"], rescale_betas_zero_snr=True,
                                                 prediction_type="v_prediction"), (4, 20)),
    "dpm-heun": ("dpmpp-2m", dict(BASES["sd-leading"], solver_type="heun"), (4, 20)),
    "dpm-sigma-min": ("dpmpp-2m", dict(BASES["linspace"], final_sigmas_type="sigma_min", lower_order_final=False), (4, 20)),
    "dpm-euler-at-final": ("dpmpp-2m", dict(BASES["linspace"], final_sigmas_type="sigma_min", euler_at_final=True), (20,)),
    "dpm-lambda-clip": ("dpmpp-2m", dict(BASES["linear-trailing"], lambda_min_clipped=-5.1, timestep_spacing="linspace",
                                         beta_schedule="squaredcos_cap_v2"), (4, 20)),
    "dpm-karras-heun": ("dpmpp-2m-karras", dict(BASES["sd-leading"], solver_type="heun", prediction_type="v_prediction"), (4, 20)),
    "dpm-zero-snr": ("dpmpp-2m", dict(BASES["linear-trailing"], rescale_betas_zero_snr=True, prediction_type="v_prediction"), (4, 20)),
    "lcm-clip": ("lcm", dict(BASES["sd-leading"], clip_sample=True, original_inference_steps=20), (2, 8)),
}


@pytest.mark.parametrize("case", EXTRA)
def test_options_match_diffusers(case):
    name, config, step_counts = EXTRA[case]
    ref = _reference(name, config)
    ours = from_config(dict(ref.config, _class_name=type(ref).__name__))
    for steps in step_counts:
        _close(*_sample(ref, ours, steps))


@pytest.mark.parametrize("name", list(NAMES))
def test_named_scheduler_from_another_config(name):
    """``from_config(config, name)`` builds what diffusers' ``Class.from_config(config)`` builds (plus the name's
    values), on the demo model's DDIM config; ``diffusers_scheduler`` is that diffusers object."""
    from pathlib import Path

    import pocketfusion

    config = json.loads((Path(pocketfusion.__file__).parent / "demo/model/scheduler/scheduler_config.json").read_text())
    ref = diffusers_scheduler(config, name)
    assert type(ref).__name__ == REFERENCE[name][0]
    for key, value in REFERENCE[name][1].items():
        assert ref.config[key] == value
    assert ref.config.prediction_type == "v_prediction" and ref.config.beta_schedule == "linear"
    ours = from_config(config, name)
    assert ours.name == name and ours.prediction == "v_prediction"
    _close(*_sample(ref, ours, 4))


def test_defaults_are_diffusers_defaults():
    """A config without a key means diffusers' default for it, as ``from_config`` reads it."""
    import diffusers

    for name, cls in SCHEDULERS.items():
        params = inspect.signature(getattr(diffusers, NAMES[name][0]).__init__).parameters
        expected = {k: p.default for k, p in params.items() if k != "self"}
        assert cls.DEFAULTS == expected, name


def test_registry():
    assert list(SCHEDULERS) == list(NAMES) == ["ddim", "pndm", "euler", "euler-ancestral", "dpmpp-2m", "dpmpp-2m-karras", "lcm"]
    assert CLASS_NAMES == {"DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "EulerDiscreteScheduler": "euler",
                           "EulerAncestralDiscreteScheduler": "euler-ancestral", "DPMSolverMultistepScheduler": "dpmpp-2m",
                           "LCMScheduler": "lcm"}
    dpm = {"_class_name": "DPMSolverMultistepScheduler"}
    assert from_config(dpm).name == "dpmpp-2m"
    assert from_config({**dpm, "use_karras_sigmas": True}).name == "dpmpp-2m-karras"
    assert from_config({**dpm, "solver_order": 3}, "dpmpp-2m-karras").options["solver_order"] == 2  # the name asks for 2M
    pndm = {"_class_name": "PNDMScheduler"}
    assert from_config(pndm).skip_prk is False  # diffusers' default: the config's own class as it is
    assert from_config(pndm, "pndm").skip_prk is True  # the name: PLMS unless the config says otherwise
    assert from_config({**pndm, "skip_prk_steps": False}, "pndm").skip_prk is False
    assert from_config({}).name == "ddim"


@pytest.mark.parametrize(("config", "name", "match"), [
    ({}, "heun", "unknown scheduler 'heun'; available: ddim, pndm, euler, euler-ancestral, dpmpp-2m, dpmpp-2m-karras, lcm"),
    ({"_class_name": "HeunDiscreteScheduler"}, None, "no scheduler for 'HeunDiscreteScheduler'"),
    ({"_class_name": "DDIMScheduler", "beta_schedule": "cosine"}, None, "beta_schedule 'cosine'"),
    ({"_class_name": "DDIMScheduler", "thresholding": True}, None, "DDIMScheduler with thresholding=True"),
    ({"_class_name": "DDIMScheduler", "timestep_spacing": "karras"}, None, "timestep_spacing 'karras'"),
    ({"_class_name": "PNDMScheduler", "prediction_type": "sample"}, None, "PNDMScheduler with prediction_type='sample'"),
    ({"_class_name": "EulerAncestralDiscreteScheduler", "prediction_type": "sample"}, None, "prediction_type='sample'"),
    ({"_class_name": "EulerDiscreteScheduler", "interpolation_type": "log_linear"}, None, "interpolation_type='log_linear'"),
    ({"_class_name": "EulerDiscreteScheduler", "use_exponential_sigmas": True}, None, "use_exponential_sigmas=True"),
    ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, None, "solver_order=3"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}, None, "algorithm_type='sde-dpmsolver++'"),
    ({"_class_name": "DPMSolverMultistepScheduler", "thresholding": True}, None, "thresholding=True"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_lu_lambdas": True}, None, "use_lu_lambdas=True"),
    ({"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction"}, None, "prediction_type='flow_prediction'"),
    ({"_class_name": "LCMScheduler", "thresholding": True}, "lcm", "thresholding=True"),
])
def test_unsupported_configs_are_one_line_user_errors(config, name, match):
    with pytest.raises(UserError, match=re.escape(match)) as e:
        from_config(config, name).timesteps(4)
    assert "\n" not in str(e.value)


def test_pndm_prk_needs_four_steps_and_runs_are_checked():
    s = from_config({"_class_name": "PNDMScheduler"})
    with pytest.raises(UserError, match="at least 4 steps"):
        s.timesteps(3)
    e = from_config({"_class_name": "EulerDiscreteScheduler"})
    ts = e.timesteps(4)
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="not the next"):
        e.step(x, ts[1], x, 4)  # a run starts at the first timestep
    e.step(x, ts[0], x, 4)
    e.step(x, ts[1], x, 4)
    e.step(x, ts[0], x, 4)  # a new run at the first timestep: the old one is dropped
    a = from_config({"_class_name": "EulerAncestralDiscreteScheduler"})
    with pytest.raises(ValueError, match="needs noise="):
        a.step(x, a.timesteps(2)[0], x, 2)
