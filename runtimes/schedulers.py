"""Runtime schedulers: the numpy side of the sampling loop, one class per algorithm, in a registry.

A scheduler is built from a diffusers ``scheduler_config.json`` (``from_config``) and offers
``timesteps(steps)`` and ``step(model_output, t, x, steps) -> x_prev``, numerically the same as the
diffusers class it stands for. ``SCHEDULERS`` maps a name (the CLI's ``--scheduler``) to its class;
``CLASS_NAMES`` maps diffusers class names to a name. A config no entry fits is a one-line
``UserError``, never a silent substitution (PNDM runs as DDIM: the one exception, kept from the first
release until PNDM/PLMS is implemented; a warning says so).
"""

from __future__ import annotations

import logging

import numpy as np

from pocketfusion.errors import UserError

logger = logging.getLogger(__name__)


def _betas(config: dict) -> np.ndarray:
    T = int(config.get("num_train_timesteps", 1000))
    b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if schedule == "scaled_linear":
        return np.linspace(b0**0.5, b1**0.5, T, dtype=np.float32) ** 2
    if schedule == "linear":
        return np.linspace(b0, b1, T, dtype=np.float32)
    raise UserError(f"beta_schedule {schedule!r} is not supported by the runtime pipeline (linear, scaled_linear)")


class DDIMScheduler:
    """Deterministic DDIM (eta = 0), numerically the same as diffusers' ``DDIMScheduler`` for its configs.

    ``step`` takes the network's output, an epsilon or a v prediction per ``prediction_type``.
    """

    name = "ddim"

    def __init__(self, config: dict):
        self.prediction = config.get("prediction_type", "epsilon")
        if self.prediction not in ("epsilon", "v_prediction"):
            raise UserError(f"prediction_type {self.prediction!r} is not supported by the runtime pipeline (epsilon or v_prediction)")
        self.T = int(config.get("num_train_timesteps", 1000))
        self.alphas_cumprod = np.cumprod(1.0 - _betas(config), dtype=np.float32)
        self.final_alpha = np.float32(1.0) if config.get("set_alpha_to_one", True) else self.alphas_cumprod[0]
        self.offset = int(config.get("steps_offset", 0))
        if config.get("timestep_spacing", "leading") != "leading":
            raise UserError("only 'leading' timestep spacing is supported by the runtime pipeline")

    def timesteps(self, steps: int) -> np.ndarray:
        ratio = self.T // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + self.offset

    def step(self, out: np.ndarray, t: int, x: np.ndarray, steps: int) -> np.ndarray:
        prev = t - self.T // steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha
        if self.prediction == "v_prediction":
            x0 = np.sqrt(a_t) * x - np.sqrt(1 - a_t) * out
            eps = np.sqrt(a_t) * out + np.sqrt(1 - a_t) * x
        else:
            eps = out
            x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        return (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps).astype(np.float32)


