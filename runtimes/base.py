"""One surface for every runtime: load an exported component, run it on numpy arrays.

    session = load_session("out/unet.onnx", "onnxruntime")
    outputs = session.run({"sample": x, "timestep": t, "encoder_hidden_states": c})
    session.device   # what it ran on, e.g. "CPUExecutionProvider"

Adapters import their runtime lazily; a missing one raises ``MissingBackendError`` naming the
extra to install. ``runtimes`` never imports ``export`` or ``compress``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from pocketfusion.backends import canonical_runtime as canonical
from pocketfusion.backends import require
from pocketfusion.errors import UserError

__all__ = ["Session", "canonical", "check_feeds", "load_session", "require"]


class Session(Protocol):
    runtime: str
    device: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def load_session(path: str | Path, runtime: str, *, threads: int | None = None, shared_cores: bool = False) -> Session:
    """Load one exported component file with ``runtime`` (the adapter named by ``pocketfusion.backends``).

    ``shared_cores``: the session takes turns with others on the same cores (a pipeline's components); a runtime
    whose idle workers would spin against the others' (onnxruntime) lets them sleep."""
    from pocketfusion import backends

    path = Path(path)
    if not path.exists():
        raise UserError(f"artifact {path} does not exist")
    return backends.adapter(runtime).load(path, threads=threads, shared_cores=shared_cores)


def check_feeds(session: Session, feeds: dict[str, np.ndarray]) -> None:
    missing = [n for n in session.input_names if n not in feeds]
    if missing:
        raise UserError(f"{session.runtime}: missing inputs {missing}; the component takes {list(session.input_names)}")
