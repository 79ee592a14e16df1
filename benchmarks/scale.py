"""Scale: export the full-size SD-1.5-architecture U-Net (random weights, ~860 M parameters).

    python benchmarks/scale.py [--targets onnx,executorch,tflite,coreml] [--family sd15] [--json out.json]
    python benchmarks/scale.py --quant w4 [--group-size 32] ...   # sizes of the quantized files at full scale

Each target runs in its own child process, so its peak resident memory (ru_maxrss of that child)
is its own. Reports wall time, peak RAM and artifact size per target; parity is checked on one
golden input where the target runs here (``--no-parity`` skips it). The limit asked for is
16 GiB peak RAM.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, sys, time, torch
from pathlib import Path
from diffusers import UNet2DConditionModel
from pocketfusion.export.base import ExportConfig
from pocketfusion.export.components import unet_spec
from pocketfusion.export.api import parity, torch_reference
from pocketfusion.runtimes.base import load_session
from pocketfusion.testing.fixtures import FULL_CONFIGS
import importlib
target, family, out, check, dtype = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
quant, group_size = sys.argv[6], int(sys.argv[7])
torch.manual_seed(0)
t0 = time.perf_counter()
unet = UNet2DConditionModel(**FULL_CONFIGS[family]).eval()
if dtype == "fp16":
    unet = unet.half()
grid = None
if quant != "none":  # round-to-nearest: sizes do not depend on how the integers were chosen
    from pocketfusion.compress.grid import rtn_grid
    with torch.no_grad():
        grid = rtn_grid(unet, int(quant[1]), group_size=group_size, scheme=quant)
build_s = time.perf_counter() - t0
ctx = 1024 if family == "sd21" else 768
spec = unet_spec(unet, seq_len=77)
spec.quant = grid
spec.golden = spec.golden[:1]
if dtype == "fp16":
    spec.golden = [{k: (v.astype("float16") if v.dtype.name == "float32" else v) for k, v in f.items()} for f in spec.golden]
mod = importlib.import_module(f"pocketfusion.export.{target}")
cfg = ExportConfig(targets=(target,), check_parity=check)
path = out / f"unet{mod.EXTENSION}"
t0 = time.perf_counter()
info = mod.export_component(spec, path, cfg)
export_s = time.perf_counter() - t0
size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
n_params = sum(p.numel() for p in unet.parameters())
res = {"target": target, "quant": quant, "group_size": group_size if quant == "w4" else None,
       "ratio_to_fp32_weights": size / (4 * n_params), "build_seconds": build_s, "export_seconds": export_s, "size_bytes": size,
       "params": n_params, "info": {k: v for k, v in info.items() if k != "ops"}}
if check and mod.RUNTIME:
    try:
        s = load_session(path, mod.RUNTIME)
        res["parity"] = parity(s, spec, torch_reference(spec))
    except Exception as e:
        res["parity"] = {"status": "not run", "reason": str(e).splitlines()[0]}
import resource
res["peak_rss_gib"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024**2
print("RESULT " + json.dumps(res, default=str))
"""


def run_target(target: str, family: str, check: bool, dtype: str, timeout: int, quant: str = "none", group_size: int = 32) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"pf-scale-{target}-") as d:
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, "-c", _CHILD, target, family, d, "1" if check else "0", dtype, quant, str(group_size)],
                               capture_output=True, text=True, timeout=timeout)
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="onnx,coreml,tflite,executorch")
    ap.add_argument("--family", default="sd15")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--quant", default="none", choices=["none", "w8", "w4"],
                    help="put every layer on a round-to-nearest grid first (sizes only depend on the bits)")
    ap.add_argument("--group-size", type=int, default=32, help="w4 group size")
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    results = []
    for t in [x for x in a.targets.split(",") if x]:
        r = run_target(t, a.family, not a.no_parity, a.dtype, a.timeout, a.quant, a.group_size)
        results.append(r)
        par = r.get("parity", {})
        print(f"{t:<11} {r['status']:<8} wall {r.get('wall_seconds', 0):7.1f} s  peak RAM {r.get('peak_rss_gib', 0):5.2f} GiB  "
              f"size {r.get('size_bytes', 0) / 2**30:5.2f} GiB ({100 * r.get('ratio_to_fp32_weights', 0):.1f} % of fp32 weights)  rel err {par.get('rel', float('nan')):.2e}  {r.get('error', '')}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2, default=str))
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
