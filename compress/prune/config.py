"""``PruneConfig``: every option of the U-Net pruning stage, named, frozen and validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pocketfusion.errors import UserError
from pocketfusion.validate import DEVICES, config_from_dict, is_int, is_num

PRESETS = ("bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny")
RUNTIMES = ("onnxruntime", "executorch", "litert")
CONFIG_VERSION = 1


@dataclass(frozen=True)
class PruneConfig:
    """How ``prune`` removes U-Net units and recovers the rest by knowledge distillation.

    What to remove:
        runtime: the runtime whose measured latency table drives the search (``onnxruntime``, ``executorch``, ``litert``).
        latency_budget: the fraction of the original per-call latency to reach (0.55: at most 55 %).
        preset: None (search) or a BK-SDM preset: ``bk-sdm-base`` (the mid-block), ``bk-sdm-small`` (plus one
            ResNet + attention pair per stage where the stage keeps one), ``bk-sdm-tiny`` (plus the innermost stage).
        max_remeasure: after the search, the pruned U-Net is exported and timed against the original; while it
            misses the budget, the search removes more and measures again, at most this many times.

    Training (``pocketfusion.training``; data-free: the teacher's own 50-step samples, noised at random timesteps):
        robust_iterations: SnapFusion's robust training before the search: every unit is dropped (replaced by its
            skip path) with probability ``drop_prob`` on each call, distilled from the teacher (0: skip).
        recovery_iterations: knowledge distillation of the pruned U-Net: ``task`` (the diffusion loss on the teacher's
            samples) + ``output_kd`` (the teacher's prediction) + ``feature_kd`` (each stage's output feature map, each
            term normalised by the teacher feature's mean square, as LAPTOP-Diff does) with these weights.
        score_samples: noised teacher samples the search scores each candidate on (teacher-vs-student error).
        n_pairs, teacher_batch, guidance_range, teacher_steps, cfg_dropout: the teacher samples, as ``distill`` makes them
            (``cfg_dropout``: share of training calls on the empty prompt, since the pruned U-Net still runs CFG).
        batch_size, lr, seed, device, checkpoint_every, resume, work_dir, keep_work: as ``distill``.
    """

    runtime: str = "onnxruntime"
    latency_budget: float = 0.55
    preset: str | None = None
    max_remeasure: int = 3
    robust_iterations: int = 300
    recovery_iterations: int = 1000
    drop_prob: float = 0.25
    task: float = 1.0
    output_kd: float = 1.0
    feature_kd: float = 1.0
    score_samples: int = 256
    n_pairs: int = 1024
    teacher_batch: int = 64
    guidance_range: tuple[float, float] = (2.0, 6.0)
    teacher_steps: int = 50
    cfg_dropout: float = 0.1
    prompts: str | None = None
    n_prompts: int | None = None
    batch_size: int = 32
    lr: float = 2e-4  # peak AdamW rate; warmup, then cosine decay to a tenth
    seed: int = 0
    device: str = "cpu"
    bench_runs: int = 10
    bench_rounds: int = 5
    checkpoint_every: int = 100
    resume: bool = False
    work_dir: str | None = None
    keep_work: bool = False
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "guidance_range", tuple(float(g) for g in self.guidance_range))
        except (TypeError, ValueError):
            raise UserError(f"PruneConfig: guidance_range={self.guidance_range!r}: two numbers (min, max)") from None
        for name in ("prompts", "work_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(getattr(self, name)))
        if problems := _problems(self):
            raise UserError("PruneConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "guidance_range": list(self.guidance_range)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PruneConfig:
        return config_from_dict(cls, d)


def _problems(c: PruneConfig) -> list[str]:
    g = c.guidance_range
    checks = [
        (c.version == CONFIG_VERSION, f"version={c.version!r}: only {CONFIG_VERSION}"),
        (c.runtime in RUNTIMES, f"runtime={c.runtime!r}: one of {', '.join(RUNTIMES)}"),
        (is_num(c.latency_budget, 0, 1, open_low=True, open_high=True), f"latency_budget={c.latency_budget!r}: a fraction in (0, 1)"),
        (c.preset is None or c.preset in PRESETS, f"preset={c.preset!r}: one of {', '.join(PRESETS)}"),
        (is_int(c.max_remeasure, 0), f"max_remeasure={c.max_remeasure!r}: an int >= 0"),
        (is_int(c.robust_iterations, 0), f"robust_iterations={c.robust_iterations!r}: an int >= 0"),
        (is_int(c.recovery_iterations, 0), f"recovery_iterations={c.recovery_iterations!r}: an int >= 0"),
        (is_num(c.drop_prob, 0, 1, open_high=True), f"drop_prob={c.drop_prob!r}: in [0, 1)"),
        (all(is_num(w, 0) for w in (c.task, c.output_kd, c.feature_kd)) and c.task + c.output_kd + c.feature_kd > 0,
         "task/output_kd/feature_kd: weights >= 0, not all 0"),
        (is_int(c.score_samples, 1), f"score_samples={c.score_samples!r}: an int >= 1"),
        (is_int(c.n_pairs, 1), f"n_pairs={c.n_pairs!r}: an int >= 1"),
        (is_int(c.teacher_batch, 1), f"teacher_batch={c.teacher_batch!r}: an int >= 1"),
        (len(g) == 2 and all(is_num(x, 1.0, 100.0) for x in g) and g[0] <= g[1], f"guidance_range={g!r}: 1 <= min <= max <= 100"),
        (is_int(c.teacher_steps, 2, 1000), f"teacher_steps={c.teacher_steps!r}: an int in 2..1000"),
        (is_num(c.cfg_dropout, 0, 1, open_high=True), f"cfg_dropout={c.cfg_dropout!r}: in [0, 1)"),
        (c.n_prompts is None or is_int(c.n_prompts, 1), f"n_prompts={c.n_prompts!r}: None or an int >= 1"),
        (is_int(c.batch_size, 1), f"batch_size={c.batch_size!r}: an int >= 1"),
        (is_num(c.lr, 0, open_low=True), f"lr={c.lr!r}: a float > 0"),
        (is_int(c.seed, 0, 2**31 - 1), f"seed={c.seed!r}: an int in [0, 2**31)"),
        (c.device in DEVICES, f"device={c.device!r}: one of {', '.join(DEVICES)}"),
        (is_int(c.bench_runs, 1) and is_int(c.bench_rounds, 1), "bench_runs, bench_rounds: ints >= 1"),
        (is_int(c.checkpoint_every, 0), f"checkpoint_every={c.checkpoint_every!r}: an int >= 0 (0: never)"),
        (isinstance(c.resume, bool) and isinstance(c.keep_work, bool), "resume, keep_work: bools"),
    ]
    return [msg for ok, msg in checks if not ok]