class LCMScheduler:
    """Latent consistency multistep sampling, numerically the same as diffusers' ``LCMScheduler``.

    ``timesteps(steps)`` takes ``steps`` evenly spaced indices of the ``original_inference_steps``-step
    schedule it was distilled on (999, 759, 499, 259 for 4 of 50). ``step`` applies the consistency
    boundary condition (``denoised = c_skip * x + c_out * x0``) and, except at the last step, re-noises
    ``denoised`` to the next timestep with ``noise``: the caller draws it (``stochastic`` is True), as
    diffusers does, from the generator of the initial latents, ``torch.randn(x.shape, generator=g)``
    after the initial noise, which reproduces diffusers' images for the same seed.
    """

    name = "lcm"
    stochastic = True  # step() needs noise= at every step but the last
    SIGMA_DATA = 0.5

    def __init__(self, config: dict):
        self.prediction = config.get("prediction_type", "epsilon")
        if self.prediction not in ("epsilon", "v_prediction", "sample"):
            raise UserError(f"prediction_type {self.prediction!r} is not supported by the runtime LCM scheduler "
                            "(epsilon, v_prediction or sample)")
        for flag in ("thresholding", "rescale_betas_zero_snr"):
            if config.get(flag):
                raise UserError(f"LCMScheduler with {flag}=true is not supported by the runtime pipeline")
        if config.get("trained_betas") is not None:
            raise UserError("LCMScheduler with trained_betas is not supported by the runtime pipeline")
        self.T = int(config.get("num_train_timesteps", 1000))
        self.alphas_cumprod = np.cumprod(1.0 - _betas(config), dtype=np.float32)
        self.original_steps = int(config.get("original_inference_steps", 50))
        self.scaling = float(config.get("timestep_scaling", 10.0))
        self.clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", False) else None
        if not 1 <= self.original_steps <= self.T:
            raise UserError(f"original_inference_steps={self.original_steps} must be in 1..{self.T}")

    def timesteps(self, steps: int) -> np.ndarray:
        if not 1 <= steps <= self.original_steps:
            raise UserError(f"the LCM scheduler takes 1..{self.original_steps} steps (original_inference_steps), got {steps}")
        k = self.T // self.original_steps
        origin = (np.arange(1, self.original_steps + 1) * k - 1)[::-1]
        return origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)].astype(np.int64)

    def boundary(self, t: int) -> tuple[float, float]:
        """(c_skip, c_out) at timestep ``t``."""
        s = np.float32(t * self.scaling)
        sd2 = np.float32(self.SIGMA_DATA**2)
        return sd2 / (s**2 + sd2), s / np.sqrt(s**2 + sd2)

    def step(self, out: np.ndarray, t: int, x: np.ndarray, steps: int, *, noise: np.ndarray | None = None) -> np.ndarray:
        ts = self.timesteps(steps)
        where = np.nonzero(ts == t)[0]
        if not len(where):
            raise ValueError(f"timestep {t} is not one of the LCM scheduler's {steps}-step timesteps {ts.tolist()}")
        i = int(where[0])
        a_t = self.alphas_cumprod[t]
        if self.prediction == "epsilon":
            x0 = (x - np.sqrt(1 - a_t) * out) / np.sqrt(a_t)
        elif self.prediction == "v_prediction":
            x0 = np.sqrt(a_t) * x - np.sqrt(1 - a_t) * out
        else:
            x0 = out
        if self.clip is not None:
            x0 = np.clip(x0, -self.clip, self.clip)
        c_skip, c_out = self.boundary(t)
        denoised = c_out * x0 + c_skip * x
        if i == len(ts) - 1:
            return denoised.astype(np.float32)
        if noise is None:
            raise ValueError("LCMScheduler.step needs noise= (the same shape as x) at every step but the last")
        a_prev = self.alphas_cumprod[ts[i + 1]]
        return (np.sqrt(a_prev) * denoised + np.sqrt(1 - a_prev) * noise).astype(np.float32)


# name -> class; issue 13 adds pndm, euler, euler-ancestral, dpmpp-2m(-karras); issue 17 adds lcm.
SCHEDULERS: dict[str, type] = {"ddim": DDIMScheduler, "lcm": LCMScheduler}
# diffusers class name -> registry name
CLASS_NAMES: dict[str, str] = {"DDIMScheduler": "ddim", "PNDMScheduler": "ddim", "LCMScheduler": "lcm"}


def from_config(config: dict, name: str | None = None):
    """The runtime scheduler for a diffusers scheduler config (or the registry entry ``name``).

    Raises:
        UserError: an unknown name, or a config class the runtime has no scheduler for.
    """
    if name is not None:
        if name not in SCHEDULERS:
            raise UserError(f"unknown scheduler {name!r}; available: {', '.join(SCHEDULERS)}")
        return SCHEDULERS[name](config)
    cls = config.get("_class_name", "DDIMScheduler")
    if cls not in CLASS_NAMES:
        raise UserError(f"the runtime pipeline has no scheduler for {cls!r} (it has: {', '.join(CLASS_NAMES)}); "
                        "pass a supported scheduler")
    if cls == "PNDMScheduler":
        logger.warning("PNDMScheduler config: the runtime pipeline samples it with DDIM (PNDM/PLMS is not implemented yet)")
    return SCHEDULERS[CLASS_NAMES[cls]](config)
