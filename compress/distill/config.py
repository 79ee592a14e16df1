"""``DistillConfig``: every option of the step-distillation stage, named, frozen and validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pocketfusion.errors import UserError
from pocketfusion.validate import DEVICES, config_from_dict, is_int, is_num

METHODS = ("lcm", "regression")
STEPS = (1, 2, 4)
PRECISIONS = ("none", "bf16", "fp16")
CONFIG_VERSION = 1


@dataclass(frozen=True)
class DistillConfig:
    """How ``distill`` trains a few-step student of a pipeline's U-Net, with the guidance scale as an input.

    Student and method:
        steps: the student's step count (1, 2 or 4): its scheduler's default and the timesteps it is trained for.
        method: ``lcm`` (latent consistency distillation: a skipping-step DDIM solver on the guided teacher,
            an EMA target network, Huber loss) or ``regression`` (the student maps the teacher's noise to the
            teacher's 50-step image in one call at t = T-1, read as x0; MSE; for 2 and 4 steps it also learns
            its other timesteps from points of the teacher's own trajectory, each mapped to that trajectory's end).
        w_embedding_dim: width of the sinusoidal guidance-scale embedding (``time_cond_proj_dim``).
        ema_decay: ``lcm``: decay of the EMA target network (the weights saved as the student).
        huber_c: ``lcm``: the Huber loss's c.
        timestep_scaling: the consistency boundary condition's timestep scaling (``LCMScheduler.timestep_scaling``).

    Teacher (data-free: it makes every target):
        teacher: None (the input model's own U-Net) or another pipeline whose U-Net makes the targets while the
            student starts from the input's: distill a pruned model from its unpruned original (same text encoder,
            scheduler and latent space), as SnapFusion does.
        guidance_range: (min, max) classifier-free guidance scale, drawn uniformly per teacher sample (diffusers'
            convention: 1 is no guidance); the student is told the scale through its embedding.
        teacher_steps: DDIM steps of the teacher's samples and of the LCM solver's schedule (``original_inference_steps``).
        n_pairs: teacher samples (noise -> image) made before training, and cached for ``resume``.
        teacher_batch: teacher samples per batch while making them.
        prompts: None (the model's built-in prompt suite, training prompts only) or a text file, one prompt a line.
        n_prompts: prompts drawn (None: every prompt of the file, or min(training prompts, n_pairs) of the suite).

    Training (``pocketfusion.training``):
        iterations, batch_size, lr (AdamW), grad_clip, seed, device, checkpoint_every, resume.
        precision: ``none``, ``bf16`` (autocast) or ``fp16`` (cuda only), as ``TrainConfig.precision``.
        gradient_checkpointing: recompute the student's activations in the backward pass (less memory, slower).
        work_dir: checkpoints and cached teacher samples (None: ``.<out name>.distill-work`` beside the output);
            removed when the artifact is written unless ``keep_work``.
    """

    steps: int = 4
    method: str = "regression"  # measured best at every step count on the demo at equal budget (README, benchmarks/distill.py)
    iterations: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    grad_clip: float | None = 1.0
    guidance_range: tuple[float, float] = (2.0, 6.0)
    teacher_steps: int = 50
    w_embedding_dim: int = 256
    ema_decay: float = 0.95
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    n_pairs: int = 1024
    teacher_batch: int = 64
    prompts: str | None = None
    n_prompts: int | None = None
    teacher: str | None = None
    seed: int = 0
    device: str = "cpu"
    precision: str = "none"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    resume: bool = False
    work_dir: str | None = None
    keep_work: bool = False
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "guidance_range", tuple(float(g) for g in self.guidance_range))
        except (TypeError, ValueError):
            raise UserError(f"DistillConfig: guidance_range={self.guidance_range!r}: two numbers (min, max)") from None
        if self.prompts is not None:
            object.__setattr__(self, "prompts", str(self.prompts))
        if self.teacher is not None:
            object.__setattr__(self, "teacher", str(self.teacher))
        if self.work_dir is not None:
            object.__setattr__(self, "work_dir", str(self.work_dir))
        if problems := _problems(self):
            raise UserError("DistillConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists), ``version`` included."""
        return {**asdict(self), "guidance_range": list(self.guidance_range)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DistillConfig:
        """Inverse of ``to_dict``; raises UserError on an unknown key or ``version`` or a bad value."""
        return config_from_dict(cls, d)

    def check_prompt_file(self) -> None:
        """Fail early (before loading a model) on a prompts file that does not exist."""
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise UserError(f"--prompts {self.prompts} is not a file (expected a text file, one prompt a line)")




def _problems(c: DistillConfig) -> list[str]:
    g = c.guidance_range
    checks = [
        (c.version == CONFIG_VERSION, f"version={c.version!r}: only {CONFIG_VERSION}"),
        (c.steps in STEPS and is_int(c.steps, 1), f"steps={c.steps!r}: one of 1, 2, 4"),
        (c.method in METHODS, f"method={c.method!r}: one of {', '.join(METHODS)}"),
        (is_int(c.iterations, 1), f"iterations={c.iterations!r}: an int >= 1"),
        (is_int(c.batch_size, 1), f"batch_size={c.batch_size!r}: an int >= 1"),
        (is_num(c.lr, 0, open_low=True), f"lr={c.lr!r}: a float > 0"),
        (c.grad_clip is None or is_num(c.grad_clip, 0, open_low=True), f"grad_clip={c.grad_clip!r}: None or > 0"),
        (len(g) == 2 and all(is_num(x, 1.0, 100.0) for x in g) and g[0] <= g[1],
         f"guidance_range={g!r}: (min, max) with 1 <= min <= max <= 100 (1: no guidance)"),
        (is_int(c.teacher_steps, 2, 1000), f"teacher_steps={c.teacher_steps!r}: an int in 2..1000"),
        (not is_int(c.teacher_steps, 1) or c.steps not in STEPS or c.steps <= c.teacher_steps,
         f"steps={c.steps!r} exceeds teacher_steps={c.teacher_steps!r}"),
        (is_int(c.w_embedding_dim, 4) and c.w_embedding_dim % 2 == 0, f"w_embedding_dim={c.w_embedding_dim!r}: an even int >= 4"),
        (is_num(c.ema_decay, 0, 1, open_low=True, open_high=True), f"ema_decay={c.ema_decay!r}: a float in (0, 1)"),
        (is_num(c.huber_c, 0, open_low=True), f"huber_c={c.huber_c!r}: a float > 0"),
        (is_num(c.timestep_scaling, 0, open_low=True), f"timestep_scaling={c.timestep_scaling!r}: a float > 0"),
        (is_int(c.n_pairs, 1), f"n_pairs={c.n_pairs!r}: an int >= 1"),
        (is_int(c.teacher_batch, 1), f"teacher_batch={c.teacher_batch!r}: an int >= 1"),
        (c.n_prompts is None or is_int(c.n_prompts, 1), f"n_prompts={c.n_prompts!r}: None or an int >= 1"),
        (is_int(c.seed, 0, 2**31 - 1), f"seed={c.seed!r}: an int in [0, 2**31)"),
        (c.device in DEVICES, f"device={c.device!r}: one of {', '.join(DEVICES)}"),
        (is_int(c.checkpoint_every, 0), f"checkpoint_every={c.checkpoint_every!r}: an int >= 0 (0: never)"),
        (isinstance(c.resume, bool), f"resume={c.resume!r}: a bool"),
        (c.precision in PRECISIONS, f"precision={c.precision!r}: one of {', '.join(PRECISIONS)}"),
        (not (c.precision == "fp16" and c.device == "cpu"), "precision='fp16' needs device='cuda'; use 'bf16' on cpu"),
        (isinstance(c.gradient_checkpointing, bool), f"gradient_checkpointing={c.gradient_checkpointing!r}: a bool"),
        (isinstance(c.keep_work, bool), f"keep_work={c.keep_work!r}: a bool"),
    ]
    return [msg for ok, msg in checks if not ok]
