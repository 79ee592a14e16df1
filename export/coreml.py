"""Core ML exporter: an ML Program (``.mlpackage``) via coremltools, validated without a Mac.

Path: ``torch.export.export(module, args).run_decompositions({})`` -> ``coremltools.convert(...,
convert_to="mlprogram")`` with inputs and outputs named and typed from the component spec (float32
or int32 at the interface even when the compute precision is fp16). If the torch.export path fails,
the module is traced with ``torch.jit.trace`` and converted with explicit ``ct.TensorType`` inputs.

On Linux the package is checked statically: the saved spec is reloaded, its input / output names,
shapes and dtypes are compared with the component spec, and its MIL operations are counted by
type. Numerical parity needs macOS (``MLModel.predict`` is only supported there).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from pocketfusion.backends import require
from pocketfusion.export.base import ExportConfig, Exported, ExportError
from pocketfusion.export.components import ComponentSpec

logger = logging.getLogger(__name__)

PARITY_NOTE = "numerical parity needs macOS: MLModel.predict is only supported on macOS"

# Core ML ArrayFeatureType.ArrayDataType names -> numpy dtype names
_ARRAY_DTYPES = {"FLOAT32": "float32", "FLOAT16": "float16", "DOUBLE": "float64", "INT32": "int32", "INT8": "int8"}


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _io_types(ct, spec: ComponentSpec):
    inputs = [ct.TensorType(name=s.name, shape=s.shape, dtype=np.dtype(s.dtype).type) for s in spec.inputs]
    outputs = [ct.TensorType(name=s.name, dtype=np.dtype(s.dtype).type) for s in spec.outputs]
    return inputs, outputs


def _ct_convert(ct, model, notes: list[str], **kwargs):
    """``ct.convert`` that turns numpy's cast-overflow warnings into one note; other warnings pass on."""
    overflow = []
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message="overflow encountered in cast", category=RuntimeWarning)
        shown = warnings.showwarning

        def show(message, category, *args, **kw):
            if issubclass(category, RuntimeWarning) and "overflow encountered in cast" in str(message):
                overflow.append(message)
            else:
                shown(message, category, *args, **kw)

        warnings.showwarning = show
        mlmodel = ct.convert(model, **kwargs)
    if overflow:
        notes.append("a constant overflowed its cast during conversion (in fp16: a float32 extreme such as an "
                     "attention mask's minimum becomes -inf); check parity on macOS")
    return mlmodel


def _convert(ct, spec: ComponentSpec, cfg: ExportConfig, target: str | None = None) -> tuple[object, str, list[str]]:
    """(MLModel, frontend used, notes): torch.export first, torch.jit.trace as the fallback."""
    import torch

    kwargs = dict(
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, target or cfg.coreml_deployment_target),
        compute_precision=ct.precision.FLOAT16 if cfg.coreml_precision == "fp16" else ct.precision.FLOAT32,
    )
    args = spec.example_args()
    module = spec.module.eval()
    notes: list[str] = []
    try:
        with torch.no_grad():
            ep = torch.export.export(module, args).run_decompositions({})
        inputs, outputs = _io_types(ct, spec)
        return _ct_convert(ct, ep, notes, inputs=inputs, outputs=outputs, **kwargs), "torch.export", notes
    except Exception as e:  # coremltools and torch.export raise many types
        first = _first_line(e)
        logger.warning("coreml: torch.export path failed for %s (%s); falling back to torch.jit.trace", spec.name, first)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # diffusers' shape asserts; shapes are static
            traced = torch.jit.trace(module, args, strict=False)
        inputs, outputs = _io_types(ct, spec)
        notes = [f"torch.export path failed ({first}); converted from torch.jit.trace"]
        mlmodel = _ct_convert(ct, traced, notes, inputs=inputs, outputs=outputs, **kwargs)
    except Exception as e:
        raise ExportError(
            f"coreml: {spec.name} failed to convert via torch.export ({first}) and via torch.jit.trace ({_first_line(e)})"
        ) from e
    return mlmodel, "torch.jit.trace", notes


_HEAVY_OPS = ("conv", "conv_transpose", "linear", "matmul")


def _walk_ops(block):
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _walk_ops(inner)


