"""TFLite / LiteRT exporter: ``litert_torch.convert`` (no TensorFlow), run with ai-edge-litert.

The converted model has one signature, ``serving_default``, whose tensors litert-torch names by
position: inputs ``args_0, args_1, ...`` in the order of the module's positional arguments, outputs
``output_0, ...``. The exporter reads those names back from the written file, checks their
shapes and dtypes against the component spec and writes ``<path>.io.json`` beside the model::

    {"signature": "serving_default",
     "inputs": ["sample", "timestep", "encoder_hidden_states"],       # spec names, in order
     "outputs": ["noise_pred"],
     "input_map": {"sample": "args_0", ...}, "output_map": {"noise_pred": "output_0"}}

which ``pocketfusion.runtimes.litert`` uses to accept and return the spec's names.

litert-torch 0.10.0 converts every fixture family's U-Net, the CLIP text encoder and the VAE
decoder as they are, with errors around 1e-6: no op rewrite is needed for conversion. The one rewrite is for speed:
large 3x3 convolutions of a float export as Winograd F(4, 3) (``export.winograd.xnnpack_swapped``, ``--winograd``),
the only entry ``rewrites`` can have.

A component with a quantization grid (``spec.grid``) is converted on its grid (fp32) and then lowered
to weight-only int8 / int4 with exactly the grid's integers (``pocketfusion.export.quant_tflite``);
``info["quantization"]`` says what the file holds. The layer map names each quantizable layer's
weight tensor(s) (the integers, for a grid layer).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from pocketfusion.backends import require
from pocketfusion.export.base import ExportConfig, Exported, ExportError
from pocketfusion.export.components import ComponentSpec

logger = logging.getLogger(__name__)

SIGNATURE = "serving_default"
DYNAMIC_FORMAT = ("INT8 / INT4 per-axis and INT4 block-wise weights fed to CONV_2D / FULLY_CONNECTED (dynamic int8 "
                  "activations, XNNPACK qd8); int4 convolutions as FULLY_CONNECTED over im2col patches")


def io_json_path(path: Path) -> Path:
    """Where the I/O name mapping of the model at ``path`` is stored (``<path>.io.json``)."""
    return Path(str(path) + ".io.json")


@contextlib.contextmanager
def _quiet_progress():
    """Silence litert-torch's console progress (it prints, unless debug logging is on)."""
    key = "LITERT_TORCH_SHOW_PROGRESS"
    old = os.environ.get(key)
    if not logger.isEnabledFor(logging.DEBUG):
        os.environ[key] = "n"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


# --- conversion ------------------------------------------------------------------------------------


def _convert(module, args):
    import torch

    litert_torch = require("litert_torch", "tflite")
    with torch.no_grad(), _quiet_progress():
        return litert_torch.convert(module.eval(), args)


