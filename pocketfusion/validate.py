"""Value checks shared by the frozen configs' ``__post_init__`` (``TrainConfig``, ``DistillConfig``, ...), and the one
resolution of a stage's ``--device`` (``resolve_device``)."""

from __future__ import annotations

import math
from typing import Any

DEVICES = ("cpu", "cuda")  # what a stage's ``device`` setting may name


def is_int(v: Any, low: int, high: float = math.inf) -> bool:
    """An int (not a bool) in ``low..high``."""
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def is_num(v: Any, low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False) -> bool:
    """A finite int or float (not a bool) between ``low`` and ``high`` (each end open or closed)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)


def config_from_dict(cls, d):
    """``cls(**d)`` for a frozen config dataclass, refusing keys it does not have (``UserError`` naming them)."""
    from dataclasses import fields

    from pocketfusion.errors import UserError

    names = [f.name for f in fields(cls)]
    if unknown := sorted(set(d) - set(names)):
        raise UserError(f"{cls.__name__}: unknown keys {unknown}; known: {names}")
    return cls(**d)


def resolve_device(name: str):
    """``torch.device(name)`` for a stage's ``device`` setting, checked before any work: ``UserError`` for a name
    not in ``DEVICES``, or for ``cuda`` where torch sees no CUDA device."""
    from pocketfusion.errors import UserError

    if name not in DEVICES:
        raise UserError(f"device={name!r}: one of {', '.join(DEVICES)}")
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda but torch {torch.__version__} sees no CUDA device; use --device cpu")
    return torch.device(name)
