"""The seam through which a model's prompts and its evaluator reach the stages.

A ``PromptSuite`` is a prompt set (prompts a stage may calibrate or distill on, never the held-out
ones) plus held-out prompts and, where the model has one, an evaluator that scores images against
the prompts they were made from. Stages (calibration, compress, export, runtimes) take a suite or
ask ``suite_for(model)``; none imports ``pocketfusion.demo``. The demo model's suite is built in
``pocketfusion.demo.suite``; any other model gets its prompts from a text file
(``from_file``), without an evaluator.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketfusion.errors import UserError

Evaluator = Callable[[Sequence[Any], Sequence[str]], dict]
Distribution = Callable[..., dict]  # (images, prompts, seeds_images=None) -> {"frechet", "diversity", ...}


@dataclass(frozen=True)
class PromptSuite:
    name: str
    train_prompts: tuple[str, ...]
    heldout_prompts: tuple[str, ...] = ()
    evaluator: Evaluator | None = None  # (uint8 HWC images, their prompts) -> {"per_attribute", "all_correct", "n", ...}
    distribution: Distribution | None = None  # (images, prompts, seeds_images=None) -> {"frechet", "diversity", ...}

    def calibration_prompts(self, n: int, seed: int = 0) -> list[str]:
        """``n`` distinct training prompts, drawn with ``seed`` (never held-out prompts).

        Raises:
            UserError: ``n`` outside 1..len(train_prompts).
        """
        if not 1 <= n <= len(self.train_prompts):
            raise UserError(f"--num-prompts must be in 1..{len(self.train_prompts)} for the {self.name} prompt set, got {n}")
        return list(random.Random(seed).sample(list(self.train_prompts), n))

    def heldout(self, n: int | None = None) -> list[str]:
        """The first ``n`` held-out prompts (all by default)."""
        if not self.heldout_prompts:
            raise UserError(f"the {self.name} prompt set has no held-out prompts to evaluate on")
        if n is not None:
            if n < 1:
                raise UserError(f"--prompts must be >= 1, got {n}")
            if n > len(self.heldout_prompts):
                raise UserError(f"--prompts {n} exceeds the {len(self.heldout_prompts)} held-out prompts")
        return list(self.heldout_prompts[: n or len(self.heldout_prompts)])

    def evaluate(self, images: Sequence[Any], prompts: Sequence[str]) -> dict:
        """Score ``images`` against the prompts they were generated from."""
        if self.evaluator is None:
            raise UserError(f"the {self.name} prompt set has no evaluator (prompt accuracy needs the demo grammar)")
        return self.evaluator(images, prompts)

    def measure_distribution(
        self, images: Sequence[Any], prompts: Sequence[str], seeds_images: Mapping[str, Sequence[Any]] | None = None
    ) -> dict:
        """Distribution figures of ``images`` generated from ``prompts`` (one each): Fréchet distance against the
        data and, with ``seeds_images`` (prompt -> its images over several seeds), diversity across seeds."""
        if self.distribution is None:
            raise UserError(f"the {self.name} prompt set has no distribution measure (it needs the demo grammar's renderer)")
        return self.distribution(images, prompts, seeds_images=seeds_images)


def read_prompts(path: str | Path, n: int | None = None) -> list[str]:
    """Prompts of a text file, one a line (blank lines ignored); the first ``n`` when given.

    Raises:
        UserError: a missing or unreadable file, no prompts, or fewer than ``n``.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file {p} {'is not a file' if p.exists() else 'does not exist'} (expected a text file, one prompt a line)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompt file {p} is not UTF-8 text") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {p} holds no prompts (expected one prompt a line)")
    if n is not None:
        if n < 1:
            raise UserError(f"--num-prompts must be >= 1, got {n}")
        if len(prompts) < n:
            raise UserError(f"prompt file {p} holds {len(prompts)} prompts, fewer than the {n} asked for (--num-prompts)")
        prompts = prompts[:n]
    return prompts


def from_file(path: str | Path, n: int | None = None) -> PromptSuite:
    """A suite of a prompt file's prompts (no held-out prompts, no evaluator)."""
    return PromptSuite(name=str(path), train_prompts=tuple(read_prompts(path, n)))


def builtin(name: str) -> PromptSuite:
    """A built-in suite by name (``demo``)."""
    if name != "demo":
        raise UserError(f"unknown prompt suite {name!r}; built in: demo")
    from pocketfusion.demo.suite import demo_suite

    return demo_suite()


def suite_for(model) -> PromptSuite | None:
    """The built-in suite that fits ``model`` (the demo model, or a pipeline with its tokenizer), else None."""
    from pocketfusion.demo.suite import demo_suite, is_demo_compatible

    return demo_suite() if is_demo_compatible(model) else None


def require_suite(model, what: str = "this command") -> PromptSuite:
    """``suite_for(model)``, or a one-line error saying the model has no built-in prompts."""
    suite = suite_for(model)
    if suite is None:
        raise UserError(f"{model.path} is not the demo model: {what} needs the demo grammar's held-out prompts and metric")
    return suite
