"""Peers on pocketfusion's fp32 TFLite U-Net: ai-edge-quantizer's stock recipes."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

from pocketfusion.benchmarks.quant.measure import quiet
from pocketfusion.benchmarks.quant.rows import Planned, planned
from pocketfusion.benchmarks.quant.targets import artifact_peer

AIEQ_RECIPES = {"weight_only_wi8_afp32": 8, "dynamic_wi8_afp32": 8, "weight_only_wi4_afp32": 4}  # recipe -> weight bits


def peer_aieq(tflite_path: Path, out: Path, recipe_name: str) -> Path:
    """ai-edge-quantizer with one of its stock recipes; the component's ``.io.json`` is copied beside."""
    from ai_edge_quantizer import quantizer, recipe

    with quiet(), contextlib.redirect_stderr(io.StringIO()):
        q = quantizer.Quantizer(str(tflite_path))
        q.load_quantization_recipe(getattr(recipe, recipe_name)())
        q.quantize().export_model(str(out), overwrite=True)
    io_json = Path(str(tflite_path) + ".io.json")
    if io_json.is_file():
        shutil.copy(io_json, str(out) + ".io.json")
    return out


def rows(b, bits: int) -> list[Planned]:
    """One row per stock recipe at ``bits``."""
    return [planned(f"ai-edge-quantizer {rec}", "ai-edge-quantizer", "tflite", bits, {"peers", "ai-edge-quantizer", "tflite"},
                    artifact_peer(b, "tflite", lambda s, o, rec=rec: peer_aieq(s, o, rec), rec))
            for rec, rb in AIEQ_RECIPES.items() if rb == bits]
