"""The calibrate stage: ``calibrate(model, CalibrationConfig, out)``, and ``resolve`` (the set a command's
``--calib`` names). Prompts come from a ``pocketfusion.suite.PromptSuite``: the model's built-in suite
(``suite_for``) or a prompt file; calibration never imports the demo package."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pocketfusion.calibration.capture import CalibrationSet, capture, load, save
from pocketfusion.errors import UserError
from pocketfusion.suite import read_prompts, suite_for
from pocketfusion.validate import DEVICES, resolve_device

DEFAULT_PROMPTS = 32


@dataclass(frozen=True)
class CalibrationConfig:
    """What ``calibrate`` records.

    prompts: a text file, one prompt a line (None: the model's built-in prompt suite, drawn with ``seed``);
    n_prompts: the first N of the file, or N drawn from the suite (default: every line, or 32);
    steps, n_timesteps, guidance, seed: the sampling runs (``capture``);
    device: ``cpu`` or ``cuda``, where they run (``capture``; the noise is drawn on the CPU either way).
    """

    prompts: str | None = None
    n_prompts: int | None = None
    steps: int | None = None  # None: 20, or a distilled student's own step count (``capture_steps``)
    n_timesteps: int = 10
    guidance: float = 4.0
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.prompts, Path):
            object.__setattr__(self, "prompts", str(self.prompts))
        if self.n_prompts is not None and self.n_prompts < 1:
            raise UserError(f"--num-prompts must be >= 1, got {self.n_prompts}")
        if self.steps is not None and not 1 <= self.steps <= 1000:
            raise UserError(f"--steps must be in 1..1000, got {self.steps}")
        if not 1 <= self.n_timesteps <= (self.steps or 1000):
            raise UserError(f"--timesteps must be in 1..{self.steps} (the sampling steps), got {self.n_timesteps}")
        if not 0.0 <= self.guidance <= 50.0:
            raise UserError(f"--guidance must be in 0..50, got {self.guidance}")
        if self.device not in DEVICES:
            raise UserError(f"unknown device {self.device!r} (choose from {', '.join(DEVICES)})")

    def check_prompt_file(self) -> list[str] | None:
        """The prompt file's prompts (None without a file); raises ``UserError`` for a bad file, before any model is loaded."""
        return read_prompts(self.prompts, self.n_prompts) if self.prompts is not None else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(model, cfg: CalibrationConfig, out: str | Path, *, progress: bool = True, suite=None) -> CalibrationSet:
    """Capture a calibration set from ``model``'s sampling runs and save it as the artifact ``out`` (stage ``calibrate``).

    Args:
        model: a loaded pipeline (``checkpoint.Model``).
        cfg: prompts and sampling settings.
        suite: the ``PromptSuite`` to draw prompts from when ``cfg.prompts`` is None (default: ``suite_for(model)``).

    Raises:
        UserError: no prompt file and no built-in suite for the model, or any error of ``capture``.
    """
    resolve_device(cfg.device)  # UserError for cuda where there is none, before any work
    kw = {"steps": cfg.steps, "n_timesteps": cfg.n_timesteps, "guidance": cfg.guidance, "seed": cfg.seed, "progress": progress,
          "device": cfg.device}
    prompts = cfg.check_prompt_file()
    if prompts is not None:
        cset = capture(model, prompts, **kw)
    else:
        cset = resolve(model, None, n_prompts=cfg.n_prompts or DEFAULT_PROMPTS, suite=suite, **kw)
    save(cset, Path(out))
    return cset


def resolve(model, calib: str | Path | None, *, n_prompts: int | None = None, steps: int | None = None, n_timesteps: int = 10,
            guidance: float = 4.0, seed: int = 0, progress: bool = True, suite=None, device: str = "cpu") -> CalibrationSet:
    """The calibration set a command asked for with ``--calib``.

    ``None``: ``n_prompts`` (default 32) prompts drawn from ``suite`` (default: the model's built-in
    suite, ``suite_for(model)``: the demo model, or a pipeline with its tokenizer); a file: its
    prompts, captured now on ``device``; a directory: a saved set, validated against ``model`` (its own capture
    settings apply; it needs at least ``n_prompts``).

    Raises:
        UserError: no ``calib`` and no suite for the model, or any error of ``read_prompts``/``load``/``capture``.
    """
    if calib is None:
        suite = suite if suite is not None else suite_for(model)
        if suite is None:
            raise UserError(f"{model.path} is not the demo model, so the built-in prompts do not fit it: give --calib "
                            "PROMPTS.txt (one prompt a line) or a directory made by 'pocketfusion calibrate'")
        prompts = suite.calibration_prompts(n_prompts or DEFAULT_PROMPTS, seed)
    elif Path(calib).is_dir():
        cset = load(calib, model)
        if n_prompts is not None and len(cset.prompts) < n_prompts:
            raise UserError(f"calibration set {calib} holds {len(cset.prompts)} prompts, fewer than the {n_prompts} asked for")
        return cset
    else:
        prompts = read_prompts(calib, n_prompts)
    return capture(model, prompts, steps=steps, n_timesteps=n_timesteps, guidance=guidance, seed=seed, progress=progress,
                   device=device)
