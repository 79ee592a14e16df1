"""Runtime schedulers: the numpy side of the sampling loop, one class per algorithm, in a registry.

Each class is numerically the diffusers scheduler it names (same timesteps, same sigmas, same update,
to float32 precision), built from a diffusers ``scheduler_config.json`` with diffusers' own defaults for
the keys a config lacks. The interface the runtime pipeline drives (``runtimes/pipeline.py``)::

    sched = from_config(config, name)          # name None: the config's own class
    sched.reset()                              # a new sampling run (multistep schedulers keep history)
    x = noise * sched.init_noise_sigma(steps)  # Euler family: sigma_max (or sqrt(sigma_max^2 + 1)); else 1
    for i, t in enumerate(sched.timesteps(steps)):
        out = unet(sched.scale_model_input(x, t, steps), t)   # Euler family: x / sqrt(sigma^2 + 1)
        x = sched.step(out, t, x, steps, noise=...)            # noise= only where ``sched.stochastic``

``t`` is an element of ``timesteps(steps)`` (Euler's are fractional float32; feed them to the U-Net as
they are). A stochastic scheduler (Euler ancestral, LCM) never draws noise itself: its caller passes
``noise=`` (the shape of ``x``, standard normal) at every step but the last, from a generator the caller
owns and seeds. ``RuntimePipeline`` draws it from the ``torch.Generator`` of the initial latents,
``torch.randn(x.shape, generator=g).numpy()`` after them, which is what diffusers' pipeline draws for the
same seed; a caller without torch may pass ``np.random.default_rng(seed).standard_normal(x.shape)``.

``SCHEDULERS`` maps a name (the CLI's ``--scheduler``, ``pocketfusion.scheduler_names``) to its class;
``CLASS_NAMES`` maps diffusers class names to a name. A config the runtime cannot honour (an unknown class,
thresholding, another DPM-Solver algorithm or order, ...) is a one-line ``UserError`` naming the option,
never a silent substitution.
"""

from __future__ import annotations

import math

import numpy as np

from pocketfusion.errors import UserError
from pocketfusion.scheduler_names import CLASS_NAMES, NAMES, resolve

__all__ = ["CLASS_NAMES", "SCHEDULERS", "from_config"]


def _linspace(start: float, end: float, n: int) -> np.ndarray:
    """torch's float32 ``linspace`` to the bit (diffusers builds its betas with it): fused ``start + i * step`` up to
    halfway, ``end - (n - 1 - i) * step`` after; with it the schedules' alphas match diffusers' exactly."""
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(max(n - 1, 1)))
    i = np.arange(n)
    return np.where(i < n // 2, s + step * i, e - step * (n - 1 - i)).astype(np.float32)


def _betas(o: dict) -> np.ndarray:
    T = int(o["num_train_timesteps"])
    if o.get("trained_betas") is not None:
        return np.asarray(o["trained_betas"], dtype=np.float32)
    b0, b1, schedule = float(o["beta_start"]), float(o["beta_end"]), o["beta_schedule"]
    if schedule == "scaled_linear":
        return _linspace(b0**0.5, b1**0.5, T) ** 2
    if schedule == "linear":
        return _linspace(b0, b1, T)
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=np.float32)
    raise UserError(f"beta_schedule {schedule!r} is not supported by the runtime pipeline (linear, scaled_linear, squaredcos_cap_v2)")


def _alphas_cumprod(o: dict) -> np.ndarray:
    betas = _betas(o)
    if o.get("rescale_betas_zero_snr"):  # zero terminal SNR (arXiv 2305.08891, algorithm 1), as diffusers rescales
        s = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float64).astype(np.float32))
        s0, sT = s[0].copy(), s[-1].copy()
        s = (s - sT) * (s0 / (s0 - sT))
        a = s**2
        betas = 1 - np.concatenate([a[:1], a[1:] / a[:-1]])
    return np.cumprod(1.0 - betas, dtype=np.float64).astype(np.float32)  # torch.cumprod accumulates in double


def _spacing(o: dict, steps: int, *, round_linspace: bool = True) -> np.ndarray:
    """The descending timesteps of diffusers' ``timestep_spacing`` (float64; DDIM, PNDM, Euler)."""
    T, spacing = int(o["num_train_timesteps"]), o["timestep_spacing"]
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps)
        return (ts.round() if round_linspace else ts)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, steps) * (T // steps)).round()[::-1] + int(o["steps_offset"])
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)) - 1
    raise UserError(f"timestep_spacing {spacing!r} is not supported by the runtime pipeline (leading, trailing, linspace)")


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return float(((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma)))


