"""ExecuTorch adapter: runs a ``.pte`` in ExecuTorch's Python runtime (portable kernels + XNNPACK, CPU).

A ``.pte`` keeps no tensor names, so the exporter writes ``<file>.pte.io.json``
(``{"inputs": [...], "outputs": [...]}``) beside it; without that file the inputs are taken
positionally as ``input_0, input_1, ...``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pocketfusion.errors import UserError
from pocketfusion.runtimes.base import check_feeds, require

logger = logging.getLogger(__name__)


def io_names_path(path: str | Path) -> Path:
    """Where the exporter stores a ``.pte``'s input/output names."""
    return Path(str(path) + ".io.json")


class ExecuTorchSession:
    """One loaded ``forward`` method of a ``.pte`` program, called with named numpy arrays."""

    runtime = "executorch"

    def __init__(self, path: Path, threads: int | None = None):
        rt_mod = require("executorch.runtime", "executorch")
        from executorch.version import __version__ as version
        if threads:
            # process-wide: ExecuTorch's Python runtime has one shared threadpool
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(int(threads))
        runtime = rt_mod.Runtime.get()
        try:
            self._program = runtime.load_program(str(path))
            self._method = self._program.load_method("forward")
        except Exception as e:  # the pybindings raise RuntimeError/ValueError with C++ status text
            raise UserError(f"executorch: cannot load {path} ({type(e).__name__}: {e})") from e
        meta = self._method.metadata
        names = io_names_path(path)
        if names.is_file():
            io = json.loads(names.read_text())
            self.input_names = tuple(io["inputs"])
            self.output_names = tuple(io["outputs"])
        else:
            logger.warning("executorch: %s not found; using positional input/output names", names.name)
            self.input_names = tuple(f"input_{i}" for i in range(meta.num_inputs()))
            self.output_names = tuple(f"output_{i}" for i in range(meta.num_outputs()))
        if len(self.input_names) != meta.num_inputs():
            raise UserError(f"executorch: {names.name} names {len(self.input_names)} inputs, the program takes {meta.num_inputs()}")
        backends = [b for b in runtime.backend_registry.registered_backend_names if b == "XnnpackBackend"]
        self.device = f"executorch {version.split('+')[0]} portable{'+XNNPACK' if backends else ''} (CPU)"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``forward`` on ``feeds`` (name -> array); returns name -> numpy array."""
        import torch

        check_feeds(self, feeds)
        inputs = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names]
        outs = self._method.execute(inputs)
        return {n: (o.detach().numpy().copy() if isinstance(o, torch.Tensor) else np.asarray(o)) for n, o in zip(self.output_names, outs)}


def load(path: Path, threads: int | None = None, *, shared_cores: bool = False) -> ExecuTorchSession:
    """Load the ``.pte`` at ``path`` (and its ``.io.json`` names) for ``run``."""
    return ExecuTorchSession(Path(path), threads)