def _all_ops(model_spec):
    for fn in model_spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            yield from _walk_ops(block)


def count_ops(model_spec) -> dict[str, int]:
    """MIL operation counts by type over every function and block of an ML Program spec."""
    return dict(Counter(op.type for op in _all_ops(model_spec)).most_common())


def heavy_op_dtypes(model_spec) -> dict[str, int]:
    """Output dtypes of the conv / linear / matmul ops: shows the compute precision actually used."""
    from coremltools.proto import MIL_pb2

    counts = Counter(
        MIL_pb2.DataType.Name(op.outputs[0].type.tensorType.dataType).lower()
        for op in _all_ops(model_spec) if op.type in _HEAVY_OPS and op.outputs
    )
    return dict(counts.most_common())


def _features(features) -> dict[str, tuple[tuple[int, ...], str]]:
    from coremltools.proto import FeatureTypes_pb2

    enum = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType
    out = {}
    for f in features:
        arr = f.type.multiArrayType
        name = enum.Name(arr.dataType) if arr.dataType in enum.values() else str(arr.dataType)
        out[f.name] = (tuple(int(d) for d in arr.shape), _ARRAY_DTYPES.get(name, name))
    return out


def validate_package(path: Path, spec: ComponentSpec) -> dict:
    """Reload the saved package's spec and check it against ``spec``; no Core ML runtime needed.

    Returns ``ops`` (counts by type), ``heavy_op_dtypes``, ``opset`` (e.g. ``CoreML7``),
    ``spec_version`` and ``io_check: "ok"``. Raises ``ExportError``
    listing every name, shape or dtype that differs, or when the package holds no ML Program.
    """
    ct = require("coremltools", "coreml")
    model_spec = ct.utils.load_spec(str(path))
    if model_spec.WhichOneof("Type") != "mlProgram":
        raise ExportError(f"coreml: {path} holds a {model_spec.WhichOneof('Type')}, not an ML Program")
    problems = []
    for kind, want, got in (
        ("input", spec.inputs, _features(model_spec.description.input)),
        ("output", spec.outputs, _features(model_spec.description.output)),
    ):
        if [s.name for s in want] != list(got):
            problems.append(f"{kind} names {list(got)} != spec {[s.name for s in want]}")
            continue
        for s in want:
            shape, dtype = got[s.name]
            if shape != tuple(s.shape) or dtype != s.dtype:
                problems.append(f"{kind} {s.name}: package {list(shape)} {dtype}, spec {list(s.shape)} {s.dtype}")
    ops = count_ops(model_spec)
    if not ops:
        problems.append("the program has no operations")
    if problems:
        raise ExportError(f"coreml: {spec.name} package check failed: {'; '.join(problems)}")
    opsets = sorted({fn.opset for fn in model_spec.mlProgram.functions.values()})
    return {
        "ops": ops, "heavy_op_dtypes": heavy_op_dtypes(model_spec), "opset": ",".join(opsets),
        "spec_version": int(model_spec.specificationVersion), "io_check": "ok",
    }


def _deployment_target(spec: ComponentSpec, cfg: ExportConfig) -> tuple[str, str | None]:
    """The deployment target to convert for, and why it was raised (4-bit weights need iOS18)."""
    from pocketfusion.export import quant_coreml as qc

    target = cfg.coreml_deployment_target
    if spec.grid is None or not qc.needs_ios18(spec.grid) or target == "iOS18":
        return target, None
    bumped = f"deployment target raised {target} -> iOS18: 4-bit (per-block int4) weights need iOS18"
    logger.info("coreml: %s: %s", spec.name, bumped)
    return "iOS18", bumped


def _quant_summary(spec: ComponentSpec, layer_map: dict, missing: dict, back: dict, target: str, bumped: str | None,
                   precision: str) -> dict:
    """The manifest's ``quantization`` block, logged in one line."""
    from pocketfusion.compress.quant.grid import quantizable_layers
    from pocketfusion.export import quant_coreml as qc

    grid = spec.grid
    n_float = len(set(quantizable_layers(spec.source_module)) - set(grid.layers))
    q = qc.summary(grid, layer_map, missing, n_float, target, bumped, precision)
    q["readback"] = {k: v for k, v in back.items() if k != "mismatch"}
    logger.info(
        "coreml/%s: %s -> %d int8 + %d int4 weight layers (%s), %d float%s; activations %s",
        spec.name, grid.scheme, q["layers_int8"], q["layers_int4"], ", ".join(f"{k} x{v}" for k, v in back["constexpr_ops"].items()),
        q["layers_float"], f"; {len(missing)} grid layers not found in the program, kept float" if missing else "",
        q["activations"],
    )
    return q


