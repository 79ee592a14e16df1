"""One row of the quantization comparison, the levels it runs at and the tags ``--skip`` takes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from pocketfusion import backends

LEVELS: tuple[str, ...] = ("pytorch", *backends.TARGETS)  # where a quantized U-Net runs (or is stored)
TOOL_TAGS = ("pocketfusion", "rtn", "gptq", "fp32", "peers", "quanto", "torchao", "ort", "ai-edge-quantizer", "coremltools")
TAGS: tuple[str, ...] = TOOL_TAGS + LEVELS
MEASUREMENTS = ("images", "latency")


class NotAvailable(Exception):
    """A row that cannot be produced here; the message says why (reported, never faked)."""


@dataclass
class Row:
    name: str
    tool: str  # pocketfusion | optimum-quanto | torchao | onnxruntime | ai-edge-quantizer | coremltools | fp32
    level: str  # one of LEVELS: where the quantized U-Net runs (or is stored)
    bits: int  # nominal weight bits: 32, 8, 4
    bits_detail: str = ""  # e.g. "4 (12 layers 8)" for mixed precision
    status: str = "ok"  # ok | not available | failed
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    size_bytes: float | None = None
    size_kind: str = ""  # "file" | "torch.save" | "packed"
    fp32_bytes: float | None = None
    make_seconds: float | None = None
    error: dict | None = None  # rel_max, rel_rms, snr_db, feeds (pocketfusion.metrics names)
    images: dict | None = None  # image PSNR vs fp32
    accuracy: dict | None = None
    latency: dict | None = None
    extra: dict = field(default_factory=dict)
    # not serialised
    run: Callable | None = None  # feed dict -> noise_pred ndarray
    generate: Callable | None = None  # prompts -> (images, accuracy or None)
    time_it: bool = True  # include in the latency rounds

    @property
    def size_pct(self) -> float | None:
        if self.size_bytes is None or not self.fp32_bytes:
            return None
        return 100.0 * self.size_bytes / self.fp32_bytes

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("run", "generate", "time_it")}
        d["size_pct_of_fp32"] = self.size_pct
        return d


@dataclass(frozen=True)
class Planned:
    """A row to make: its identity, the tags ``--skip`` matches, and ``make(row)`` filling it in."""

    name: str
    tool: str
    level: str
    bits: int
    tags: frozenset[str]
    make: Callable[[Row], None]


def planned(name: str, tool: str, level: str, bits: int, tags, make: Callable[[Row], None]) -> Planned:
    return Planned(name, tool, level, bits, frozenset(tags), make)


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (a row's reason)."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
