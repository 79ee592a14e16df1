"""The distillation objectives, each a ``loss_fn(batch, ctx)`` for ``pocketfusion.training.train``.

Both draw every random number from ``ctx.rng`` (so a resumed run continues bit for bit) and read the
student through the consistency boundary condition, exactly what diffusers' ``LCMScheduler.step``
computes as ``denoised`` when sampling it.

* ``lcm``: latent consistency distillation as diffusers' ``train_lcm_distill_sd_wds.py`` does it, on
  the teacher's own samples instead of encoded images: a teacher sample ``x0`` is noised to a solver
  timestep ``t_{n+k}``; the guided teacher takes one DDIM step to ``t_n`` (``k = T / teacher_steps``);
  the student at ``t_{n+k}`` must match the EMA target network at ``t_n`` (Huber loss).
* ``regression``: the student maps the teacher's noise at ``t = T-1`` to the teacher's sample (MSE on
  x0). For 2 and 4 steps, a batch element is taken at one of the student's timesteps, drawn uniformly: at
  the first the pair's own noise, at the others the teacher's own trajectory from that noise (its DDIM
  state there), the target always the end of that trajectory. This is consistency distillation with the
  exact end point in place of the bootstrapped EMA target: every point of a trajectory maps to where the
  teacher's ODE takes it, so the student's LCM multistep sampling (re-noise, denoise) stays on targets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pocketfusion.compress.distill.student import Schedule, Shadow, guidance_embedding, lcm_timesteps, student_call
from pocketfusion.compress.distill.teacher import Conditioning, Pairs, cfg_kwargs


def _draw(pairs: Pairs, cond: Conditioning, batch_size: int, ctx) -> tuple:
    """A random batch of pairs on the device: (their indices, noise, x0, U-Net conditioning kwargs, guidance)."""
    idx = torch.randint(0, len(pairs), (batch_size,), generator=ctx.rng)
    dev = ctx.device
    return (idx, pairs.noise[idx].to(dev), pairs.latents[idx].to(dev), cond.take(pairs.prompt_index[idx]).kwargs(dev),
            pairs.guidance[idx].to(dev))


def lcm_loss(student, teacher, shadow: Shadow, schedule: Schedule, pairs: Pairs, cond: Conditioning, uncond: Conditioning,
             cfg) -> Callable:
    """Latent consistency distillation on teacher samples (see the module docstring)."""
    T, n_solver = schedule.T, cfg.teacher_steps
    topk = T // n_solver
    solver_ts = torch.arange(1, n_solver + 1) * topk - 1  # diffusers' DDIMSolver.ddim_timesteps
    sched = {}

    def loss_fn(batch, ctx) -> torch.Tensor:
        if ctx.iteration > 0 and ctx.micro_step == 0:
            shadow.update(student, cfg.ema_decay)  # the target follows the student after each optimizer step
        s = sched.setdefault(ctx.device, schedule.to(ctx.device))
        _, _, x0, c, g = _draw(pairs, cond, cfg.batch_size, ctx)
        index = torch.randint(0, n_solver, (cfg.batch_size,), generator=ctx.rng)
        start = solver_ts[index].to(ctx.device)
        t = (start - topk).clamp(min=0)
        noise = torch.randn(x0.shape, generator=ctx.rng).to(ctx.device)
        x_start = s.add_noise(x0, noise, start)
        w_emb = guidance_embedding(g, cfg.w_embedding_dim)
        pred = s.consistency(student_call(student, x_start, start, c, w_emb), start, x_start)
        with torch.no_grad():
            kw = cfg_kwargs(uncond.kwargs(ctx.device, len(x0)), c)
            out_u, out_c = teacher(torch.cat([x_start, x_start]), torch.cat([start, start]), **kw).sample.chunk(2)
            gw = g.reshape(-1, 1, 1, 1)
            x0_u, x0_c = s.x0(out_u, start, x_start), s.x0(out_c, start, x_start)
            e_u, e_c = s.eps(out_u, start, x_start), s.eps(out_c, start, x_start)
            x0_g, e_g = x0_u + gw * (x0_c - x0_u), e_u + gw * (e_c - e_u)
            x_prev = s.add_noise(x0_g, e_g, t)  # one DDIM step of the guided teacher, start -> t
            target = s.consistency(student_call(student, x_prev, t, c, w_emb, shadow.weights()), t, x_prev)
        d = pred.float() - target.float()
        return (torch.sqrt(d * d + cfg.huber_c**2) - cfg.huber_c).mean()

    return loss_fn


def regression_loss(student, schedule: Schedule, pairs: Pairs, cond: Conditioning, cfg) -> Callable:
    """Regression onto the teacher's samples at the student's timesteps (see the module docstring)."""
    ts = torch.tensor(lcm_timesteps(cfg.steps, cfg.teacher_steps, schedule.T))
    if cfg.steps > 1 and (pairs.states is None or list(pairs.state_timesteps) != ts[1:].tolist()):
        raise ValueError(f"regression for {cfg.steps} steps needs the teacher's trajectory at {ts[1:].tolist()}")
    sched = {}

    def loss_fn(batch, ctx) -> torch.Tensor:
        s = sched.setdefault(ctx.device, schedule.to(ctx.device))
        idx, noise_T, x0, c, g = _draw(pairs, cond, cfg.batch_size, ctx)
        if cfg.steps == 1:
            t, x_t = ts[[0] * cfg.batch_size].to(ctx.device), noise_T
        else:
            k = torch.randint(0, cfg.steps, (cfg.batch_size,), generator=ctx.rng)
            t = ts[k].to(ctx.device)
            on_path = pairs.states[idx, (k - 1).clamp(min=0)].to(ctx.device)  # states[:, j] is timestep ts[j + 1]
            x_t = torch.where((k == 0).to(ctx.device).reshape(-1, 1, 1, 1), noise_T, on_path)
        w_emb = guidance_embedding(g, cfg.w_embedding_dim)
        pred = s.consistency(student_call(student, x_t, t, c, w_emb), t, x_t)
        return torch.nn.functional.mse_loss(pred.float(), x0.float())

    return loss_fn
