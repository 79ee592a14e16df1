"""Value checks shared by the frozen configs' ``__post_init__`` (``TrainConfig``, ``DistillConfig``, ...)."""

from __future__ import annotations

import math
from typing import Any


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
