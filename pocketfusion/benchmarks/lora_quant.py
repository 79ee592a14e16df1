"""The demo LoRA through quantization: its concept accuracy and the base prompt accuracy for the fp32 merged model,
then W8 and W4 (GPTQ, calibrated on the merged model), each through the real stages (``pocketfusion lora``, then
``pocketfusion compress --quant``), scored by ``pocketfusion.demo.lora.measure.score``.

    OMP_NUM_THREADS=1 python benchmarks/lora_quant.py [--lora FILE] [--work DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from pocketfusion.demo.lora import measure

DEFAULT_LORA = Path(measure.__file__).parent / "north.safetensors"


def _stage(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pocketfusion", *args], check=True)
    return round(time.perf_counter() - t, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lora", type=Path, default=DEFAULT_LORA)
    ap.add_argument("--work", type=Path, default=Path("runs/lora-quant"))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    from pocketfusion.checkpoint import load_model

    merged, seconds = a.work / "merged", {}
    seconds["lora"] = _stage(["lora", "demo", "--lora", str(a.lora), "-o", str(merged)])
    for q in ("w8", "w4"):
        seconds[q] = _stage(["compress", str(merged), "--quant", q, "-o", str(a.work / q)])
    rows = {}
    for name in ("merged", "w8", "w4"):
        rows[name] = measure.score(load_model(a.work / name))
        print(f"{name:7s} concept {rows[name]['concept']['accuracy']:.3f}  base all-correct "
              f"{rows[name]['base']['all_correct']:.3f}", flush=True)
    ref = rows["merged"]["concept"]["accuracy"]
    out = {"lora": str(a.lora), "stage_seconds": seconds, "scores": rows,
           "concept_kept": {q: (rows[q]["concept"]["accuracy"] / ref if ref else None) for q in ("w8", "w4")}}
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0
