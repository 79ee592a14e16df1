"""Core ML adapter: ``coremltools.models.MLModel`` on macOS; on Linux a one-line ``UserError``.

Core ML's runtime ships only with macOS / iOS: coremltools on Linux can build and inspect
``.mlpackage`` files but ``MLModel.predict`` is unavailable there.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from pocketfusion.errors import UserError
from pocketfusion.runtimes.base import check_feeds, require

logger = logging.getLogger(__name__)

COMPUTE_UNITS = ("CPU_AND_NE", "CPU_ONLY", "CPU_AND_GPU", "ALL")


class CoreMLSession:
    """An ML Program loaded for prediction on macOS (outputs are returned as float32 / int32 arrays)."""

    runtime = "coreml"

    def __init__(self, path: Path, compute_units: str = "CPU_AND_NE"):
        ct = require("coremltools", "coreml")
        if compute_units not in COMPUTE_UNITS:
            raise UserError(f"coreml: unknown compute units {compute_units!r}; available: {', '.join(COMPUTE_UNITS)}")
        self._model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
        desc = self._model.get_spec().description
        self.input_names = tuple(f.name for f in desc.input)
        self.output_names = tuple(f.name for f in desc.output)
        # Compute units are a request: Core ML decides per op where it runs (MLComputePlan tells).
        self.device = f"coremltools {ct.__version__} Core ML ({compute_units} requested)"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Predict on ``feeds`` (the package's input names); returns ``{output name: array}``."""
        check_feeds(self, feeds)
        outs = self._model.predict({n: np.ascontiguousarray(feeds[n]) for n in self.input_names})
        return {n: np.asarray(outs[n]) for n in self.output_names}


def load(path: Path, threads: int | None = None, compute_units: str = "CPU_AND_NE", *, shared_cores: bool = False) -> CoreMLSession:
    """Load an ``.mlpackage`` for prediction (macOS only; ``threads`` is ignored: Core ML schedules itself).

    Raises:
        UserError: on any platform but macOS, in one line.
    """
    if sys.platform != "darwin":
        here = "Linux" if sys.platform.startswith("linux") else sys.platform
        raise UserError(
            f"Core ML cannot run on {here}: MLModel.predict needs macOS; "
            "the exported package was validated statically, run it on a Mac or an iOS device"
        )
    return CoreMLSession(Path(path), compute_units)
