"""The runtime LCM scheduler against diffusers' ``LCMScheduler``: timesteps, and whole sampling loops given the same noise."""

from __future__ import annotations

import numpy as np
import pytest

from pocketfusion.errors import UserError
from pocketfusion.runtimes.schedulers import CLASS_NAMES, SCHEDULERS, LCMScheduler, from_config

CONFIGS = {
    "sd15-epsilon": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
                         set_alpha_to_one=False, steps_offset=1, clip_sample=False),
    "demo-v": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction",
                   set_alpha_to_one=False, steps_offset=1, clip_sample=False, original_inference_steps=20),
}


def _pair(name: str):
    from diffusers import LCMScheduler as Ref

    ref = Ref(num_train_timesteps=1000, **CONFIGS[name])
    return ref, from_config(dict(ref.config, _class_name="LCMScheduler"))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_matches_diffusers(name, steps):
    import torch

    ref, ours = _pair(name)
    assert isinstance(ours, LCMScheduler)
    ref.set_timesteps(steps)
    assert ours.timesteps(steps).tolist() == ref.timesteps.tolist()
    g_ref, g_ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    xt = torch.from_numpy(x.copy())
    for t in ref.timesteps:
        out = rng.standard_normal(x.shape).astype(np.float32)
        xt = ref.step(torch.from_numpy(out), t, xt, generator=g_ref).prev_sample
        # the runtime's caller draws the step noise as diffusers does: from the same generator, same shape
        noise = torch.randn(x.shape, generator=g_ours).numpy() if int(t) != int(ref.timesteps[-1]) else None
        x = ours.step(out, int(t), x, steps, noise=noise)
        np.testing.assert_allclose(x, xt.numpy(), rtol=1e-5, atol=1e-5)


def test_lcm_timesteps_known_values():
    ours = from_config({"_class_name": "LCMScheduler", "original_inference_steps": 50})
    assert ours.timesteps(1).tolist() == [999]
    assert ours.timesteps(2).tolist() == [999, 499]
    assert ours.timesteps(4).tolist() == [999, 759, 499, 259]


def test_lcm_registry_and_errors():
    assert SCHEDULERS["lcm"] is LCMScheduler and CLASS_NAMES["LCMScheduler"] == "lcm"
    assert isinstance(from_config({"_class_name": "DDIMScheduler"}, "lcm"), LCMScheduler)
    s = from_config({"_class_name": "LCMScheduler"})
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="needs noise="):
        s.step(x, 999, x, 2)
    with pytest.raises(ValueError, match="not one of"):
        s.step(x, 998, x, 2)
    with pytest.raises(UserError, match="1..50 steps"):
        s.timesteps(51)
    with pytest.raises(UserError, match="thresholding"):
        from_config({"_class_name": "LCMScheduler", "thresholding": True})
    with pytest.raises(UserError, match="prediction_type"):
        from_config({"_class_name": "LCMScheduler", "prediction_type": "flow"})
