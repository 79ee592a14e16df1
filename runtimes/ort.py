"""onnxruntime adapter (CPU execution provider here).

Every session of a process shares one intra-op thread pool (onnxruntime's global pool), the way an
app that runs a text encoder, a U-Net and a VAE decoder in turn should: with one pool per session,
the idle pools' spinning workers compete with the running one for the same cores (measured on the
demo student's 4-step pipeline on a 2-core host: 48 ms an image with per-session pools, 34 ms with
one shared pool). A session asking for a thread count other than the shared pool's gets its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pocketfusion.runtimes.base import check_feeds, require

_shared_pool_threads: int | None = None


def _shared_pool(ort, threads: int | None) -> bool:
    """Size the process-wide pool on first use; True when a session of ``threads`` can use it."""
    global _shared_pool_threads
    want = threads or 0  # 0: onnxruntime's default, one thread a physical core
    if _shared_pool_threads is None:
        ort.set_global_thread_pool_sizes(want, 1)
        _shared_pool_threads = want
    return want == _shared_pool_threads


class OrtSession:
    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        ort = require("onnxruntime", "onnx")
        opts = ort.SessionOptions()
        if _shared_pool(ort, threads):
            opts.use_per_session_threads = False
        elif threads:
            opts.intra_op_num_threads = threads
        # A weight-only QDQ model (DequantizeLinear -> MatMul) is fused into MatMulNBits, whose
        # default accuracy level 4 quantizes the activations to int8 on the fly; level 1 keeps fp32
        # activations, i.e. computes what the graph says (quantized U-Nets from pocketfusion.export).
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        self._s = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_names = tuple(i.name for i in self._s.get_inputs())
        self.output_names = tuple(o.name for o in self._s.get_outputs())
        self.device = f"onnxruntime {ort.__version__} {self._s.get_providers()[0]}"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self, feeds)
        outs = self._s.run(None, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outs))


def load(path: Path, threads: int | None = None) -> OrtSession:
    return OrtSession(path, threads)
