"""The runtime schedulers against diffusers' own, for the same model outputs, to float precision."""

from __future__ import annotations

import numpy as np
import pytest

from pocketfusion.errors import UserError
from pocketfusion.runtimes.schedulers import SCHEDULERS, from_config

CONFIGS = {
    "sd15-epsilon": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
                         set_alpha_to_one=False, steps_offset=1, clip_sample=False),
    "demo-v": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction",
                   set_alpha_to_one=True, steps_offset=0, clip_sample=False),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("steps", [1, 4, 50])
def test_ddim_matches_diffusers(name, steps):
    import torch
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(num_train_timesteps=1000, **CONFIGS[name])
    ours = from_config(dict(ref.config, _class_name="DDIMScheduler"))
    ref.set_timesteps(steps)
    assert list(ours.timesteps(steps)) == ref.timesteps.tolist()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    xt = torch.from_numpy(x.copy())
    for t in ref.timesteps:
        out = rng.standard_normal(x.shape).astype(np.float32)
        xt = ref.step(torch.from_numpy(out), t, xt).prev_sample
        x = ours.step(out, int(t), x, steps)
        np.testing.assert_allclose(x, xt.numpy(), rtol=1e-5, atol=1e-5)


def test_registry_errors_are_one_line():
    with pytest.raises(UserError, match="unknown scheduler 'heun'; available: ddim"):
        from_config({}, "heun")
    with pytest.raises(UserError, match="no scheduler for 'EulerDiscreteScheduler'"):
        from_config({"_class_name": "EulerDiscreteScheduler"})
    with pytest.raises(UserError, match="beta_schedule 'cosine'"):
        from_config({"_class_name": "DDIMScheduler", "beta_schedule": "cosine"})
    assert "ddim" in SCHEDULERS