def _karras(in_sigmas: np.ndarray, steps: int, sigma_min, sigma_max) -> np.ndarray:
    """Karras et al.'s rho = 7 sigmas between the schedule's (or the config's) extremes."""
    lo = float(sigma_min) if sigma_min is not None else float(in_sigmas[-1])
    hi = float(sigma_max) if sigma_max is not None else float(in_sigmas[0])
    ramp = np.linspace(0, 1, steps)
    return (hi ** (1 / 7.0) + ramp * (lo ** (1 / 7.0) - hi ** (1 / 7.0))) ** 7.0


class _Scheduler:
    """What every runtime scheduler shares: options with diffusers' defaults, checks, the run in progress."""

    name = ""
    DEFAULTS: dict = {}  # diffusers' __init__ defaults, every key it takes
    PREDICTIONS: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
    REFUSED: dict = {}  # option -> the only value(s) the runtime honours
    stochastic = False  # step() needs noise= at every step but the last

    def __init__(self, config: dict):
        o = {**self.DEFAULTS, **{k: v for k, v in dict(config).items() if k in self.DEFAULTS}}
        self.options = o
        self.cls = NAMES[self.name][0]
        for key, value in {**self.REFUSED, **NAMES[self.name][1]}.items():
            ok = value if isinstance(value, tuple) else (value,)
            if o.get(key) not in ok:
                raise UserError(f"{self.cls} with {key}={o.get(key)!r} is not supported by the runtime pipeline's {self.name!r} "
                                f"scheduler (supported: {', '.join(map(repr, ok))})")
        self.prediction = o["prediction_type"]
        if self.prediction not in self.PREDICTIONS:
            raise UserError(f"{self.cls} with prediction_type={self.prediction!r} is not supported by the runtime pipeline "
                            f"(supported: {', '.join(self.PREDICTIONS)})")
        self.T = int(o["num_train_timesteps"])
        self.alphas_cumprod = _alphas_cumprod(o)
        self._cache: dict[int, tuple] = {}
        self.reset()

    # -- the run in progress ---------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new sampling run: forget the step count and the multistep history."""
        self._run: tuple[int, int] | None = None
        self._begin()

    def _begin(self) -> None:
        """Clear a multistep scheduler's history (subclasses)."""

    def _index(self, t, steps: int) -> int:
        """The index of timestep ``t`` in this run: the run's next step, or 0 to start a new run."""
        ts = self.timesteps(steps)
        if self._run is not None and self._run[0] == steps and self._run[1] < len(ts) and ts[self._run[1]] == t:
            return self._run[1]
        if len(ts) and ts[0] == t:
            self._begin()
            self._run = (steps, 0)
            return 0
        raise ValueError(f"timestep {t} is not the next of the {self.name} scheduler's {steps}-step timesteps "
                         f"{ts.tolist()} (call reset() to start a new run)")

    def _advance(self) -> None:
        self._run = (self._run[0], self._run[1] + 1)

    # -- the interface ---------------------------------------------------------------------------
    def timesteps(self, steps: int) -> np.ndarray:
        if not 1 <= steps <= self.T:
            raise UserError(f"the {self.name} scheduler takes 1..{self.T} steps, got {steps}")
        if steps not in self._cache:
            self._cache[steps] = self._schedule(steps)
        return self._cache[steps][0]

    def _schedule(self, steps: int) -> tuple:
        raise NotImplementedError

    def init_noise_sigma(self, steps: int) -> np.float32:
        """The factor of the initial standard-normal latents."""
        return np.float32(1.0)

    def scale_model_input(self, x: np.ndarray, t, steps: int) -> np.ndarray:
        """The U-Net's input at timestep ``t`` (the latents as they are, but for the Euler family)."""
        return x

    def _x0(self, out: np.ndarray, x: np.ndarray, a_t: np.float32) -> np.ndarray:
        """The predicted clean sample from the network output at cumulative alpha ``a_t``."""
        if self.prediction == "epsilon":
            return (x - np.sqrt(1 - a_t) * out) / np.sqrt(a_t)
        if self.prediction == "v_prediction":
            return np.sqrt(a_t) * x - np.sqrt(1 - a_t) * out
        return out


_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None)