def _save(mlmodel, path: Path, spec: ComponentSpec, cfg: ExportConfig, layer_map: dict) -> tuple[dict, dict | None]:
    """Save the package atomically, validate it and (with a grid) read its integers back through the layer map."""
    from pocketfusion.export import quant_coreml as qc

    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    back = None
    try:
        tmp = tmpdir / path.name
        mlmodel.save(str(tmp))
        check = validate_package(tmp, spec)
        if spec.grid is not None:
            back = qc.readback(tmp, spec.grid, spec.source_module, layer_map, cfg.coreml_precision)
            if back["mismatch"]:
                raise ExportError(f"coreml: {spec.name}: the package does not hold the grid integers of {len(back['mismatch'])} "
                                  f"layers: {', '.join(back['mismatch'][:5])}")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return check, back


def export_component(spec: ComponentSpec, path: Path, cfg: ExportConfig) -> Exported:
    """Convert ``spec.module`` to an ML Program package at ``path`` (a directory) and validate it.

    Deployment target and compute precision come from ``cfg.coreml_deployment_target`` (iOS17 /
    iOS18) and ``cfg.coreml_precision`` (fp16 / fp32); interface tensors keep the spec's dtypes.
    Returns the layer map and ``ops`` (MIL op counts by type), ``compute_ops`` (all but ``const``),
    ``deployment_target``, ``precision``, ``frontend`` (torch.export or torch.jit.trace),
    ``heavy_op_dtypes``, ``opset``, ``spec_version``, ``io_check``, ``rewrites`` and ``notes``.

    With a quantization grid (``spec.grid``) the grid's layers are compressed with Core ML's own
    linear quantizer (``export.quant_coreml``: int8 per channel, int4 per block; 4-bit raises the
    deployment target to iOS18 and says so), the integers are read back from the saved package and
    compared with the grid bit for bit, and ``quantization`` is added (layers, fallbacks, read-back).

    Raises:
        ExportError: both conversion paths fail, the saved package disagrees with the spec, or it
            does not hold the grid's integers.
    """
    from pocketfusion.compress.quant.grid import quantizable_layers
    from pocketfusion.export import quant_coreml as qc

    ct = require("coremltools", "coreml")
    path = Path(path)
    target, bumped = _deployment_target(spec, cfg)
    mlmodel, frontend, notes = _convert(ct, spec, cfg, target)
    if spec.grid is not None:
        try:
            mlmodel, layer_map, missing = qc.quantize(mlmodel, spec.grid, spec.source_module, cfg.coreml_precision, spec.source)
        except Exception as e:  # coremltools raises many types
            raise ExportError(f"coreml: {spec.name}: weight quantization failed ({_first_line(e)})") from e
    else:
        layer_map = qc.weight_map(mlmodel, spec.source_module, quantizable_layers(spec.source_module), cfg.coreml_precision, spec.source)
    check, back = _save(mlmodel, path, spec, cfg, layer_map)
    ops = check["ops"]
    logger.info("coreml: %s -> %s via %s (%d MIL ops)", spec.name, path, frontend, sum(ops.values()))
    extra = {}
    if spec.grid is not None:
        extra["quantization"] = _quant_summary(spec, layer_map, missing, back, target, bumped, cfg.coreml_precision)
    info = {
        **extra,
        "ops": ops,
        "compute_ops": sum(n for t, n in ops.items() if t != "const"),
        "deployment_target": target,
        "precision": cfg.coreml_precision,
        "frontend": frontend,
        "heavy_op_dtypes": check["heavy_op_dtypes"],
        "opset": check["opset"],
        "spec_version": check["spec_version"],
        "io_check": check["io_check"],
        "rewrites": [],
        "notes": [*notes, PARITY_NOTE],
    }
    return Exported(info, layer_map)
