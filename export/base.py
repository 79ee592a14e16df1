"""Shared types of the exporters: the config, the exporter protocol, parity errors.

An exporter is a module ``pocketfusion.export.<target>`` with::

    EXTENSION: str                 # ".onnx", ".pte", ".tflite", ".mlpackage"
    RUNTIME: str | None            # runtime that runs it here (runtimes.base.RUNTIMES), None if none
    def export_component(spec: ComponentSpec, path: Path, cfg: ExportConfig) -> dict: ...

``export_component`` writes ``path`` (a file, or a directory for .mlpackage) and returns JSON-able
facts for the manifest: ``rewrites`` (list of str: what was rewritten and why), ``notes``,
and target-specific figures (ExecuTorch: ``delegation``; Core ML: ``ops``...). It raises
``ExportError`` (naming component and target) when the converter fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pocketfusion.errors import UserError

TARGETS = ("onnx", "executorch", "tflite", "coreml")
EXPORTERS: dict[str, str] = {t: f"pocketfusion.export.{t}" for t in TARGETS}

# Parity tolerance per target, as relative error max|out-ref| / max|ref| over the golden inputs.
TOLERANCE: dict[str, float] = {"onnx": 1e-4, "executorch": 1e-4, "tflite": 1e-4, "coreml": 1e-4, "coreml-fp16": 2e-2}
# Quantized activations (static, calibrated: schemes w8a8 / w8a16) add their own error; the key is
# "<target>-a<bits>" with the lowest activation bit width the artifact uses
# (info["quantization"]["activation_bits"]). Measured on the demo U-Net (RTN w8 grid, ONNX, 65 calibration
# feeds from `pocketfusion calibrate`, golden feeds held out): a16 3.4e-3, a8 7.9e-2.
TOLERANCE.update({"onnx-a16": 1e-2, "onnx-a8": 0.25, "tflite-a16": 1e-2, "tflite-a8": 0.25})
# ExecuTorch/XNNPACK has no weight-only int8/int4 kernels: its int8-weight kernels quantize their
# input activations to int8 - per token at run time ("qd8", schemes w8 / w4 / w8a16) or statically
# from calibration (w8a8: "-a8"). Measured (RTN grids, rel. error vs the on-grid PyTorch U-Net):
# demo U-Net qd8 3.8e-2 (w8; worst golden feed, t=1), tiny fixture U-Nets 2.3e-2 (w8) / 2.6e-2 (w4).
TOLERANCE.update({"executorch-qd8": 0.1, "executorch-a8": 0.25})


class ExportError(UserError):
    """A converter could not express a component."""


class ParityError(UserError):
    """An exported component's outputs differ from PyTorch's beyond the target's tolerance."""


@dataclass(frozen=True)
class ExportConfig:
    targets: tuple[str, ...] = TARGETS
    components: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder")
    onnx_opset: int = 18
    coreml_deployment_target: str = "iOS17"  # or "iOS18"
    coreml_precision: str = "fp16"  # or "fp32"
    max_delegates: int = 8  # ExecuTorch: fail when the U-Net lowers into more XNNPACK blobs
    rewrite: bool = True  # apply the delegation / op rewrites
    check_parity: bool = True
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise UserError(f"unknown target {', '.join(bad) or '(none)'}; available: {', '.join(TARGETS)}")
        if self.coreml_deployment_target not in ("iOS17", "iOS18"):
            raise UserError(f"--coreml-target must be iOS17 or iOS18, got {self.coreml_deployment_target}")
        if self.coreml_precision not in ("fp16", "fp32"):
            raise UserError(f"--coreml-precision must be fp16 or fp32, got {self.coreml_precision}")
        if not 7 <= self.onnx_opset <= 21:
            raise UserError(f"--opset must be in 7..21, got {self.onnx_opset}")
        if self.max_delegates < 1:
            raise UserError(f"--max-delegates must be >= 1, got {self.max_delegates}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["components"] = list(self.components)
        return d
