"""Side-by-side quality of every quantization scheme and method on one model (default: the demo).

    python -m pocketfusion.compress.measure [MODEL] [--prompts 8] [--steps 50] [--accuracy N] [--json OUT]

For each variant: U-Net output error on the held-out calibration feeds (rel_rms, SNR),
stored weight bytes vs fp32, generated-image PSNR against the fp32 pipeline (same prompts and
seeds; the held-out prompts of the model's prompt suite) and, with ``--accuracy N``, prompt accuracy
on N held-out prompts (the suite's evaluator). W8A8 / W8A16 activations are simulated (fake-quantized layer inputs with the
calibration ranges), as a target's static quantization would compute them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import time
from pathlib import Path

VARIANTS = ("w8-rtn", "w8-gptq", "w4-rtn", "w4-gptq-uniform", "w4-gptq", "w4-rtn-mixedbits", "w8a8-gptq", "w8a16-gptq")


def measure(model, *, variants=VARIANTS, n_calib: int = 32, n_images: int = 8, steps: int = 50, accuracy: int | None = None,
            group_size: int = 32, seed: int = 0, progress: bool = True) -> dict:
    from pocketfusion import calibration as C
    from pocketfusion.compress.evaluate import quant_metrics, with_unet
    from pocketfusion.compress.quant import grid as G
    from pocketfusion.compress.quant.activations import simulate_activations
    from pocketfusion.compress.quant.config import WEIGHT_BITS, QuantConfig
    from pocketfusion.compress.quant.feeds import stack_feeds, unet_outputs
    from pocketfusion.compress.quant.mixed import weight_bytes
    from pocketfusion.compress.quant.unet import quantize_unet, rtn_like
    from pocketfusion.metrics import output_error
    from pocketfusion.suite import require_suite

    suite = require_suite(model, "python -m pocketfusion.compress.measure")
    cset = C.resolve(model, None, n_prompts=n_calib, seed=seed, progress=progress, suite=suite)
    calib, held = cset.unet_feeds("calib"), cset.unet_feeds("heldout")
    hb = stack_feeds(held)
    ref = unet_outputs(model.unet, hb)
    prompts = suite.heldout(n_images)
    cache: dict = {}
    grids: dict = {}
    rows = {}
    for v in variants:
        scheme, method = v.split("-")[0], v.split("-")[1]
        u = copy.deepcopy(model.unet)
        t0 = time.perf_counter()
        if v == "w4-rtn-mixedbits":  # RTN on the bit allocation w4-gptq measured: isolates the rounding method
            if "w4-gptq" not in grids:
                continue
            g = rtn_like(u, grids["w4-gptq"])
        elif method == "rtn":
            g = G.rtn_grid(u, WEIGHT_BITS[scheme], group_size=group_size, scheme=scheme)
        else:
            cfg = QuantConfig(scheme=scheme, method="gptq", group_size=group_size)
            if v.endswith("uniform"):
                cfg = dataclasses.replace(cfg, mixed_threshold=None)
            g = quantize_unet(u, calib, cfg, progress=False)
        secs = time.perf_counter() - t0
        grids[v] = g
        acts = g.activations.get("layers") if g.activations else None
        sim = simulate_activations(u, acts) if acts else contextlib.nullcontext()
        with sim:
            err = output_error(ref, unet_outputs(u, hb))
            r = quant_metrics(model, with_unet(model, u), prompts=prompts, suite=suite, steps=steps, seed=seed, accuracy=accuracy,
                              reference=cache)
        size = weight_bytes(u, g.weight_bits, {n: x.group_size for n, x in g.layers.items()})
        rows[v] = {
            "unet_rel_rms": err["rel_rms"], "unet_snr_db": err["snr_db"], "bytes_ratio_fp16_scales": size["ratio"],
            "image_psnr_db": r["image_psnr_db"], "layers_int8": sum(x.bits == 8 for x in g.layers.values()),
            "layers_int4": sum(x.bits == 4 for x in g.layers.values()), "quantize_seconds": round(secs, 1),
        }
        if acts:
            rows[v]["activation_fallbacks"] = len(g.activations.get("fallbacks", []))
        if accuracy:
            rows[v]["prompt_accuracy"] = r["prompt_accuracy"]
        if progress:
            print(format_row(v, rows[v]), flush=True)
    return {"model": str(model.path), "calibration_prompts": n_calib, "heldout_feeds": len(held), "image_prompts": n_images,
            "steps": steps, "seed": seed, "group_size": group_size, "variants": rows}


def format_row(name: str, r: dict) -> str:
    p = r["image_psnr_db"]
    acc = ""
    if "prompt_accuracy" in r:
        a = r["prompt_accuracy"]["quantized"]
        acc = "  acc " + " ".join(f"{k[:3]} {v:.0%}" for k, v in a.items())
    return (f"{name:<18} U-Net SNR {r['unet_snr_db']:5.1f} dB (rel_rms {r['unet_rel_rms']:.3f})  size {r['bytes_ratio_fp16_scales']:6.1%}  "
            f"image PSNR mean {p['mean_db']:5.1f} min {p['min_db']:5.1f} dB  int8/int4 {r['layers_int8']}/{r['layers_int4']}{acc}")


def main(argv=None) -> int:
    from pocketfusion.checkpoint import load_model

    ap = argparse.ArgumentParser(prog="python -m pocketfusion.compress.measure", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--calib-prompts", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=8, help="images compared with the fp32 pipeline")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--accuracy", type=int, default=None, help="also prompt accuracy on N held-out prompts (the suite's evaluator)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = measure(load_model(a.model), variants=tuple(a.variants.split(",")), n_calib=a.calib_prompts, n_images=a.prompts,
                  steps=a.steps, accuracy=a.accuracy)
    if a.accuracy:
        print("fp32 prompt accuracy:", next(iter(res["variants"].values()))["prompt_accuracy"]["fp32"])
    if a.json:
        from pocketfusion.artifact import atomic_write_text

        atomic_write_text(Path(a.json), json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