def _read_back(tflite_path: Path) -> tuple[dict, dict, dict[str, int]]:
    """(inputs, outputs, ops) of a written model: signature tensors as ``{name: (shape, dtype name)}``
    and builtin operator counts (all subgraphs, no delegate applied)."""
    litert = require("ai_edge_litert.interpreter", "tflite")
    interp = litert.Interpreter(
        model_path=str(tflite_path), num_threads=1,
        experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    sigs = interp.get_signature_list()
    if SIGNATURE not in sigs:
        raise ExportError(f"tflite: converted model has signatures {list(sigs)}, expected {SIGNATURE!r}")
    runner = interp.get_signature_runner(SIGNATURE)

    def table(details: dict) -> dict:
        return {k: (tuple(int(x) for x in d["shape"]), np.dtype(d["dtype"]).name) for k, d in details.items()}

    ops = dict(Counter(op["op_name"] for op in interp._get_ops_details()).most_common())
    return table(runner.get_input_details()), table(runner.get_output_details()), ops


def _positional(names, prefix: str) -> list[str]:
    """Signature names ``<prefix><i>`` sorted by index (``args_10`` after ``args_9``)."""
    picked = [n for n in names if n.startswith(prefix) and n[len(prefix):].isdigit()]
    return sorted(picked, key=lambda n: int(n[len(prefix):]))


def map_io(spec: ComponentSpec, sig_in: dict, sig_out: dict) -> dict:
    """The ``io.json`` mapping of ``spec``'s names onto the signature's ``args_i`` / ``output_i``.

    Raises ``ExportError`` when counts, shapes or dtypes disagree with the spec.
    """
    ins, outs = _positional(sig_in, "args_"), _positional(sig_out, "output_")
    if len(ins) != len(sig_in) or len(ins) != len(spec.inputs) or len(outs) != len(sig_out) or len(outs) != len(spec.outputs):
        raise ExportError(
            f"tflite: {spec.name} signature has inputs {sorted(sig_in)} and outputs {sorted(sig_out)}; "
            f"the spec has {len(spec.inputs)} inputs and {len(spec.outputs)} outputs"
        )
    problems = []
    for specs, names, table in ((spec.inputs, ins, sig_in), (spec.outputs, outs, sig_out)):
        for ts, n in zip(specs, names):
            shape, dtype = table[n]
            if tuple(shape) != tuple(ts.shape) or dtype != ts.dtype:
                problems.append(f"{ts.name}: spec {list(ts.shape)} {ts.dtype}, tflite {n} {list(shape)} {dtype}")
    if problems:
        raise ExportError(f"tflite: {spec.name} I/O differs from the spec: {'; '.join(problems)}")
    return {
        "signature": SIGNATURE,
        "inputs": [s.name for s in spec.inputs],
        "outputs": [s.name for s in spec.outputs],
        "input_map": {s.name: n for s, n in zip(spec.inputs, ins)},
        "output_map": {s.name: n for s, n in zip(spec.outputs, outs)},
    }


def export_component(spec: ComponentSpec, path: Path, cfg: ExportConfig) -> Exported:
    """Convert ``spec.module`` with litert-torch into ``path`` and write ``<path>.io.json`` beside it.

    Returns the layer map and JSON-able facts: ``signature``, ``io`` (the name mapping), ``ops`` (builtin op counts),
    ``rewrites`` (the Winograd line, if any), ``winograd`` and ``notes``.
    ``cfg.tflite_weights``: how a W8 grid's int8 weights are consumed (``export.litert_paths``).

    Raises:
        ExportError: the converter fails, or the converted signature disagrees with the spec.
    """
    from pocketfusion.compress.quant.grid import quantizable_layers
    from pocketfusion.export import layer_map as lm
    from pocketfusion.export import litert_paths, quant_tflite, winograd

    path = Path(path)
    mode = cfg.winograd if cfg.rewrite and spec.grid is None else "off"  # a grid's convolutions keep its integers
    try:
        with winograd.xnnpack_swapped(spec.module, spec.example_args(), mode) as wino:
            model = _convert(spec.module, spec.example_args())
    except Exception as e:  # the converter raises many types; name the component
        raise ExportError(f"tflite: {spec.name} failed to convert ({_first_line(e)})") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = tmpdir / path.name
        with _quiet_progress():
            model.export(str(tmp))
        del model
        quant = None
        float_tmp = tmpdir / ("float-" + path.name)
        if spec.grid is not None:
            shutil.copyfile(tmp, float_tmp)  # the on-grid float model: timed beside the quantized one (litert_paths.choose)
            quant, layer_map = quant_tflite.quantize(tmp, spec)
        else:
            layer_map = quant_tflite.weight_map(quant_tflite.read_model(tmp), spec.source_module, quantizable_layers(spec.source_module))
        sig_in, sig_out, ops = _read_back(tmp)
        io = map_io(spec, sig_in, sig_out)
        (tmpdir / (path.name + ".io.json")).write_text(json.dumps(io, indent=2) + "\n")
        if quant is not None:  # which kernels consume the int8 weights (export.litert_paths), and the speed against float
            shutil.copyfile(tmpdir / (path.name + ".io.json"), tmpdir / (float_tmp.name + ".io.json"))
            factors = {t: c for layer, c in quant["scale_factors"].items() for t in lm.split(layer_map[layer])}
            quant["litert"] = litert_paths.choose(tmp, spec, cfg.tflite_weights, float_path=float_tmp, factors=factors)
            vs = quant["litert"].get("versus_float")
            if vs is not None:
                quant["notes"].append(f"measured at export (one thread): {vs['speed']:.2f}x the float model's speed "
                                      f"({vs['quantized_ms']:.3f} vs {vs['float_ms']:.3f} ms a call; XNNPACK partitions "
                                      f"{vs['delegate_partitions']['quantized']} vs {vs['delegate_partitions']['float']})")
            if quant["litert"]["chosen"] == "dynamic":
                dyn = quant["litert"]["dynamic"]
                held = [n for n in spec.grid.layers if n not in quant["fallbacks"]]
                quant_tflite.check_held(tmp, spec, layer_map, held, quant["scale_factors"], moved=dyn["input_factors"],
                                        after="the dynamic path's rewrite")
                quant.update(format=DYNAMIC_FORMAT, tolerance_key="tflite-qd8")
                quant["notes"] = [n for n in quant["notes"] if quant_tflite.GROUPED_NOTE not in n]
                quant["notes"].append(f"{quant['litert']['dynamic_weights']} integer weights ({dyn['int8']} int8, {dyn['int4']} int4, "
                                      f"{dyn['grouped']} of them block-wise) feed their CONV_2D / FULLY_CONNECTED directly: XNNPACK "
                                      f"quantizes the activations per row on every call ({quant['litert']['why']})")
                if dyn["grouped"]:
                    quant["notes"].append("block-wise int4 weights need a LiteRT that reads the schema's BlockwiseQuantization "
                                          "(ai-edge-litert 2.3 here); for an older TFLite runtime export with "
                                          "--tflite-weights dequantize")
                if dyn["convs_as_fc"]:
                    quant["notes"].append(f"{dyn['convs_as_fc']} convolutions with int4 weights run as FULLY_CONNECTED "
                                          f"({dyn['im2col']} of them over im2col patches): XNNPACK has no dynamic int4 convolution")
                if dyn["input_factors"]:
                    quant["notes"].append(f"{len(dyn['input_factors'])} block-wise weights had a constant folded in by the converter: "
                                          "LiteRT's block scales are fp16, so the grid's scales are stored and the constant multiplies "
                                          "the op's input")
                if dyn["kept"]:
                    quant["notes"].append(f"{len(dyn['kept'])} int4 weights keep their DEQUANTIZE ("
                                          + "; ".join(sorted(set(dyn["kept"].values()))) + ")")
                _, _, ops = _read_back(tmp)
        layer_map = quant_tflite.compact_names(tmp, layer_map)
        size = tmp.stat().st_size
        os.replace(tmpdir / (path.name + ".io.json"), io_json_path(path))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    logger.info("tflite: %s -> %s (%d bytes, %d ops)", spec.name, path, size, sum(ops.values()))
    line = winograd.rewrite_line(wino, "in the file")
    info = {"signature": SIGNATURE, "io": io, "ops": ops, "rewrites": [line] if line else [], "notes": [], "winograd": wino}
    if quant is not None:
        info["notes"] += quant["notes"]
        info["quantization"] = quant
    return Exported(info, layer_map)
