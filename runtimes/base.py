"""One surface for every runtime: load an exported component, run it on numpy arrays.

    session = load_session("out/unet.onnx", "onnxruntime")
    outputs = session.run({"sample": x, "timestep": t, "encoder_hidden_states": c})
    session.device   # what it ran on, e.g. "CPUExecutionProvider"

Adapters import their runtime lazily; a missing one raises ``MissingBackendError`` naming the
extra to install. ``runtimes`` never imports ``export`` or ``compress``.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np

from pocketfusion.errors import MissingBackendError, UserError

# runtime name -> (adapter module, the pip extra that installs it)
RUNTIMES: dict[str, tuple[str, str]] = {
    "onnxruntime": ("pocketfusion.runtimes.ort", "onnx"),
    "executorch": ("pocketfusion.runtimes.executorch", "executorch"),
    "litert": ("pocketfusion.runtimes.litert", "tflite"),
    "coreml": ("pocketfusion.runtimes.coreml", "coreml"),
}
ALIASES = {"onnx": "onnxruntime", "tflite": "litert", "ort": "onnxruntime"}
# export target -> the runtime that runs its artifacts
TARGET_RUNTIME = {"onnx": "onnxruntime", "executorch": "executorch", "tflite": "litert", "coreml": "coreml"}


class Session(Protocol):
    runtime: str
    device: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise a one-line error naming the pocketfusion extra that installs it."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise MissingBackendError(f"'{module.split('.')[0]}' is not installed. Run: pip install 'pocketfusion[{extra}]'")
    return importlib.import_module(module)


def canonical(runtime: str) -> str:
    name = ALIASES.get(runtime, runtime)
    if name not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; available: {', '.join(RUNTIMES)}")
    return name


def load_session(path: str | Path, runtime: str, *, threads: int | None = None) -> Session:
    """Load one exported component file with ``runtime``."""
    name = canonical(runtime)
    path = Path(path)
    if not path.exists():
        raise UserError(f"artifact {path} does not exist")
    module = importlib.import_module(RUNTIMES[name][0])
    return module.load(path, threads=threads)


def check_feeds(session: Session, feeds: dict[str, np.ndarray]) -> None:
    missing = [n for n in session.input_names if n not in feeds]
    if missing:
        raise UserError(f"{session.runtime}: missing inputs {missing}; the component takes {list(session.input_names)}")
