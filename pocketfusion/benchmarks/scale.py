"""Scale: export the full-size SD-1.5-architecture U-Net (random weights, ~860 M parameters).

    python benchmarks/scale.py [--targets onnx,executorch,tflite,coreml] [--family sd15] [--json out.json]
    python benchmarks/scale.py --quant w4 [--group-size 32] ...   # sizes of the quantized files at full scale

Each target runs in its own child process (``python -m pocketfusion.benchmarks.scale TARGET ...``:
``child``), so its peak resident memory (ru_maxrss of that child) is its own. Reports wall time,
peak RAM and artifact size per target; parity (``rel_max``) is checked on one golden input where
the target runs here (``--no-parity`` skips it). The limit asked for is 16 GiB peak RAM.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pocketfusion import backends


def _build_unet(family: str, dtype: str, quant: str, group_size: int):
    """The full-size U-Net (seed 0), in ``dtype``, on a round-to-nearest grid unless ``quant`` is none."""
    import torch
    from diffusers import UNet2DConditionModel

    from pocketfusion.testing.fixtures import FULL_CONFIGS

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**FULL_CONFIGS[family]).eval()
    if dtype == "fp16":
        unet = unet.half()
    grid = None
    if quant != "none":  # round-to-nearest: sizes do not depend on how the integers were chosen
        from pocketfusion.compress.quant.grid import rtn_grid

        with torch.no_grad():
            grid = rtn_grid(unet, int(quant[1]), group_size=group_size, scheme=quant)
    return unet, grid


def peak_rss_gib() -> float:
    """This process's peak resident memory (or a finished child's, if larger), GiB."""
    import resource

    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024**2


def child(argv: list[str]) -> dict:
    """Export one target in this process: ``TARGET FAMILY OUT CHECK(0|1) DTYPE QUANT GROUP_SIZE``."""
    from pocketfusion.export.api import parity, torch_reference
    from pocketfusion.export.base import ExportConfig
    from pocketfusion.export.components import unet_spec
    from pocketfusion.runtimes.base import load_session

    target, family, out, check, dtype = argv[0], argv[1], Path(argv[2]), argv[3] == "1", argv[4]
    quant, group_size = argv[5], int(argv[6])
    t0 = time.perf_counter()
    unet, grid = _build_unet(family, dtype, quant, group_size)
    build_s = time.perf_counter() - t0
    spec = unet_spec(unet, seq_len=77)
    spec.grid = grid
    spec.golden = spec.golden[:1]
    if dtype == "fp16":
        spec.golden = [{k: (v.astype("float16") if v.dtype.name == "float32" else v) for k, v in f.items()} for f in spec.golden]
    b = backends.backend(target)
    path = out / f"unet{b.extension}"
    t0 = time.perf_counter()
    info = backends.exporter(target).export_component(spec, path, ExportConfig(targets=(target,), check_parity=check)).info
    export_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    n_params = sum(p.numel() for p in unet.parameters())
    res = {"target": target, "quant": quant, "group_size": group_size if quant == "w4" else None,
           "ratio_to_fp32_weights": size / (4 * n_params), "build_seconds": build_s, "export_seconds": export_s, "size_bytes": size,
           "params": n_params, "info": {k: v for k, v in info.items() if k != "ops"}}
    if check and b.runs_on_linux:
        try:
            res["parity"] = parity(load_session(path, b.runtime), spec, torch_reference(spec))
        except Exception as e:
            res["parity"] = {"status": "not run", "reason": str(e).splitlines()[0]}
    res["peak_rss_gib"] = peak_rss_gib()
    return res


def run_target(target: str, family: str, check: bool, dtype: str, timeout: int, quant: str = "none", group_size: int = 32) -> dict:
    """``child`` of one target in its own process; its RESULT line, wall time and status."""
    with tempfile.TemporaryDirectory(prefix=f"pf-scale-{target}-") as d:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "pocketfusion.benchmarks.scale", target, family, d, "1" if check else "0", dtype, quant,
               str(group_size)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"target": target, "status": f"timed out after {timeout} s"}
        wall = time.perf_counter() - t0
        res = {"target": target, "wall_seconds": wall}  # the child reports its own peak RSS
        for line in p.stdout.splitlines():
            if line.startswith("RESULT "):
                res.update(json.loads(line[7:]))
        if p.returncode != 0:
            res["status"] = "failed"
            res["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
        else:
            res["status"] = "ok"
        return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/scale.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="onnx,coreml,tflite,executorch", help=f"comma-separated, of {', '.join(backends.TARGETS)}")
    ap.add_argument("--family", default="sd15")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--quant", default="none", choices=["none", "w8", "w4"],
                    help="put every layer on a round-to-nearest grid first (sizes only depend on the bits)")
    ap.add_argument("--group-size", type=int, default=32, help="w4 group size")
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    targets = [x for x in a.targets.split(",") if x]
    bad = [t for t in targets if t not in backends.TARGETS]
    if bad:
        ap.error(f"unknown target {', '.join(bad)}; available: {', '.join(backends.TARGETS)}")
    results = []
    for t in targets:
        r = run_target(t, a.family, not a.no_parity, a.dtype, a.timeout, a.quant, a.group_size)
        results.append(r)
        par = r.get("parity", {})
        print(f"{t:<11} {r['status']:<8} wall {r.get('wall_seconds', 0):7.1f} s  peak RAM {r.get('peak_rss_gib', 0):5.2f} GiB  "
              f"size {r.get('size_bytes', 0) / 2**30:5.2f} GiB ({100 * r.get('ratio_to_fp32_weights', 0):.1f} % of fp32 weights)  "
              f"rel_max {par.get('rel_max', float('nan')):.2e}  {r.get('error', '')}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2, default=str))
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":  # the child process of one target
    print("RESULT " + json.dumps(child(sys.argv[1:]), default=str))
