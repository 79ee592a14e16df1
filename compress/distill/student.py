"""The student U-Net and the diffusion arithmetic the distillation losses share.

The student is the teacher's ``UNet2DConditionModel`` with diffusers' own guidance input
(``time_cond_proj_dim``): the guidance scale ``g`` enters as ``timestep_cond = guidance_embedding(g, dim)``,
the sinusoidal embedding of ``g - 1`` that diffusers' ``LatentConsistencyModelPipeline`` computes (its
``get_guidance_scale_embedding(guidance_scale - 1)``). Its new ``time_embedding.cond_proj`` layer starts at
zero, so before training the student computes exactly the teacher's conditional branch.

Its output is read through the consistency boundary condition of diffusers' ``LCMScheduler``:
``c_skip(t) * x_t + c_out(t) * x0(t)``, ``x0`` from the teacher's prediction type (epsilon or v).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from pocketfusion import pruning
from pocketfusion.errors import UserError
from pocketfusion.guidance import guidance_embedding

__all__ = ["guidance_embedding", "make_student", "Schedule", "Shadow", "student_call", "lcm_timesteps"]

SIGMA_DATA = 0.5  # the consistency models' sigma_data (diffusers' LCMScheduler)
COND_PROJ = "time_embedding.cond_proj.weight"
PREDICTIONS = ("epsilon", "v_prediction")


def make_student(teacher, w_embedding_dim: int):
    """A float32 copy of ``teacher`` (a ``UNet2DConditionModel``) that takes the guidance embedding as ``timestep_cond``.

    Raises:
        UserError: the teacher already takes a guidance input (it is a distilled student).
    """
    from diffusers import UNet2DConditionModel

    if getattr(teacher.config, "time_cond_proj_dim", None) is not None:
        raise UserError(f"the U-Net already takes a guidance input (time_cond_proj_dim={teacher.config.time_cond_proj_dim}): "
                        "it is a distilled student; distill its teacher")
    config = {k: v for k, v in dict(teacher.config).items() if not k.startswith("_")}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": w_embedding_dim})
    pruning.remove(student, pruning.removed_units(teacher))  # a pruned teacher's units beyond its config
    missing, unexpected = student.load_state_dict({k: v.float() for k, v in teacher.state_dict().items()}, strict=False)
    if list(missing) != [COND_PROJ] or unexpected:
        raise UserError(f"the student does not take the teacher's weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student.float().train()


class Schedule:
    """The teacher's noise schedule as float32 tensors, and the conversions between predictions."""

    def __init__(self, scheduler_config: dict, timestep_scaling: float, device: torch.device | str = "cpu"):
        from diffusers import DDIMScheduler

        self.prediction = scheduler_config.get("prediction_type", "epsilon")
        if self.prediction not in PREDICTIONS:
            raise UserError(f"prediction_type {self.prediction!r} is not supported by distill (epsilon or v_prediction)")
        config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        self.T = int(config.get("num_train_timesteps", 1000))
        self.alphas_cumprod = DDIMScheduler.from_config(config).alphas_cumprod.to(device=device, dtype=torch.float32)
        self.scaling = float(timestep_scaling)

    def to(self, device: torch.device | str) -> Schedule:
        other = copy.copy(self)
        other.alphas_cumprod = self.alphas_cumprod.to(device)
        return other

    def _ab(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod[t].reshape(-1, *([1] * (ndim - 1)))
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._ab(t, x0.dim())
        return alpha * x0 + sigma * noise

    def x0(self, out: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._ab(t, x.dim())
        return alpha * x - sigma * out if self.prediction == "v_prediction" else (x - sigma * out) / alpha

    def eps(self, out: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._ab(t, x.dim())
        return alpha * out + sigma * x if self.prediction == "v_prediction" else out

    def boundary(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) of the consistency boundary condition at ``t`` (``LCMScheduler``'s, sigma_data 0.5)."""
        s = t.to(torch.float32) * self.scaling
        c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
        c_out = s / (s**2 + SIGMA_DATA**2) ** 0.5
        shape = (-1, *([1] * (ndim - 1)))
        return c_skip.reshape(shape), c_out.reshape(shape)

    def consistency(self, out: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The student's denoised sample: ``c_skip * x + c_out * x0`` (what ``LCMScheduler.step`` calls ``denoised``)."""
        c_skip, c_out = self.boundary(t, x.dim())
        return c_skip * x + c_out * self.x0(out, t, x)


def student_call(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict, w_emb: torch.Tensor,
                 weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The student's raw prediction; ``cond``: the U-Net's conditioning kwargs (``Conditioning.kwargs``);
    ``weights`` (name -> tensor) replace its parameters for this call (EMA target)."""
    if weights is None:
        return unet(x, t, timestep_cond=w_emb, **cond).sample
    return torch.func.functional_call(unet, weights, (x, t), {**cond, "timestep_cond": w_emb}).sample


class Shadow(nn.Module):
    """An EMA copy of a module's parameters, held as buffers: the training loop checkpoints and resumes
    them with the run, and no optimizer touches them."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.names = [n for n, _ in module.named_parameters()]
        for n, p in module.named_parameters():
            self.register_buffer(n.replace(".", "__"), p.detach().clone())

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n.replace(".", "__")) for n in self.names}

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float) -> None:
        for n, p in module.named_parameters():
            getattr(self, n.replace(".", "__")).lerp_(p.detach(), 1 - decay)

    def load_into(self, module: nn.Module) -> nn.Module:
        """A deep copy of ``module`` holding these weights."""
        out = copy.deepcopy(module)
        params = dict(out.named_parameters())
        with torch.no_grad():
            for n, t in self.weights().items():
                params[n].copy_(t)
        return out


def lcm_timesteps(steps: int, original_steps: int, T: int = 1000) -> list[int]:
    """The timesteps diffusers' ``LCMScheduler.set_timesteps(steps)`` gives (``original_inference_steps``)."""
    k = T // original_steps
    origin = [(i + 1) * k - 1 for i in range(original_steps)][::-1]
    return [origin[math.floor(i * len(origin) / steps)] for i in range(steps)]
