"""Wall time and peak resident memory per step of a long command (``StepLog``).

Each step's peak is its own: on Linux the process's high-water mark (``VmHWM``) is reset at the start
of a step (``/proc/self/clear_refs``, value 5); elsewhere the figure is the peak since the process
started (``ru_maxrss``) and says so (``peak_scope``)."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _reset_peak() -> bool:
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` figure in KiB (None off Linux)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_kib() -> int:
    """The process's peak resident memory in KiB: ``VmHWM`` (since the last reset), else ``ru_maxrss``."""
    hwm = status_kib("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss


def peak_rss_gib() -> float:
    """The process's peak resident memory (since the last reset on Linux), GiB."""
    return peak_kib() / 2**20


@dataclass
class StepLog:
    """``with log.step("calibrate"): ...`` records each step's seconds, peak RSS and extra figures."""

    steps: list[dict[str, Any]] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self, name: str, **info: Any):
        own = _reset_peak()
        rec: dict[str, Any] = {"step": name, **info}
        t = time.perf_counter()
        try:
            yield rec
        finally:
            rec["seconds"] = round(time.perf_counter() - t, 2)
            rec["peak_rss_gib"] = round(peak_rss_gib(), 2)
            rec["peak_scope"] = "step" if own else "process"
            self.steps.append(rec)

    def to_list(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self.steps]

    def table(self) -> str:
        """One line a step: name, wall time, peak RSS."""
        lines = [f"  {'step':<28} {'wall':>9} {'peak RAM':>10}"]
        for s in self.steps:
            lines.append(f"  {s['step']:<28} {_fmt_s(s['seconds']):>9} {s['peak_rss_gib']:>7.2f} GiB")
        return "\n".join(lines)


def _fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"
