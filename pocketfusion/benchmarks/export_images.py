"""Images of export directories through one runtime against a reference export's, same prompts and seeds.

    python benchmarks/export_images.py REF_EXPORT EXPORT [EXPORT ...] [--runtime litert] [--prompts 240] [--steps S]
        [--guidance 4.0] [--threads 1] [--json OUT]

Every export is run through ``runtimes.pipeline.RuntimePipeline`` on the demo suite's first ``--prompts`` held-out
prompts (image ``i`` at seed ``i``, each export at ``--steps`` or its own default); the reference's images are scored
with the demo evaluator, every other export's too, and its image PSNR against the reference's (``metrics.image_psnr``:
mean, min). This is how a kernel path's cost is measured against the fp32 export through the same runtime.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def measure(ref: str, others: list[str], *, runtime: str, prompts: int, steps: int | None, guidance: float,
            threads: int | None) -> dict:
    from pocketfusion.metrics import image_psnr
    from pocketfusion.runtimes.pipeline import RuntimePipeline
    from pocketfusion.suite import builtin

    suite = builtin("demo")
    ps = suite.heldout(prompts)

    def images(d: str) -> list:
        return RuntimePipeline(d, runtime, threads=threads).generate(ps, steps=steps, guidance=guidance, seed=0)[0]

    reference = images(ref)
    out = {"runtime": runtime, "prompts": len(ps), "steps": steps, "guidance": guidance, "reference": ref,
           "reference_all_correct": suite.evaluate(reference, ps)["all_correct"], "exports": {}}
    for d in others:
        imgs = images(d)
        p = image_psnr(reference, imgs)
        out["exports"][d] = {"all_correct": suite.evaluate(imgs, ps)["all_correct"], "psnr_mean_db": p["mean_db"],
                             "psnr_min_db": p["min_db"], "identical_images": p["identical_images"]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference")
    ap.add_argument("exports", nargs="+")
    ap.add_argument("--runtime", default="litert")
    ap.add_argument("--prompts", type=int, default=240)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: each export's own)")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = measure(a.reference, a.exports, runtime=a.runtime, prompts=a.prompts, steps=a.steps, guidance=a.guidance, threads=a.threads)
    print(f"{a.reference}: all five {100 * res['reference_all_correct']:.2f} % ({res['prompts']} prompts, {a.runtime})")
    for d, r in res["exports"].items():
        print(f"{d}: all five {100 * r['all_correct']:.2f} %, images against the reference's: PSNR mean {r['psnr_mean_db']:.2f} dB, "
              f"min {r['psnr_min_db']:.2f} dB")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=float) + "\n")
    return 0
