"""Quantization comparison: pocketfusion's W8 / W4 against what a user would pick instead, on one U-Net.

    python benchmarks/quant.py [--model DIR] [--prompts N] [--steps S] [--json OUT] [--skip WHAT,...]

Every row quantizes the same fp32 U-Net (default: the bundled demo model) and is measured the same way:

* **pocketfusion** — ``compress.quant.grid.rtn_grid`` (RTN, every layer at the same bits), RTN onto
  the calibrated model's per-layer bits (``compress.quant.rtn_like``: the equal-size baseline), and
  ``compress.quant.quantize(model, QuantConfig(method="gptq"), out)`` (calibrated, W4 with measured
  mixed precision); then the calibrated folders exported through each target of the backend
  registry (``export.api.export(model, ExportConfig(targets=(t,), components=("unet",)), out)``). A
  target whose exporter writes no quantized weights (no ``quantization`` block in its manifest
  entry) is reported "not available", with the reason.
* **peers on the same U-Net** — optimum-quanto ``quantize(weights=qint8|qint4); freeze``; torchao
  ``Int8WeightOnlyConfig`` (its default filter: Linear only) and ``IntxWeightOnlyConfig`` int8
  per-channel / int4 ``PerGroup(32)`` on Linear + Conv2d (layers whose input size is not a multiple
  of 32 stay fp32 at int4: torchao refuses them; ``Int4WeightOnlyConfig`` does not run on this CPU
  build: its plain format needs the ``mslk`` package, its ``opaque`` format is not in 0.18); onnxruntime
  ``quantize_dynamic`` int8 (per tensor, its default, and per channel) and ``MatMulNBitsQuantizer``
  4-bit on pocketfusion's fp32 ONNX U-Net; ai-edge-quantizer's stock recipes
  (``weight_only_wi8_afp32``, ``weight_only_wi4_afp32``, ``dynamic_wi8_afp32``) on pocketfusion's
  fp32 TFLite U-Net; coremltools ``palettize_weights`` (4-bit k-means) and ``linear_quantize_weights``
  (int8) on the fp32 ``.mlpackage``. Every file is found through the export manifest's typed
  components (``manifest.component("unet", target).path``).

Columns (all measured here):

* **size** — artifact file size (``.onnx`` / ``.tflite`` / ``.pte`` / ``.mlpackage`` directory)
  and its % of the same target's fp32 file; for PyTorch rows the ``torch.save`` size of the
  quantized U-Net's state dict (peers) or, for pocketfusion's grid (which PyTorch runs as fp32
  on-grid weights), the packed size the targets store: int8 1 byte, int4 ½ byte, fp16 scales,
  everything else fp32 (``compress.quant.weight_bytes``) — against the fp32 parameter bytes.
* **U-Net error** — on held-out calibration feeds (U-Net inputs recorded along real sampling
  trajectories of prompts not used to calibrate: ``calibration.resolve(...).unet_feeds("heldout")``),
  against the fp32 PyTorch U-Net, in ``pocketfusion.metrics``' names: ``rel_max``
  ``max|out - ref| / max|ref|`` (the export parity measure; the table's column), ``rel_rms``
  ``||out - ref|| / ||ref||`` and ``snr_db`` ``10 log10(sum ref^2 / sum (out - ref)^2)``.
* **image PSNR** — generated images vs the fp32 PyTorch pipeline, same prompts and seeds (image
  ``i`` seed ``--seed + i``): PyTorch rows through ``generate``; target rows through
  ``runtimes.pipeline.RuntimePipeline`` on a copy of the fp32 export directory with the quantized
  U-Net file swapped in (text encoder and decoder stay fp32 in that runtime).
* **prompt accuracy** — the model's prompt suite's evaluator on those images (``suite.evaluate``;
  demo-grammar models): mean over the five attributes, and every attribute in the JSON.
* **ms/call** — host latency of one U-Net call (batch 2, a CFG pair): median of ``--rounds`` x
  ``--runs`` calls, all rows interleaved round robin (this machine's speed drifts).

Core ML cannot run on Linux (``MLModel.predict`` needs macOS): Core ML rows report the package size,
and their error / images are computed by reading the weights back out of the package
(``coremltools.optimize.coreml.decompress_weights``) into the PyTorch U-Net — the weight
quantization's effect, not Core ML's kernels; no latency.

``--skip`` drops rows by tag (``pocketfusion``, ``rtn``, ``gptq``, ``fp32``, ``peers``, ``quanto``,
``torchao``, ``ort``, ``ai-edge-quantizer``, ``coremltools``, ``pytorch`` or a target of the backend
registry: ``onnx``, ``executorch``, ``tflite``, ``coreml``) or a measurement (``images``,
``latency``). Everything is written into a temporary directory that is removed at the end; the JSON
(every figure, per-image PSNRs, latency samples) goes to ``--json`` (default: a file in the system
temp directory, path printed).

Modules: ``rows`` (the row record, tags), ``measure`` (runners, errors, sizes), ``context`` (the
shared ``Bench``: fp32 exports, calibrated models, measuring one row), ``targets`` (rows on an
exported file, the U-Net swap), ``pocketfusion_rows``, ``peers_pytorch`` (quanto, torchao),
``peers_onnx`` (onnxruntime), ``peers_tflite`` (ai-edge-quantizer), ``peers_coreml`` and
``coreml_readback`` (coremltools), ``plan`` (every row in table order), ``output`` (table, JSON),
``cli`` (``main(argv)``).
"""

from pocketfusion.benchmarks.quant.cli import main, parse_args

__all__ = ["main", "parse_args"]
