"""The one backend registry: export target → runtime that runs it here → pip extra → modules.

Every place that needs to know which package serves a target reads this table; nothing else lists
targets, runtimes or extras. Backend modules are imported only when selected (``require``), so a
missing one fails with one line naming the extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

from pocketfusion.errors import MissingBackendError, UserError


@dataclass(frozen=True)
class Backend:
    target: str  # export target name (the CLI's --target)
    runtime: str  # the runtime that runs its files (the CLI's --runtime)
    extra: str  # pip extra that installs both exporter and runtime
    exporter: str  # module exporting to this target
    adapter: str  # runtime adapter module (runtimes/)
    export_probe: str  # top-level package the exporter needs
    runtime_probe: str  # top-level package the runtime needs
    extension: str  # file (or folder) extension of an exported component
    format: str  # artifact.Component.format of an exported component
    runs_on_linux: bool = True  # Core ML predicts on macOS only


BACKENDS: dict[str, Backend] = {
    "onnx": Backend("onnx", "onnxruntime", "onnx", "pocketfusion.export.onnx", "pocketfusion.runtimes.ort",
                    "onnx", "onnxruntime", ".onnx", "onnx"),
    "executorch": Backend("executorch", "executorch", "executorch", "pocketfusion.export.executorch",
                          "pocketfusion.runtimes.executorch", "executorch", "executorch", ".pte", "pte"),
    "tflite": Backend("tflite", "litert", "tflite", "pocketfusion.export.tflite", "pocketfusion.runtimes.litert",
                      "litert_torch", "ai_edge_litert", ".tflite", "tflite"),
    "coreml": Backend("coreml", "coreml", "coreml", "pocketfusion.export.coreml", "pocketfusion.runtimes.coreml",
                      "coremltools", "coremltools", ".mlpackage", "mlpackage", runs_on_linux=False),
}
TARGETS: tuple[str, ...] = tuple(BACKENDS)
RUNTIMES: tuple[str, ...] = tuple(b.runtime for b in BACKENDS.values())
_RUNTIME_ALIASES = {"onnx": "onnxruntime", "ort": "onnxruntime", "tflite": "litert"}
RUNTIME_CHOICES: tuple[str, ...] = RUNTIMES + tuple(_RUNTIME_ALIASES)


def backend(target: str) -> Backend:
    """The backend of export target ``target``.

    Raises:
        UserError: unknown target (lists the available ones).
    """
    if target not in BACKENDS:
        raise UserError(f"unknown target {target!r}; available: {', '.join(TARGETS)}")
    return BACKENDS[target]


def canonical_runtime(runtime: str) -> str:
    """``onnx``/``ort`` → ``onnxruntime``, ``tflite`` → ``litert``; unknown names raise ``UserError``."""
    name = _RUNTIME_ALIASES.get(runtime, runtime)
    if name not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; available: {', '.join(RUNTIMES)}")
    return name


def for_runtime(runtime: str) -> Backend:
    """The backend whose files ``runtime`` runs."""
    name = canonical_runtime(runtime)
    return next(b for b in BACKENDS.values() if b.runtime == name)


def check_targets(targets) -> tuple[str, ...]:
    """Validate a sequence of target names; returns it as a tuple."""
    targets = tuple(targets)
    bad = [t for t in targets if t not in BACKENDS]
    if bad:
        raise UserError(f"unknown target {', '.join(bad)}; available: {', '.join(TARGETS)}")
    return targets


def installed(target: str, *, runtime: bool = False) -> bool:
    """Whether the package the target's exporter (or runtime) needs is importable."""
    b = backend(target)
    return importlib.util.find_spec(b.runtime_probe if runtime else b.export_probe) is not None


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise a one-line error naming the pocketfusion extra that installs it."""
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        raise MissingBackendError(f"'{top}' is not installed. Run: pip install 'pocketfusion[{extra}]'")
    return importlib.import_module(module)


def exporter(target: str) -> ModuleType:
    """The exporter module of ``target`` (its package checked first)."""
    b = backend(target)
    require(b.export_probe, b.extra)
    return importlib.import_module(b.exporter)


def adapter(runtime: str) -> ModuleType:
    """The runtime adapter module of ``runtime`` (its package checked first)."""
    b = for_runtime(runtime)
    require(b.runtime_probe, b.extra)
    return importlib.import_module(b.adapter)
