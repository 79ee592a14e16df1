"""ONNX exporter: explicit opset, onnx.checker, external data above 2 GiB; runs in onnxruntime.

A component with a quantization grid (``spec.grid``) is lowered to QDQ weight-only int8 / int4 with
exactly the grid's integers (``pocketfusion.export.quant_onnx``), and for schemes with quantized
activations (w8a8 / w8a16) also gets static QDQ activation quantization from onnxruntime. The layer
map names each quantizable layer's initializer (the integers, for a grid layer).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from pocketfusion.backends import require
from pocketfusion.export.base import ExportConfig, Exported, ExportError
from pocketfusion.export.components import ComponentSpec

logger = logging.getLogger(__name__)

_PROTOBUF_LIMIT = 2 * 1024**3


def _tensor_bytes(model) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def export_component(spec: ComponentSpec, path: Path, cfg: ExportConfig) -> Exported:
    """Export ``spec.module`` to ``path`` with the legacy TorchScript-based exporter at ``cfg.onnx_opset``.

    With ``cfg.rewrite`` (the default) a diffusers model's plain attentions export as onnxruntime's fused
    ``com.microsoft`` ``MultiHeadAttention`` (``export.ort_attention``). Weights go to an external data file
    (``<name>.onnx.data``) when the model exceeds the 2 GiB protobuf limit. The graph is checked with
    ``onnx.checker`` (by path, so external data works).
    With ``spec.grid`` the grid layers are lowered to int8 / int4 (the opset is raised to 21 when
    a layer is 4-bit) and ``info["quantization"]`` says what the file holds.
    """
    import torch

    from pocketfusion.compress.quant.grid import quantizable_layers
    from pocketfusion.export import ort_attention, ort_paths, quant_onnx, winograd
    from pocketfusion.export.ort_attention import fused_attention

    onnx = require("onnx", "onnx")
    grid = spec.grid
    n_bytes = sum(p.numel() * p.element_size() for p in spec.module.parameters())
    external = n_bytes > _PROTOBUF_LIMIT * 0.9
    notes: list[str] = []
    rewrites: list[str] = []
    quant = None
    wino = None
    layer_map: dict[str, str] = {}
    wino_mode = cfg.winograd if cfg.rewrite else "off"
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = tmpdir / path.name
        args = spec.example_args()
        try:
            fuse = cfg.rewrite and ort_attention.has_candidates(spec.module)
            with torch.no_grad(), (fused_attention(spec.module) if fuse else contextlib.nullcontext(None)) as fused:
                torch.onnx.export(
                    spec.module, args, str(tmp), input_names=[s.name for s in spec.inputs],
                    output_names=[s.name for s in spec.outputs], opset_version=cfg.onnx_opset, dynamo=False,
                    do_constant_folding=True, custom_opsets={ort_attention.DOMAIN: 1} if fuse else None,
                )
                if fused is not None and fused():
                    rewrites.append(f"attention: {fused()} plain diffusers attentions as {ort_attention.DOMAIN} "
                                    "MultiHeadAttention (onnxruntime's fused kernel; export.ort_attention)")
        except Exception as e:  # the exporter raises many types; name the component
            raise ExportError(f"onnx: {spec.name} failed to export ({type(e).__name__}: {str(e).splitlines()[0]})") from e
        if grid is not None:
            model, quant, layer_map = quant_onnx.quantize(onnx.load(str(tmp)), spec, cfg, tmpdir)
            notes += quant["notes"]
            wino = winograd.rewrite(model, wino_mode)  # a grid's convolutions too: their integers stay in the file
            external = _tensor_bytes(model) > _PROTOBUF_LIMIT * 0.9
            for f in tmpdir.iterdir():
                if f.is_file():
                    f.unlink()
            if external:
                onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=path.name + ".data", size_threshold=1024)
            else:
                onnx.save_model(model, str(tmp))
            del model
            if not quant["activations"]:  # weight-only: how onnxruntime runs it, measured (export.ort_paths)
                quant["onnxruntime"] = ort_paths.choose(tmp, spec.golden[0] if spec.golden else None, cfg.onnx_weights)
                ort_paths.stamp(tmp, quant["onnxruntime"]["session_config"])
        else:
            model = onnx.load(str(tmp))
            layer_map = quant_onnx.weight_map(model, spec.source_module, quantizable_layers(spec.source_module))
            wino = winograd.rewrite(model, wino_mode)  # the layer map's weights stay: the Winograd graphs read them
            if external:
                onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=path.name + ".data", size_threshold=1024)
            elif wino["convs"]:
                onnx.save_model(model, str(tmp))
            del model
        onnx.checker.check_model(str(tmp), full_check=False)
        opset = {o.domain or "ai.onnx": o.version for o in onnx.load(str(tmp), load_external_data=False).opset_import}
        n_nodes = len(onnx.load(str(tmp), load_external_data=False).graph.node)
        # Keep the graph and its one external-data file; torch's own per-tensor external files
        # (written for models over 2 GiB) were folded into <name>.onnx.data above.
        keep = {path.name, path.name + ".data"} if external else {path.name}
        for f in tmpdir.iterdir():
            if f.name in keep:
                os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    if line := winograd.rewrite_line(wino, "at run time"):
        rewrites.append(line)
    info = {"opset": opset, "nodes": n_nodes, "external_data": external, "rewrites": rewrites, "notes": notes}
    if wino is not None:
        info["winograd"] = wino
    if quant is not None:
        info["quantization"] = quant
    return Exported(info, layer_map)
