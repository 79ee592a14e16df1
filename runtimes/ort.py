"""onnxruntime adapter (CPU execution provider here).

Sessions that take turns on the same cores (the runtime pipeline's text encoder, U-Net and VAE decoder:
``shared_cores=True``) do not spin: with onnxruntime's default, each session's idle intra-op workers spin after
its run and take the cores from the next session's (measured on the demo student's 4-step pipeline on a
2-core host: 48-52 ms an image spinning, 37-40 ms not; a process-wide global pool measured 34-36 ms, but once
set every other session of the process, onnxruntime's own quantization tools' included, must use it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pocketfusion.runtimes.base import check_feeds, require

SESSION_CONFIG_KEY = "pocketfusion.onnxruntime.session_config"  # = export.ort_paths.METADATA_KEY (runtimes import no export)


class OrtSession:
    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None, *, shared_cores: bool = False, profile_prefix: str | None = None):
        ort = require("onnxruntime", "onnx")
        opts = ort.SessionOptions()
        if profile_prefix:  # onnxruntime's own per-node profiler (end_profiling() writes and names the JSON trace)
            opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
        if threads:
            opts.intra_op_num_threads = threads
        if shared_cores:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # A weight-only QDQ model (DequantizeLinear -> MatMul) is fused into MatMulNBits, whose
        # default accuracy level 4 quantizes the activations to int8 on the fly; level 1 keeps fp32
        # activations, i.e. computes what the graph says (quantized U-Nets from pocketfusion.export).
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        self._s = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        # The kernel path the export measured for a weight-only quantized graph (export.ort_paths), in its metadata:
        # applied by a second session (options must precede loading; a float graph has none and loads once).
        stamped = self._s.get_modelmeta().custom_metadata_map.get(SESSION_CONFIG_KEY)
        self.session_config = json.loads(stamped) if stamped else {}
        if self.session_config:
            for k, v in self.session_config.items():
                opts.add_session_config_entry(k, v)
            del self._s
            self._s = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_names = tuple(i.name for i in self._s.get_inputs())
        self.output_names = tuple(o.name for o in self._s.get_outputs())
        self.device = f"onnxruntime {ort.__version__} {self._s.get_providers()[0]}"

    def end_profiling(self) -> str:
        return self._s.end_profiling()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self, feeds)
        outs = self._s.run(None, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outs))


def load(path: Path, threads: int | None = None, *, shared_cores: bool = False) -> OrtSession:
    return OrtSession(path, threads, shared_cores=shared_cores)
