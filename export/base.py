"""Shared types of the exporters: the stage config, the exporter protocol, parity tolerances, errors.

An exporter is the module ``pocketfusion.backends.backend(target).exporter`` with::

    def export_component(spec: ComponentSpec, path: Path, cfg: ExportConfig) -> Exported: ...

It writes ``path`` (a file, or a directory for ``.mlpackage``; ``path`` ends in the backend's
``extension``) and returns an ``Exported``: the JSON-able facts measured on it (``info``: ``rewrites``,
``notes`` and target-specific figures such as ExecuTorch's ``delegation`` or Core ML's ``ops``) and
the ``layer_map`` (PyTorch module name, relative to the spec's source module -> the name of the
tensor or node holding its weight in the written file; ``export.layer_map``). It raises
``ExportError`` (naming component and target) when the converter fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pocketfusion import backends
from pocketfusion.errors import UserError

# text_encoder_2: SDXL's second text encoder (exported only for a pipeline that has one)
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
# the model component (``checkpoint.Model.components`` key) each exported component wraps
SOURCES = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet", "vae_decoder": "vae"}

# Parity tolerance per target, as ``rel_max`` (``metrics.parity_error``: max |out - ref| / max |ref|
# over the golden inputs).
TOLERANCE: dict[str, float] = {"onnx": 1e-4, "executorch": 1e-4, "tflite": 1e-4, "coreml": 1e-4, "coreml-fp16": 2e-2}
# Quantized activations (static, calibrated: schemes w8a8 / w8a16) add their own error; the key is
# "<target>-a<bits>" with the lowest activation bit width the artifact uses
# (info["quantization"]["activation_bits"]). Measured on the demo U-Net (RTN w8 grid, ONNX, 65 calibration
# feeds from `pocketfusion calibrate`, golden feeds held out): rel_max a16 3.4e-3, a8 7.9e-2.
TOLERANCE.update({"onnx-a16": 1e-2, "onnx-a8": 0.25, "tflite-a16": 1e-2, "tflite-a8": 0.25})
# ExecuTorch/XNNPACK has no weight-only int8/int4 kernels: its int8-weight kernels quantize their
# input activations to int8 - per token at run time ("qd8", schemes w8 / w4 / w8a16) or statically
# from calibration (w8a8: "-a8"). Measured (RTN grids, rel_max vs the on-grid PyTorch U-Net):
# demo U-Net qd8 3.8e-2 (w8; worst golden feed, t=1), tiny fixture U-Nets 2.3e-2 (w8) / 2.6e-2 (w4).
TOLERANCE.update({"executorch-qd8": 0.1, "executorch-a8": 0.25})
# LiteRT's dynamic path (export.litert_paths) runs the same XNNPACK qd8 kernels.
TOLERANCE["tflite-qd8"] = TOLERANCE["executorch-qd8"]

EXECUTORCH_ACTIVATIONS = ("grid", "dynamic")


class ExportError(UserError):
    """A converter could not express a component."""


class ParityError(UserError):
    """An exported component's outputs differ from PyTorch's beyond the target's tolerance."""


ONNX_WEIGHTS = ("auto", "fold", "qdq")
WINOGRAD = ("auto", "on", "off")
TFLITE_WEIGHTS = ("auto", "dequantize", "dynamic")


