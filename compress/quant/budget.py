"""What a quantize run will cost, said before it starts: the calibration budget (prompts x sampling steps, timesteps
recorded), the U-Net passes and GPTQ factorizations that follow, each in seconds from a U-Net call and a
factorization timed on this machine, on the run's device (``estimate``). ``QuantConfig``-free inputs are read from the
model."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pocketfusion.compress.quant import grid as G
from pocketfusion.compress.quant.feeds import batch_limit
from pocketfusion.compress.quant.gptq import column_blocks, hessian_dtype


@dataclass
class Estimate:
    """Seconds per part of a quantize run, and the figures they come from."""

    call_seconds: float
    parts: dict[str, float] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    device: str = "cpu"

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"unet_call_seconds": round(self.call_seconds, 3), "seconds": {k: round(v, 1) for k, v in self.parts.items()},
                "total_seconds": round(self.total, 1)}

    def text(self) -> str:
        on = "" if self.device == "cpu" else f" on {self.device}"
        return "\n".join([f"plan (estimated from a U-Net call timed here{on}, "
                          f"{_fmt(self.call_seconds)} at batch 2):"] + [f"  {ln}" for ln in self.lines]
                         + [f"  total about {_fmt(self.total)}"])


def _fmt(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.1f} s" if s < 120 else f"{s / 60:.0f} min"


def time_unet_call(model, device: str = "cpu") -> tuple[float, dict[str, int]]:
    """Seconds of one batch-2 (CFG) U-Net call at the model's native size on ``device`` (the U-Net moved there
    meanwhile; the second of two calls, on the CPU a large U-Net's first call alone), and each quantizable layer's
    input rows per sample as GPTQ sees them (positions of a convolution, tokens of a linear)."""
    import torch

    from pocketfusion.calibration.capture import on_device
    from pocketfusion.macs import component_inputs

    unet = model.unet
    dev = torch.device(device)
    rows: dict[str, int] = {}

    def hook(mod, a, n):
        x = a[0]
        if isinstance(mod, torch.nn.Conv2d):
            h, w = x.shape[-2:]
            sh, sw = mod.stride
            rows[n] = (h // sh) * (w // sw)
        else:
            rows[n] = x.numel() // x.shape[0] // x.shape[-1]

    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n, m in G.quantizable_layers(unet).items()]
    dt = []
    try:
        with on_device([unet], dev), torch.no_grad():
            args, kw = component_inputs(model, "unet", batch=2, device=dev)
            for _ in range(2 if _small(unet) or dev.type != "cpu" else 1):  # a large U-Net's first CPU call is as long as the next
                _sync(dev)
                t = time.perf_counter()
                unet(*args, **kw)
                _sync(dev)
                dt.append(time.perf_counter() - t)
    finally:
        for h in hooks:
            h.remove()
    return dt[-1], rows


def gemm_rate(device: str = "cpu") -> float:
    """Flop/s of a float32 ``xᵀx`` (the Hessian accumulation) at 4096 x 1536 rows x columns, best of three here on
    ``device``."""
    import torch

    dev = torch.device(device)
    x = torch.randn(4096, 1536, device=dev)
    best = math.inf
    for _ in range(4):
        _sync(dev)
        t = time.perf_counter()
        x.T @ x
        _sync(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * 4096 * 1536**2 / max(best, 1e-6)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _small(unet) -> bool:
    return sum(p.numel() for p in unet.parameters()) < 50_000_000


def factorization_rate(dtype, device: str = "cpu") -> float:
    """Flop/s of GPTQ's factorizations (Cholesky, its inverse, Cholesky again: about 4/3 n^3) at n = 1536, here on
    ``device``: the best of three after a warm-up (the wide layers' matrices run at least this fast)."""
    import torch

    n = 1536
    dev = torch.device(device)
    a = torch.randn(n, n, dtype=dtype, device=dev)
    h = a @ a.T / n
    h.diagonal().add_(1.0)
    best = math.inf
    for _ in range(4):
        _sync(dev)
        t = time.perf_counter()
        torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
        _sync(dev)
        best = min(best, time.perf_counter() - t)
    return (4 / 3) * n**3 / max(best, 1e-6)


def estimate(model, cfg, *, n_capture: int, steps: int, n_timesteps: int, n_calib_feeds: int, n_held_feeds: int,
             call_seconds: float | None = None) -> Estimate:
    """The run's parts in seconds, timed on ``cfg.device``. ``n_capture``: prompts sampled now (0 for a saved set); feeds
    are CFG pairs."""
    unet = model.unet
    t, rows = time_unet_call(model, cfg.device)
    t = t if call_seconds is None else call_seconds
    per_sample = t / 2
    e = Estimate(t, device=cfg.device)
    layers = G.quantizable_layers(unet)
    n_layers = len(layers)
    calib_samples = 2 * n_calib_feeds
    if n_capture:
        e.parts["calibrate"] = n_capture * steps * t
        e.lines.append(f"calibrate: {n_capture} prompts x {steps} sampling steps = {n_capture * steps} U-Net calls, "
                       f"{n_timesteps} timesteps recorded each -> {n_calib_feeds} calibration + {n_held_feeds} held-out feeds: "
                       f"{_fmt(e.parts['calibrate'])}")
    else:
        e.lines.append(f"calibrate: a saved set, {n_calib_feeds} calibration + {n_held_feeds} held-out feeds: no sampling")
    e.parts["forward order"] = t
    mixed = cfg.weight_bits == 4 and cfg.mixed_threshold is not None
    gptq = cfg.method == "gptq"
    if gptq:
        rates = {dt: factorization_rate(dt, cfg.device) for dt in {hessian_dtype(_cols(m)) for m in layers.values()}}
        fact = sum((4 / 3) * (b - a) ** 3 / rates[hessian_dtype(_cols(m))]
                   for m in layers.values() for a, b in column_blocks(_cols(m), cfg.gptq_max_cols))
        widest = max(_cols(m) for m in layers.values())
        passes = min(cfg.chunks, n_layers)
        hess = passes * calib_samples * per_sample * 0.55  # a pass stops after its chunk's last layer: about half a call
        gemm = gemm_rate(cfg.device)
        acc = sum(2 * rows.get(n, 0) * calib_samples * _cols(m) ** 2 for n, m in layers.items()) / gemm
        e.parts["gptq"] = hess + acc + fact
        e.lines.append(f"gptq: {passes} Hessian passes over {calib_samples} samples ({_fmt(hess)}), their x xᵀ "
                       f"({_fmt(acc)}), {n_layers} layers' factorizations, widest {widest} columns ({_fmt(fact)})")
    if mixed:
        sens_samples = 2 * min(cfg.sensitivity_feeds, n_calib_feeds)
        from pocketfusion.compress.quant.mixed import sensitivity_mode

        mode, why = sensitivity_mode(cfg, n_layers, sens_samples * per_sample)
        if mode == "measured":
            s = n_layers * sens_samples * per_sample + (e.parts.get("gptq", 0.0) if gptq else 0.0)
            e.lines.append(f"w4 sensitivity, measured: {n_layers} layers x a pass over {sens_samples} samples"
                           f"{' + one more GPTQ' if gptq else ''} ({why}): {_fmt(s)}")
        else:
            from pocketfusion.compress.quant.mixed import PROJECTIONS

            s = 2 * per_sample * (1 + 3 * PROJECTIONS)  # a backward pass with recomputation: about 3 forward passes
            e.lines.append(f"w4 sensitivity, projected ({why}): {_fmt(s)}")
        e.parts["sensitivity"] = s
    variants = 1 + (cfg.method != "rtn") + mixed
    held = (variants + 1) * 2 * n_held_feeds * per_sample
    e.parts["held-out error"] = held
    e.lines.append(f"held-out error: {variants} model(s) + fp32 over {2 * n_held_feeds} samples: {_fmt(held)}")
    if model.kind == "pipeline" and cfg.image_prompts:
        isteps = cfg.image_steps or steps
        img = cfg.image_prompts * isteps * (variants + 1) * t
        e.parts["images"] = img
        e.lines.append(f"images vs fp32: {cfg.image_prompts} prompts x {isteps} steps x {variants + 1} pipelines: {_fmt(img)}")
    if cfg.scheme in ("w8a8", "w8a16"):
        e.lines.append("activation bits: not estimated")
    return e


def _cols(m) -> int:
    return int(math.prod(m.weight.shape[1:]))


def capture_budget(model, cfg, n_prompts_default: int) -> tuple[int, int, int, int, int]:
    """(prompts sampled now, sampling steps, timesteps recorded, calibration feeds, held-out feeds) for ``cfg.calib``."""
    from pocketfusion.calibration import capture_steps, heldout_count
    from pocketfusion.suite import read_prompts

    steps, k = capture_steps(model, cfg.calib_steps, cfg.calib_timesteps)
    calib = cfg.calib
    if calib is not None and Path(calib).is_dir():
        from pocketfusion.calibration import load

        cset = load(calib)  # validated against the model when the run reads it
        return 0, steps, k, len(cset.unet_feeds("calib")), len(cset.unet_feeds("heldout"))
    n = len(read_prompts(calib, cfg.n_prompts)) if calib is not None else (cfg.n_prompts or n_prompts_default)
    held = heldout_count(n)
    return n, steps, k, (n - held) * k, held * k


def batch_note(model, cfg) -> str | None:
    """A line when a large U-Net's calibration passes take fewer samples per call than ``cfg.max_batch``."""
    b = batch_limit(model.unet, cfg.max_batch)
    return None if b >= cfg.max_batch else f"  calibration passes: {b} samples per U-Net call (activations within 2 GiB)"
