"""LiteRT adapter (ai-edge-litert's TFLite interpreter, CPU; XNNPACK delegate when it applies).

A model written by ``pocketfusion.export.tflite`` has a ``<model>.io.json`` beside it that maps
the component's tensor names onto the signature's positional ones (``args_0``..., ``output_0``...);
without it the signature's own names are used.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from pocketfusion.errors import UserError
from pocketfusion.runtimes.base import check_feeds, require

logger = logging.getLogger(__name__)


class LiteRTSession:
    """One ``.tflite`` model behind its signature runner, with the component's I/O names."""

    runtime = "litert"

    def __init__(self, path: Path, threads: int | None = None):
        litert = require("ai_edge_litert.interpreter", "tflite")
        import ai_edge_litert

        path = Path(path)
        io_path = Path(str(path) + ".io.json")
        io = json.loads(io_path.read_text()) if io_path.is_file() else None
        self.threads = int(threads) if threads else (os.cpu_count() or 1)
        try:
            self._interp = litert.Interpreter(model_path=str(path), num_threads=self.threads)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"litert: cannot load {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
        self.delegate_partitions = self._count_delegates()  # before any runner holds tensor views
        sigs = self._interp.get_signature_list()
        if not sigs:
            raise UserError(f"litert: {path} has no signature; re-export it with pocketfusion")
        key = io["signature"] if io else next(iter(sigs))
        if key not in sigs:
            raise UserError(f"litert: {path} has no signature {key!r} (has {list(sigs)})")
        self._runner = self._interp.get_signature_runner(key)
        if io:
            self._in_map = dict(io["input_map"])
            self._out_map = dict(io["output_map"])
            self.input_names = tuple(io["inputs"])
            self.output_names = tuple(io["outputs"])
        else:
            self.input_names = tuple(sigs[key]["inputs"])
            self.output_names = tuple(sigs[key]["outputs"])
            self._in_map = {n: n for n in self.input_names}
            self._out_map = {n: n for n in self.output_names}
        details = self._runner.get_input_details()
        self._dtypes = {n: np.dtype(details[self._in_map[n]]["dtype"]) for n in self.input_names}
        n = self.delegate_partitions
        where = f"XNNPACK delegate, {n} partition{'s' if n != 1 else ''}" if n else "builtin kernels"
        threads_s = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        self.device = f"ai-edge-litert {ai_edge_litert.__version__} CPU ({where}, {threads_s})"

    def _count_delegates(self) -> int:
        """Delegate nodes in the execution plan (XNNPACK is the only default delegate on CPU).

        Default delegates are applied lazily, on the first tensor allocation.
        """
        try:
            self._interp.allocate_tensors()
            return sum(1 for op in self._interp._get_ops_details() if op.get("op_name") == "DELEGATE")
        except Exception as e:  # private API: a failure only costs the device detail
            logger.debug("litert: could not list ops (%s)", e)
            return 0

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the signature on ``feeds`` (component names); returns ``{output name: array}``."""
        check_feeds(self, feeds)
        args = {self._in_map[n]: np.ascontiguousarray(feeds[n], dtype=self._dtypes[n]) for n in self.input_names}
        outs = self._runner(**args)
        return {n: outs[self._out_map[n]] for n in self.output_names}


def load(path: Path, threads: int | None = None, *, shared_cores: bool = False) -> LiteRTSession:
    """Load a ``.tflite`` file with ai-edge-litert; ``threads`` defaults to ``os.cpu_count()``
    (the interpreter's own default is a single thread)."""
    return LiteRTSession(path, threads)
