"""Peers on pocketfusion's fp32 ``.mlpackage``: coremltools ``linear_quantize_weights`` and ``palettize_weights``."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from pocketfusion.benchmarks.quant.measure import quiet
from pocketfusion.benchmarks.quant.rows import Planned, planned
from pocketfusion.benchmarks.quant.targets import artifact_peer

KINDS = {8: ("linear8", "coremltools linear_quantize_weights int8"), 4: ("palettize4", "coremltools palettize_weights 4-bit k-means")}


def peer_coreml(mlpackage: Path, out: Path, kind: str) -> Path:
    """coremltools on an fp32 ``.mlpackage``: ``palettize4`` (k-means 4-bit LUT) or ``linear8`` (int8 symmetric per channel)."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    with quiet(), contextlib.redirect_stderr(io.StringIO()):
        ml = ct.models.MLModel(str(mlpackage), skip_model_load=True)
        if kind == "palettize4":
            q = cto.palettize_weights(ml, cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=4)))
        elif kind == "linear8":
            cfg = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8")
            q = cto.linear_quantize_weights(ml, cto.OptimizationConfig(global_config=cfg))
        else:
            raise ValueError(kind)
        q.save(str(out))
    return out


def rows(b, bits: int) -> list[Planned]:
    kind, label = KINDS[bits]
    return [planned(label, "coremltools", "coreml", bits, {"peers", "coremltools", "coreml"},
                    artifact_peer(b, "coreml", lambda s, o: peer_coreml(s, o, kind), kind))]