@dataclass(frozen=True)
class ExportConfig:
    """Settings of the ``export`` stage (``export.export(model, ExportConfig, out)``).

    ``executorch_activations``: ``"grid"`` lowers a grid's static 8-bit activations (w8a8) as static
    int8 from the calibration set; ``"dynamic"`` lowers them as XNNPACK's dynamic per-token int8
    (measured on the demo U-Net, w8a8: rel_max 0.21 static vs 0.038 dynamic: XNNPACK's static
    kernels also requantize every conv/linear output). ``executorch_profile_runs``: ETDump runs that
    measure the share of ExecuTorch run time outside the XNNPACK delegates (0: not measured).
    ``onnx_weights``: how onnxruntime runs a weight-only quantized graph (the file holds the grid's integers
    either way): ``"qdq"`` keeps its QDQ fusions (DequantizeLinear on every call; 4-bit MatMuls fused into
    MatMulNBits), ``"fold"`` dequantizes the weights once when the session loads (fp32 kernels, fp32 weights in
    memory); ``"auto"`` times both on the golden inputs at export and keeps the faster (``export.ort_paths``).
    ``winograd``: 3x3 convolutions as Winograd F(4, 3) / F(2, 3) (``export.winograd``: fewer multiplies, more weight
    bytes). ONNX: graphs of onnxruntime's own kernels built from the file's weights (the file unchanged, the weights
    up to 4x the memory at run time); ``"auto"`` times each distinct shape at export and rewrites where faster.
    ExecuTorch / TFLite (float exports): a module rewrite whose transformed weights are stored (the file grows);
    ``"auto"`` takes only large maps with many channels (``winograd.xnnpack_tile``). ``"on"``: every convolution that
    fits; ``"off"``: none. Off with ``rewrite`` off.
    ``tflite_weights``: how LiteRT consumes a grid's int8 / int4 weights: ``"dequantize"`` (DEQUANTIZE, fp32 kernels: the
    on-grid numbers), ``"dynamic"`` (fed to the op directly: XNNPACK's qd8 kernels, int8 activations per call);
    ``"auto"`` times both at export and keeps ``dynamic`` when faster and above the quality floor (``export.litert_paths``).
    """

    targets: tuple[str, ...] = backends.TARGETS
    components: tuple[str, ...] = COMPONENTS
    onnx_opset: int = 18
    coreml_deployment_target: str = "iOS17"  # or "iOS18"
    coreml_precision: str = "fp16"  # or "fp32"
    max_delegates: int = 8  # ExecuTorch: fail when the U-Net lowers into more XNNPACK blobs
    rewrite: bool = True  # apply the delegation / op rewrites
    check_parity: bool = True
    seed: int = 0
    executorch_activations: str = "grid"  # or "dynamic"
    executorch_profile_runs: int = 4
    onnx_weights: str = "auto"  # a weight-only quantized ONNX graph in onnxruntime: "auto" (measured), "fold", "qdq"
    winograd: str = "auto"  # 3x3 convolutions as Winograd F(m, 3): "auto" (ONNX: measured per shape), "on", "off"
    tflite_weights: str = "auto"  # a grid's integer weights in LiteRT: "auto" (measured), "dequantize", "dynamic"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "components", tuple(self.components))
        if not self.targets:
            raise UserError(f"no target given; available: {', '.join(backends.TARGETS)}")
        backends.check_targets(self.targets)
        bad = [c for c in self.components if c not in COMPONENTS]
        if bad or not self.components:
            raise UserError(f"unknown component {', '.join(bad) or '(none)'}; available: {', '.join(COMPONENTS)}")
        if self.coreml_deployment_target not in ("iOS17", "iOS18"):
            raise UserError(f"--coreml-target must be iOS17 or iOS18, got {self.coreml_deployment_target}")
        if self.coreml_precision not in ("fp16", "fp32"):
            raise UserError(f"--coreml-precision must be fp16 or fp32, got {self.coreml_precision}")
        if not 7 <= self.onnx_opset <= 21:
            raise UserError(f"--opset must be in 7..21, got {self.onnx_opset}")
        if self.max_delegates < 1:
            raise UserError(f"--max-delegates must be >= 1, got {self.max_delegates}")
        if self.executorch_activations not in EXECUTORCH_ACTIVATIONS:
            raise UserError(f"executorch_activations must be one of {', '.join(EXECUTORCH_ACTIVATIONS)}, "
                            f"got {self.executorch_activations!r}")
        if self.onnx_weights not in ONNX_WEIGHTS:
            raise UserError(f"--onnx-weights must be one of {', '.join(ONNX_WEIGHTS)}, got {self.onnx_weights!r}")
        if self.winograd not in WINOGRAD:
            raise UserError(f"--winograd must be one of {', '.join(WINOGRAD)}, got {self.winograd!r}")
        if self.tflite_weights not in TFLITE_WEIGHTS:
            raise UserError(f"--tflite-weights must be one of {', '.join(TFLITE_WEIGHTS)}, got {self.tflite_weights!r}")
        if self.executorch_profile_runs < 0:
            raise UserError(f"executorch_profile_runs must be >= 0, got {self.executorch_profile_runs}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["components"] = list(self.components)
        return d


@dataclass(frozen=True)
class Exported:
    """What an exporter reports about a written component: measured facts and the layer map."""

    info: dict[str, Any]  # JSON-able; lands in the manifest's metrics["components"][key]
    layer_map: dict[str, str] = field(default_factory=dict)  # module name -> tensor/node name in the file


def tolerance(target: str, cfg: ExportConfig, info: dict | None = None) -> float:
    """The parity tolerance (``rel_max``) that applies to one exported component."""
    if target == "coreml" and cfg.coreml_precision == "fp16":
        return TOLERANCE["coreml-fp16"]
    quant = (info or {}).get("quantization") or {}
    if quant.get("tolerance_key") in TOLERANCE:  # the exporter names its case (e.g. "executorch-qd8")
        return TOLERANCE[quant["tolerance_key"]]
    bits = quant.get("activation_bits")
    if bits and f"{target}-a{bits}" in TOLERANCE:  # statically quantized activations
        return TOLERANCE[f"{target}-a{bits}"]
    return TOLERANCE[target]
