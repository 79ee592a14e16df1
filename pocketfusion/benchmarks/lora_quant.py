"""The demo LoRA through compression, side by side: its concept accuracy and the base prompt accuracy for

* ``merged``            the fp32 model with the LoRA merged (``pocketfusion lora``);
* ``merge-gptq-w8/w4``  pocketfusion's order: merge, then quantize (``pocketfusion compress --quant``, GPTQ calibrated on
                        the merged model's own inputs: the LoRA's training prompts, half base prompts, ``--calib``);
* ``merge-rtn-w8/w4``   merge, then round-to-nearest at the same bits and groups (``--method rtn``);
* ``quant-lora-w8/w4``  what stable-diffusion.cpp does: the base model quantized first (GPTQ on base prompts), the
                        LoRA then added to its dequantized weights and re-quantized per layer
                        (``compress.lora.merge_into_quantized``);
* ``student-4step``     the 4-step student (``demo-4step``) with the LoRA merged (``pocketfusion lora demo-4step``);
* ``export-<runtime>``  ``merge-gptq-w8`` exported (``pocketfusion export``) and sampled in each runtime
                        (``--runtimes``; the runtime pipeline, same prompts and seeds).

Each is scored by ``pocketfusion.demo.lora.measure.score`` (36 held-out LoRA prompts, 60 held-out base prompts, at
the model's own step count). Stages whose output exists are reused (rerun after an interruption).

    OMP_NUM_THREADS=1 python benchmarks/lora_quant.py [--lora FILE] [--work DIR] [--runtimes onnxruntime,...] [--json OUT]
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
RUNTIMES = ("onnxruntime", "executorch", "litert")
_TARGET = {"onnxruntime": "onnx", "executorch": "executorch", "litert": "tflite"}


def _stage(args: list[str], out: Path, seconds: dict, key: str) -> Path:
    """Run ``pocketfusion ARGS`` unless ``out`` holds a finished artifact; record its wall time."""
    if not (out / "manifest.json").is_file():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pocketfusion", *args], check=True)
        seconds[key] = round(time.perf_counter() - t, 1)
    return out


def calibration_prompts(path: Path, n: int = 64) -> Path:
    """The merged model's own inputs: the LoRA's training prompts interleaved with base training prompts (``n`` lines)."""
    from pocketfusion.demo.scenes import split_lora_scenes, split_scenes

    lora_train, base_train = split_lora_scenes()[0], split_scenes()[0]
    lines = []
    for i in range(n // 2):
        lines += [lora_train[i * len(lora_train) // (n // 2)].prompt, base_train[i * len(base_train) // (n // 2)].prompt]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def delta_retained(quantized_base: Path, lora: str) -> dict:
    """How much of the LoRA's weight change survives ``merge_into_quantized`` (stable-diffusion.cpp's order) in the U-Net's
    adapted quantized layers: the energy ratio ``||W_q' - W_q||^2 / ||dW||^2`` and the cosine between the change made
    and the LoRA's delta ``dW`` (1 and 1: kept whole; re-quantization rounding the delta away drives both down)."""
    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.lora import LoraConfig, merge_into_quantized
    from pocketfusion.compress.lora.merge import _merge
    from pocketfusion.compress.quant import load_grid

    m = load_model(quantized_base)
    layers = list(load_grid(m).layers)
    before = {n: m.unet.get_submodule(n).weight.detach().clone() for n in layers}
    ref = load_model(quantized_base)  # the same weights, the delta added in float (no re-quantization)
    _merge(ref, LoraConfig(loras=[(lora, 1.0)]))
    merge_into_quantized(m, LoraConfig(loras=[(lora, 1.0)]))
    made = delta = dot = 0.0
    adapted = 0
    for n in layers:
        d = ref.unet.get_submodule(n).weight.detach() - before[n]
        if not bool(d.abs().max() > 0):
            continue
        c = m.unet.get_submodule(n).weight.detach() - before[n]
        adapted += 1
        made, delta, dot = made + float((c * c).sum()), delta + float((d * d).sum()), dot + float((c * d).sum())
    return {"adapted_layers": adapted, "energy_ratio": made / delta, "cosine": dot / (made * delta) ** 0.5,
            "note": "over the adapted U-Net layers; the change made includes the fresh abs-max scales' effect on every weight"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lora", type=Path, default=DEFAULT_LORA)
    ap.add_argument("--work", type=Path, default=Path("runs/lora-quant"))
    ap.add_argument("--runtimes", default=",".join(RUNTIMES), help="runtimes whose export of merge-gptq-w8 is scored ('' for none)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.lora import LoraConfig, merge_into_quantized

    w, lora, seconds, models = a.work, str(a.lora), {}, {}
    calib = calibration_prompts(w / "calib-prompts.txt")
    models["merged"] = _stage(["lora", "demo", "--lora", lora, "-o", str(w / "merged")], w / "merged", seconds, "lora")
    for q in ("w8", "w4"):
        models[f"merge-gptq-{q}"] = _stage(["compress", str(w / "merged"), "--quant", q, "--calib", str(calib), "--num-prompts", "64",
                                            "-o", str(w / f"merge-gptq-{q}")], w / f"merge-gptq-{q}", seconds, f"merge-gptq-{q}")
        models[f"merge-rtn-{q}"] = _stage(["compress", str(w / "merged"), "--quant", q, "--method", "rtn", "-o", str(w / f"merge-rtn-{q}")],
                                          w / f"merge-rtn-{q}", seconds, f"merge-rtn-{q}")
        _stage(["compress", "demo", "--quant", q, "-o", str(w / f"base-{q}")], w / f"base-{q}", seconds, f"base-{q}")
    models["student-4step"] = _stage(["lora", "demo-4step", "--lora", lora, "-o", str(w / "student-4step")], w / "student-4step",
                                     seconds, "student-4step")
    runtimes = [r for r in a.runtimes.split(",") if r]
    for r in runtimes:
        out = w / f"export-{_TARGET[r]}"
        _stage(["export", str(w / "merge-gptq-w8"), "--target", _TARGET[r], "-o", str(out)], out, seconds, f"export-{r}")

    rows: dict[str, dict] = {}

    def report(name: str, result: dict) -> None:
        rows[name] = result
        print(f"{name:18s} concept {result['concept']['accuracy']:.3f}  base all-correct {result['base']['all_correct']:.3f}"
              f"  ({result['steps']} steps, {result['seconds']} s)", flush=True)

    for name, path in models.items():
        report(name, measure.score(load_model(path)))
    for q in ("w8", "w4"):
        m = load_model(w / f"base-{q}")
        merge_into_quantized(m, LoraConfig(loras=[(lora, 1.0)]))
        report(f"quant-lora-{q}", measure.score(m))
    for r in runtimes:
        from pocketfusion.runtimes.pipeline import RuntimePipeline

        report(f"export-{r}", measure.score(RuntimePipeline(w / f"export-{_TARGET[r]}", r)))
    retained = {q: delta_retained(w / f"base-{q}", lora) for q in ("w8", "w4")}
    for q, r in retained.items():
        print(f"quant-lora-{q}: the LoRA delta's energy kept {r['energy_ratio']:.3f}, cosine {r['cosine']:.3f}", flush=True)
    ref = rows["merged"]["concept"]["accuracy"]
    out = {"lora": lora, "calibration_prompts": str(calib), "stage_seconds": seconds, "scores": rows, "delta_retained": retained,
           "concept_kept": {n: (r["concept"]["accuracy"] / ref if ref else None) for n, r in rows.items() if n != "merged"},
           "target": "W4 keeps >= 90 % of the fp32-merged concept accuracy (merge-gptq-w4)"}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0
