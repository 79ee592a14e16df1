"""How onnxruntime runs a weight-only quantized ONNX graph: the kernel path chosen at export, by measurement.

The file always holds the grid's integers (``DequantizeLinear`` on int8 / int4 initializers). onnxruntime can run it
two ways, chosen by session options that the export stamps into the model's metadata (``METADATA_KEY``, read by
``runtimes.ort``):

* ``qdq``  - its QDQ fusions: int8 weights are dequantized on every call (DequantizeLinear -> Conv / MatMul), 4-bit
  MatMuls become ``MatMulNBits`` (accuracy level 1: fp32 activations, what the graph says);
* ``fold`` - ``session.disable_quant_qdq``: DequantizeLinear of an initializer is constant-folded when the session
  loads, so every call runs the fp32 kernels on exactly ``q * scale`` (the same numbers; weights held as fp32 in
  memory, the file stays int8 / int4).

Dynamic int8 activations (``quantize_dynamic``: DynamicQuantizeLinear + MatMulInteger / ConvInteger) were measured and
are not offered: on the demo's W8 4-step student (2-core AVX2 host, one thread) the U-Net's output SNR against the
on-grid fp32 graph was 21 dB (MatMuls only) / 19 dB (with convolutions), at 0.91x / 0.56x the fp32 speed. On a
2-core AVX-512 VNNI host, 8-bit ``MatMulNBits`` with int8 activations (accuracy level 4, blocks of 32 or 128) ran
at 0.4-0.9x an fp32 MatMul at the demo's shapes (one thread), and ConvInteger reaches about 35 GFLOP/s against 219
for fp32 convolutions (``bench``'s roofline probes). ``fold`` gives the fp32 graph's own kernels: after folding,
onnxruntime's optimized graph of the demo's W8 U-Net has the fp32 one's 712 nodes, op for op.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

METADATA_KEY = "pocketfusion.onnxruntime.session_config"
PATHS: dict[str, dict[str, str]] = {"qdq": {}, "fold": {"session.disable_quant_qdq": "1"}}


def _session(path: Path, config: dict[str, str]):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # the choice is made per core; both paths scale alike with threads
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    for k, v in config.items():
        opts.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def measure(path: Path, feeds: dict[str, np.ndarray], *, rounds: int = 3, runs: int = 3) -> dict[str, dict]:
    """Median per-call ms of each path on ``feeds`` (round robin, so both see the same host), and the largest
    absolute difference of the outputs against ``qdq``'s."""
    sessions = {name: _session(path, cfg) for name, cfg in PATHS.items()}
    names = {n: tuple(i.name for i in s.get_inputs()) for n, s in sessions.items()}
    outs = {n: s.run(None, {k: feeds[k] for k in names[n]}) for n, s in sessions.items()}  # also the warm-up
    samples: dict[str, list[float]] = {n: [] for n in sessions}
    for _ in range(rounds):
        for n, s in sessions.items():
            f = {k: feeds[k] for k in names[n]}
            t = time.perf_counter()
            for _ in range(runs):
                s.run(None, f)
            samples[n].append((time.perf_counter() - t) / runs * 1e3)
    ref = outs["qdq"]
    return {n: {"median_ms": float(np.median(v)), "samples_ms": [round(x, 3) for x in v],
                "max_abs_diff_vs_qdq": float(max(np.max(np.abs(a - b)) for a, b in zip(outs[n], ref)))}
            for n, v in samples.items()}


def choose(path: Path, feeds: dict[str, np.ndarray] | None, wanted: str) -> dict:
    """The path for the graph at ``path``: ``wanted`` (``fold`` / ``qdq``), or for ``auto`` the faster one measured
    on ``feeds``. Returns the manifest's record: ``chosen``, ``session_config``, ``why`` and the figures."""
    if wanted != "auto":
        return {"chosen": wanted, "session_config": PATHS[wanted], "why": f"forced (--onnx-weights {wanted})"}
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {"chosen": "qdq", "session_config": {}, "why": "onnxruntime not installed: nothing measured, its default kept"}
    if not feeds:
        return {"chosen": "qdq", "session_config": {}, "why": "no golden inputs to measure on: onnxruntime's default kept"}
    ms = measure(path, feeds)
    best = min(ms, key=lambda n: ms[n]["median_ms"])
    ratio = ms["qdq"]["median_ms"] / ms[best]["median_ms"]
    return {"chosen": best, "session_config": PATHS[best], "measured": ms,
            "why": f"measured at export (one thread, golden inputs): {best} {ratio:.2f}x the speed of qdq"
            if best != "qdq" else "measured at export (one thread, golden inputs): qdq the faster"}


def stamp(path: Path, config: dict[str, str]) -> None:
    """Write ``config`` into the graph's metadata (``METADATA_KEY``); external data, if any, is left as it is."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(config, sort_keys=True))
    onnx.save_model(model, str(path))