class DDIMScheduler(_Scheduler):
    """Deterministic DDIM (eta = 0), numerically the same as diffusers' ``DDIMScheduler``."""

    name = "ddim"
    DEFAULTS = dict(_COMMON, clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
                    thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
                    timestep_spacing="leading", rescale_betas_zero_snr=False)
    REFUSED = {"thresholding": False}

    def __init__(self, config: dict):
        super().__init__(config)
        self.final_alpha = np.float32(1.0) if self.options["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.clip = float(self.options["clip_sample_range"]) if self.options["clip_sample"] else None

    def _schedule(self, steps: int) -> tuple:
        return (_spacing(self.options, steps).astype(np.int64),)

    def step(self, out: np.ndarray, t, x: np.ndarray, steps: int, *, noise=None) -> np.ndarray:
        t = int(t)
        prev = t - self.T // steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha
        x0 = self._x0(out, x, a_t)
        if self.prediction == "epsilon":
            eps = out
        elif self.prediction == "v_prediction":
            eps = np.sqrt(a_t) * out + np.sqrt(1 - a_t) * x
        else:
            eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
        if self.clip is not None:
            x0 = np.clip(x0, -self.clip, self.clip)
        return (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps).astype(np.float32)


class PNDMScheduler(_Scheduler):
    """PLMS (``skip_prk_steps=True``, as Stable Diffusion's configs have it) or the full PNDM (four Runge-Kutta
    steps, 12 U-Net calls, before PLMS), numerically the same as diffusers' ``PNDMScheduler``.

    ``timesteps(steps)`` has ``steps + 1`` entries with PLMS (its second timestep repeats: the first step is
    taken twice to start the multistep history) and ``steps + 9`` with PNDM.
    """

    name = "pndm"
    DEFAULTS = dict(_COMMON, skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon",
                    timestep_spacing="leading", steps_offset=0)
    PREDICTIONS = ("epsilon", "v_prediction")

    def __init__(self, config: dict):
        super().__init__(config)
        self.final_alpha = np.float32(1.0) if self.options["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.skip_prk = bool(self.options["skip_prk_steps"])

    def _schedule(self, steps: int) -> tuple:
        base = _spacing(self.options, steps)[::-1].astype(np.int64)  # ascending, as diffusers' _timesteps
        if self.skip_prk:
            prk = np.array([], dtype=np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            if steps < 4:
                raise UserError(f"PNDMScheduler with skip_prk_steps=false takes at least 4 steps, got {steps}")
            prk = base[-4:].repeat(2) + np.tile(np.array([0, self.T // steps // 2]), 4)
            prk = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = base[:-3][::-1].copy()
        return np.concatenate([prk, plms]).astype(np.int64), prk

    def _begin(self) -> None:
        self.ets: list[np.ndarray] = []
        self.cur_model_output = 0
        self.cur_sample = None

    def step(self, out: np.ndarray, t, x: np.ndarray, steps: int, *, noise=None) -> np.ndarray:
        counter = self._index(t, steps)
        prk = self._cache[steps][1]
        t = int(t)
        if not self.skip_prk and counter < len(prk):
            diff = 0 if counter % 2 else self.T // steps // 2
            prev, t = t - diff, int(prk[counter // 4 * 4])
            if counter % 4 == 0:
                self.cur_model_output += 1 / 6 * out
                self.ets.append(out)
                self.cur_sample = x
            elif counter % 4 in (1, 2):
                self.cur_model_output += 1 / 3 * out
            else:
                out = self.cur_model_output + 1 / 6 * out
                self.cur_model_output = 0
            sample = self.cur_sample if self.cur_sample is not None else x
        else:
            prev, sample = t - self.T // steps, x
            if counter != 1:
                self.ets = self.ets[-3:]
                self.ets.append(out)
            else:
                prev, t = t, t + self.T // steps
            e = self.ets
            if len(e) == 1 and counter == 0:
                self.cur_sample = x
            elif len(e) == 1 and counter == 1:
                out = (out + e[-1]) / 2
                sample, self.cur_sample = self.cur_sample, None
            elif len(e) == 2:
                out = (3 * e[-1] - e[-2]) / 2
            elif len(e) == 3:
                out = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
            else:
                out = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        self._advance()
        return self._prev_sample(sample, t, prev, out).astype(np.float32)

    def _prev_sample(self, x: np.ndarray, t: int, prev: int, out: np.ndarray) -> np.ndarray:
        """Formula (9) of the PNDM paper, as diffusers' ``_get_prev_sample`` (torch computes ``** 0.5`` as a square root)."""
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.prediction == "v_prediction":
            out = np.sqrt(a_t) * out + np.sqrt(b_t) * x
        denom = a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev)
        return np.sqrt(a_prev / a_t) * x - (a_prev - a_t) * out / denom


_SIGMA_OPTIONS = dict(use_exponential_sigmas=False, use_beta_sigmas=False)


class EulerScheduler(_Scheduler):
    """Euler (Karras et al.'s algorithm 2 without churn), numerically the same as diffusers' ``EulerDiscreteScheduler``,
    Karras sigmas included (``use_karras_sigmas``). Its timesteps are fractional; ``init_noise_sigma`` and
    ``scale_model_input`` apply."""

    name = "euler"
    DEFAULTS = dict(_COMMON, prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None, sigma_max=None,
                    timestep_spacing="linspace", timestep_type="discrete", steps_offset=0, rescale_betas_zero_snr=False,
                    final_sigmas_type="zero")
    REFUSED = dict(_SIGMA_OPTIONS, interpolation_type="linear", final_sigmas_type=("zero", "sigma_min"))

    def __init__(self, config: dict):
        super().__init__(config)
        if self.options["timestep_type"] != "discrete" and self.prediction == "v_prediction":
            raise UserError(f"{self.cls} with timestep_type={self.options['timestep_type']!r} and v_prediction is not "
                            "supported by the runtime pipeline (supported: 'discrete')")
        if self.options.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = 2**-24

    def _sigmas(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        ac = self.alphas_cumprod
        ts = _spacing(self.options, steps, round_linspace=False).astype(np.float32)
        full = np.sqrt((1 - ac) / ac)
        sigmas = np.interp(ts, np.arange(0, len(full)), full)
        if self.options.get("use_karras_sigmas"):
            sigmas = _karras(sigmas, steps, self.options.get("sigma_min"), self.options.get("sigma_max"))
            log_sigmas = np.log(full)
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        last = np.sqrt((1 - ac[0]) / ac[0]) if self.options.get("final_sigmas_type") == "sigma_min" else 0
        return ts.astype(np.float32), np.concatenate([sigmas, [last]]).astype(np.float32)

    def _schedule(self, steps: int) -> tuple:
        return self._sigmas(steps)

    def _sigma(self, steps: int, i: int) -> np.float32:
        return self._cache[steps][1][i]

    def init_noise_sigma(self, steps: int) -> np.float32:
        self.timesteps(steps)
        top = self._cache[steps][1].max()
        return top if self.options["timestep_spacing"] in ("linspace", "trailing") else np.sqrt(top**2 + 1)

    def scale_model_input(self, x: np.ndarray, t, steps: int) -> np.ndarray:
        sigma = self._sigma(steps, self._index(t, steps))
        return (x / np.sqrt(sigma**2 + 1)).astype(np.float32)

    def _x0_sigma(self, out: np.ndarray, x: np.ndarray, sigma: np.float32) -> np.ndarray:
        if self.prediction == "epsilon":
            return x - sigma * out
        if self.prediction == "v_prediction":
            return out * (-sigma / np.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
        return out

    def step(self, out: np.ndarray, t, x: np.ndarray, steps: int, *, noise=None) -> np.ndarray:
        i = self._index(t, steps)
        sigma, nxt = self._sigma(steps, i), self._sigma(steps, i + 1)
        derivative = (x - self._x0_sigma(out, x, sigma)) / sigma
        self._advance()
        return (x + derivative * (nxt - sigma)).astype(np.float32)


class EulerAncestralScheduler(EulerScheduler):
    """Euler ancestral, numerically the same as diffusers' ``EulerAncestralDiscreteScheduler`` given the same noise:
    ``step`` needs ``noise=`` (standard normal, the shape of ``x``) at every step but the last (see the module
    docstring for who draws it)."""

    name = "euler-ancestral"
    DEFAULTS = dict(_COMMON, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False)
    PREDICTIONS = ("epsilon", "v_prediction")
    REFUSED: dict = {}
    stochastic = True

    def __init__(self, config: dict):
        _Scheduler.__init__(self, config)
        if self.options.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = 2**-24

    def step(self, out: np.ndarray, t, x: np.ndarray, steps: int, *, noise: np.ndarray | None = None) -> np.ndarray:
        i = self._index(t, steps)
        s_from, s_to = self._sigma(steps, i), self._sigma(steps, i + 1)
        up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        down = np.sqrt(s_to**2 - up**2)
        derivative = (x - self._x0_sigma(out, x, s_from)) / s_from
        prev = x + derivative * (down - s_from)
        if up != 0:
            if noise is None:
                raise ValueError("EulerAncestralScheduler.step needs noise= (the shape of x) at every step but the last")
            prev = prev + noise * up
        self._advance()
        return prev.astype(np.float32)


class DPMSolverPP2MScheduler(_Scheduler):
    """DPM-Solver++ 2M (multistep, second order; first order at the first and last steps), numerically the
    same as diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``, ``solver_order=2``."""

    name = "dpmpp-2m"
    DEFAULTS = dict(_COMMON, solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                    sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                    euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                    use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
                    lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace", steps_offset=0,
                    rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential")
    REFUSED = dict(_SIGMA_OPTIONS, thresholding=False, use_lu_lambdas=False, use_flow_sigmas=False, use_dynamic_shifting=False,
                   variance_type=None, final_sigmas_type=("zero", "sigma_min"),
                   solver_type=("midpoint", "heun", "logrho", "bh1", "bh2"))  # diffusers runs the last three as midpoint

    def __init__(self, config: dict):
        super().__init__(config)
        if self.options.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = 2**-24
        self.heun = self.options["solver_type"] == "heun"

    def _schedule(self, steps: int) -> tuple:
        o, ac = self.options, self.alphas_cumprod
        lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
        last = self.T - int(np.searchsorted(lam[::-1], o["lambda_min_clipped"]))
        spacing = o["timestep_spacing"]
        if spacing == "linspace":
            ts = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(0, steps + 1) * (last // (steps + 1))).round()[::-1][:-1] + int(o["steps_offset"])
        elif spacing == "trailing":
            ts = np.arange(last, 0, -self.T / steps).round() - 1
        else:
            raise UserError(f"timestep_spacing {spacing!r} is not supported by the runtime pipeline (leading, trailing, linspace)")
        ts = ts.astype(np.int64)
        full = np.sqrt((1 - ac) / ac)
        if o["use_karras_sigmas"]:
            sigmas = _karras(full[::-1].copy(), steps, None, None)
            ts = np.array([_sigma_to_t(s, np.log(full)) for s in sigmas])
            if o["beta_schedule"] != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sigmas = np.interp(ts, np.arange(0, len(full)), full)
        final = np.sqrt((1 - ac[0]) / ac[0]) if o["final_sigmas_type"] == "sigma_min" else 0
        return ts.astype(np.int64), np.concatenate([sigmas, [final]]).astype(np.float32)

    def _begin(self) -> None:
        self.outputs: list[np.ndarray] = []

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32, np.float32]:
        alpha = np.float32(1) / np.sqrt(sigma**2 + 1)
        s = sigma * alpha
        with np.errstate(divide="ignore"):
            return alpha, s, np.log(alpha) - np.log(s)

    def step(self, out: np.ndarray, t, x: np.ndarray, steps: int, *, noise=None) -> np.ndarray:
        i = self._index(t, steps)
        sigmas, n = self._cache[steps][1], len(self.timesteps(steps))
        o = self.options
        final_first = i == n - 1 and (o["euler_at_final"] or (o["lower_order_final"] and n < 15) or o["final_sigmas_type"] == "zero")
        alpha_s0, sigma_s0, lam_s0 = self._alpha_sigma(sigmas[i])
        if self.prediction == "epsilon":
            x0 = (x - sigma_s0 * out) / alpha_s0
        elif self.prediction == "v_prediction":
            x0 = alpha_s0 * x - sigma_s0 * out
        else:
            x0 = out
        self.outputs = [*self.outputs[-1:], x0]
        alpha_t, sigma_t, lam_t = self._alpha_sigma(sigmas[i + 1])
        with np.errstate(over="ignore"):
            h = lam_t - lam_s0
            em1 = np.exp(-h) - np.float32(1.0)
        if len(self.outputs) < 2 or final_first:
            prev = (sigma_t / sigma_s0) * x - (alpha_t * em1) * x0
        else:
            _, _, lam_s1 = self._alpha_sigma(sigmas[i - 1])
            m0, m1 = self.outputs[-1], self.outputs[-2]
            r0 = (lam_s0 - lam_s1) / h
            d1 = (np.float32(1.0) / r0) * (m0 - m1)
            prev = (sigma_t / sigma_s0) * x - (alpha_t * em1) * m0
            if self.heun:
                prev = prev + (alpha_t * (em1 / h + np.float32(1.0))) * d1
            else:
                prev = prev - np.float32(0.5) * (alpha_t * em1) * d1
        self._advance()
        return prev.astype(np.float32)


class DPMSolverPP2MKarrasScheduler(DPMSolverPP2MScheduler):
    """DPM-Solver++ 2M on Karras sigmas (``use_karras_sigmas=True``)."""

    name = "dpmpp-2m-karras"


class LCMScheduler(_Scheduler):
    """Latent consistency multistep sampling, numerically the same as diffusers' ``LCMScheduler``.

    ``timesteps(steps)`` takes ``steps`` evenly spaced indices of the ``original_inference_steps``-step
    schedule it was distilled on (999, 759, 499, 259 for 4 of 50). ``step`` applies the consistency
    boundary condition (``denoised = c_skip * x + c_out * x0``) and, except at the last step, re-noises
    ``denoised`` to the next timestep with ``noise``: the caller draws it (``stochastic`` is True), see the
    module docstring.
    """

    name = "lcm"
    stochastic = True
    SIGMA_DATA = 0.5
    DEFAULTS = dict(_COMMON, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", original_inference_steps=50,
                    clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
                    thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0, timestep_spacing="leading",
                    timestep_scaling=10.0, rescale_betas_zero_snr=False)
    REFUSED = {"thresholding": False}

    def __init__(self, config: dict):
        super().__init__(config)
        self.original_steps = int(self.options["original_inference_steps"])
        self.scaling = float(self.options["timestep_scaling"])
        self.clip = float(self.options["clip_sample_range"]) if self.options["clip_sample"] else None
        if not 1 <= self.original_steps <= self.T:
            raise UserError(f"original_inference_steps={self.original_steps} must be in 1..{self.T}")

    def timesteps(self, steps: int) -> np.ndarray:
        if not 1 <= steps <= self.original_steps:
            raise UserError(f"the LCM scheduler takes 1..{self.original_steps} steps (original_inference_steps), got {steps}")
        return super().timesteps(steps)

    def _schedule(self, steps: int) -> tuple:
        k = self.T // self.original_steps
        origin = (np.arange(1, self.original_steps + 1) * k - 1)[::-1]
        return (origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)].astype(np.int64),)

    def boundary(self, t: int) -> tuple[float, float]:
        """(c_skip, c_out) at timestep ``t``."""
        s = np.float32(t * self.scaling)
        sd2 = np.float32(self.SIGMA_DATA**2)
        return sd2 / (s**2 + sd2), s / np.sqrt(s**2 + sd2)

    def step(self, out: np.ndarray, t, x: np.ndarray, steps: int, *, noise: np.ndarray | None = None) -> np.ndarray:
        ts = self.timesteps(steps)
        where = np.nonzero(ts == t)[0]
        if not len(where):
            raise ValueError(f"timestep {t} is not one of the LCM scheduler's {steps}-step timesteps {ts.tolist()}")
        i, t = int(where[0]), int(t)
        x0 = self._x0(out, x, self.alphas_cumprod[t])
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


# name -> class: issue 13 added pndm, euler, euler-ancestral, dpmpp-2m(-karras) to ddim; issue 17 added lcm.
SCHEDULERS: dict[str, type] = {c.name: c for c in (DDIMScheduler, PNDMScheduler, EulerScheduler, EulerAncestralScheduler,
                                                   DPMSolverPP2MScheduler, DPMSolverPP2MKarrasScheduler, LCMScheduler)}


def from_config(config: dict, name: str | None = None):
    """The runtime scheduler for a diffusers scheduler config, or the scheduler ``name`` built from its values
    (as diffusers' ``SomeScheduler.from_config(config)``, plus what the name fixes, ``scheduler_names.NAMES``).

    Example:
        >>> from_config(json.loads(Path("scheduler/scheduler_config.json").read_text()), "euler")

    Raises:
        UserError: an unknown name, a config class the runtime has no scheduler for, or an option it cannot honour.
    """
    name, _, values = resolve(config, name)
    return SCHEDULERS[name](values)
