"""``python benchmarks/quant.py``: arguments, the run, its table and JSON."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from pocketfusion.benchmarks.quant.context import Bench
from pocketfusion.benchmarks.quant.output import format_table, header, result, write_json
from pocketfusion.benchmarks.quant.plan import make_rows
from pocketfusion.benchmarks.quant.rows import MEASUREMENTS, TAGS
from pocketfusion.runtimes.timing import interleaved_latency


def parse_args(argv=None) -> argparse.Namespace:
    import pocketfusion.benchmarks.quant as pkg

    ap = argparse.ArgumentParser(prog="benchmarks/quant.py", description=pkg.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="diffusers pipeline folder (default: the bundled demo model)")
    ap.add_argument("--prompts", type=int, default=8, help="images per row for PSNR and prompt accuracy (held-out prompts; 0: none)")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps of those images")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib", type=Path, default=None, help="prompts file or saved calibration set (default: the demo's built-in prompts)")
    ap.add_argument("--calib-prompts", type=int, default=None, help="calibration prompts (default: the calibration module's, 32)")
    ap.add_argument("--feeds", type=int, default=None, help="at most this many held-out U-Net feeds for the error columns (default: all)")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10, help="U-Net calls per row per latency round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    ap.add_argument("--skip", action="append", default=[], help=f"comma-separated tags to leave out: {', '.join(TAGS + MEASUREMENTS)}")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here (default: a file in the system temp dir)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    a.skip = [s.strip() for item in a.skip for s in item.split(",") if s.strip()]
    bad = [s for s in a.skip if s not in TAGS + MEASUREMENTS]
    if bad:
        ap.error(f"unknown --skip {', '.join(bad)}; choose from {', '.join(TAGS + MEASUREMENTS)}")
    if a.prompts < 0 or a.steps < 1 or a.runs < 1 or a.rounds < 1:
        ap.error("--prompts >= 0, --steps, --runs, --rounds >= 1")
    return a


def image_prompts(cset, suite, n: int) -> list[str]:
    """The ``n`` prompts every row generates: the suite's held-out prompts, else the calibration
    set's held-out prompts first, then its others."""
    if n == 0:
        return []
    if suite is not None:
        return suite.heldout(min(n, len(suite.heldout_prompts)))
    held = [cset.prompts[i] for i in cset.prompt_indices("heldout")]
    return (held + [p for p in cset.prompts if p not in held])[:n]


def prepare(a, model, work: Path, progress: bool) -> tuple[Bench, object]:
    """One calibration set for every pocketfusion row (saved for ``quantize``), its held-out feeds for
    every row's error, the prompts and the fp32 reference images."""
    from pocketfusion import calibration as C
    from pocketfusion.suite import suite_for

    cset = C.resolve(model, a.calib, n_prompts=a.calib_prompts, seed=a.seed, progress=progress)
    a.calib_dir = work / "calibration"
    C.save(cset, a.calib_dir)
    feeds = cset.unet_feeds("heldout")[: a.feeds or None]
    suite = suite_for(model)
    if suite is not None and suite.evaluator is None:
        suite = None
    b = Bench(a, model, feeds, image_prompts(cset, suite, a.prompts), suite, work)
    if b.prompts and "images" not in b.skip:
        b.ref_images, b.fp32_accuracy = b.torch_generate(model.unet)(b.prompts)
    return b, cset


def time_rows(b, a, progress: bool) -> None:
    """Interleaved latency of every row that runs here (``--skip latency``: none)."""
    timed = {r.name: r for r in b.rows if r.status == "ok" and r.run is not None and r.time_it}
    if timed and "latency" not in b.skip:
        feed = b.feeds[0]
        lat = interleaved_latency({k: (lambda r=r: r.run(feed)) for k, r in timed.items()}, runs=a.runs, rounds=a.rounds, progress=progress)
        for k, v in lat.items():
            timed[k].latency = v


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from pocketfusion.checkpoint import DEMO_MODEL, load_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    progress = not a.no_progress
    t_start = time.perf_counter()
    model = load_model(a.model or DEMO_MODEL)
    model.require_pipeline()
    if model.quantized:
        raise SystemExit(f"error: {model.path} is already quantized; give its fp32 source")
    work = Path(tempfile.mkdtemp(prefix="pf-bench-quant-"))
    try:
        b, cset = prepare(a, model, work, progress)
        make_rows(b, progress)
        time_rows(b, a, progress)
        table = format_table(b.rows)
        print("\n" + header(model.path.name, b.fp32_param_bytes, len(b.feeds), len(b.prompts), a, "latency" not in b.skip))
        print(table)
        res = result(b, a, cset, b.feeds, table, time.perf_counter() - t_start)
        out = write_json(res, a.json)
        print(f"\nJSON: {out}  ({res['seconds']:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0
