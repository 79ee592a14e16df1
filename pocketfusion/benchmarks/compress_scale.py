"""A user's first commands on a full-size checkpoint, measured: ``compress model.safetensors --quant w8`` (then
``w4``) and ``export``, each step's wall time and peak RAM, with the calibration budget used.

    python benchmarks/compress_scale.py [--work DIR] [--prompts 3] [--calib-steps 4] [--timesteps 2]
        [--image-prompts 1] [--quant w8,w4] [--targets onnx] [--json OUT]

Writes a full-size SD-1.5 single file with random weights (the bundled ``sd15`` configs, fp16: what most users
download), a prompts file, then runs the real CLI in child processes, one at a time:

1. ``pocketfusion calibrate sd15.safetensors --prompts prompts.txt --steps S --timesteps K -o calib``: the
   calibration budget, sampled once (wall time and the child's peak RSS, ``wait4``);
2. ``pocketfusion compress sd15.safetensors --quant w8 --calib calib ...``: convert, GPTQ, measure, write; its
   manifest's ``metrics.steps`` holds each step's wall time and peak RSS (reset per step); then ``--quant w4``;
3. ``pocketfusion export <each> --target T --components unet``: wall time and the child's peak RSS.

A step whose output exists is not run again (``--work`` keeps them), so an interrupted run resumes; with ``--json``
an existing file's measured steps are kept beside the new ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a bowl of ramen on a wooden table, studio lighting",
    "a red fox sitting in fresh snow, detailed fur",
    "an isometric illustration of a small city with trees",
    "a portrait of an old sailor with a grey beard, oil painting",
]


def _run(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` (output to ``log``); its wall time, exit status and the child's own peak RSS."""
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"command": " ".join(cmd), "returncode": proc.returncode, "wall_seconds": round(time.perf_counter() - t, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "log": str(log)}


def _tail(log: str, n: int = 3000) -> str:
    return Path(log).read_text(errors="replace")[-n:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/compress_scale.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/compress-scale"), help="working folder (kept; steps resume)")
    ap.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="the single file's weights")
    ap.add_argument("--prompts", type=int, default=3, help="calibration prompts (one is held out)")
    ap.add_argument("--calib-steps", type=int, default=4, help="sampling steps of each calibration prompt")
    ap.add_argument("--timesteps", type=int, default=2, help="U-Net feeds recorded per prompt")
    ap.add_argument("--image-prompts", type=int, default=1)
    ap.add_argument("--quant", default="w8,w4")
    ap.add_argument("--method", action="append", default=[], metavar="SCHEME=METHOD",
                    help="rounding per scheme, e.g. w4=rtn (default: gptq, compress's default)")
    ap.add_argument("--targets", default="onnx", help="export targets, comma-separated ('' for none)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    methods = dict(m.split("=", 1) for m in a.method)
    exe = [sys.executable, "-m", "pocketfusion"]
    res: dict = {"dtype": a.dtype, "budget": {"prompts": a.prompts, "calib_steps": a.calib_steps, "timesteps": a.timesteps,
                                              "image_prompts": a.image_prompts},
                 "threads": os.environ.get("OMP_NUM_THREADS"), "host_cpus": os.cpu_count(), "steps": {}}
    if a.json and a.json.exists():  # a resumed run keeps the steps an earlier run measured
        res["steps"] = json.loads(a.json.read_text()).get("steps") or {}
    file = work / "sd15.safetensors"
    if not file.exists():
        t = time.perf_counter()
        r = _run([sys.executable, "-c", "import sys, pathlib; from pocketfusion.benchmarks.single_file import write_models; "
                  "write_models(pathlib.Path(sys.argv[1]), sys.argv[2], folder=False)", str(work), a.dtype], work / "write.log")
        if r["returncode"]:
            print(_tail(r["log"]), file=sys.stderr)
            return 1
        res["write_seconds"] = round(time.perf_counter() - t, 1)
    res["file_gb"] = round(file.stat().st_size / 1e9, 3)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[: a.prompts]) + "\n")
    calib = work / "calib"
    if not (calib / "manifest.json").exists():
        cmd = [*exe, "calibrate", str(file), "--prompts", str(prompts), "--steps", str(a.calib_steps), "--timesteps",
               str(a.timesteps), "-o", str(calib)]
        print(f"$ {' '.join(cmd[2:])}", flush=True)
        r = _run(cmd, work / "calibrate.log")
        res["steps"]["convert + calibrate"] = r
        if r["returncode"]:
            print(_tail(r["log"]), file=sys.stderr)
            return 1
    for scheme in [q for q in a.quant.split(",") if q]:
        out = work / scheme
        if not (out / "manifest.json").exists():
            cmd = [*exe, "compress", str(file), "--quant", scheme, "--method", methods.get(scheme, "gptq"), "--calib", str(calib),
                   "--image-prompts", str(a.image_prompts), "--image-steps", str(a.calib_steps), "-o", str(out)]
            print(f"$ {' '.join(cmd[2:])}", flush=True)
            r = _run(cmd, work / f"compress-{scheme}.log")
            res["steps"][f"compress {scheme}"] = r
            if r["returncode"]:
                print(_tail(r["log"]), file=sys.stderr)
                break
        m = json.loads((out / "manifest.json").read_text())["metrics"]
        if (r := res["steps"].get(f"compress {scheme}")) and m.get("steps"):
            # compress resets the kernel's high-water mark at each step (``pocketfusion.steps``), which wait4's
            # ru_maxrss reads too: the command's peak is its steps' largest
            r["peak_rss_gib"] = max(r["peak_rss_gib"], *(st["peak_rss_gib"] for st in m["steps"]))
        res[scheme] = {"method": m.get("method"), "steps": m.get("steps"), "plan": m.get("plan"), "seconds": m.get("seconds"),
                       "unet_heldout_error": m.get("unet_heldout_error"), "image_psnr_vs_fp32": m.get("image_psnr_vs_fp32"),
                       "unet_bytes": m.get("unet_bytes"), "layers": m.get("layers")}
        for target in [t for t in a.targets.split(",") if t]:
            eout = work / f"{scheme}-{target}"
            if not (eout / "manifest.json").exists():
                cmd = [*exe, "export", str(out), "--target", target, "--components", "unet", "-o", str(eout)]
                print(f"$ {' '.join(cmd[2:])}", flush=True)
                r = _run(cmd, work / f"export-{scheme}-{target}.log")
                if r["returncode"]:
                    print(_tail(r["log"]), file=sys.stderr)
                res["steps"][f"export {scheme} {target}"] = r
            if (eout / "manifest.json").exists():
                em = json.loads((eout / "manifest.json").read_text())
                res[f"{scheme}-{target}"] = {"size_bytes": sum(p.stat().st_size for p in eout.rglob("*") if p.is_file()),
                                             "metrics": em.get("metrics")}
    for name, r in res["steps"].items():
        print(f"{name:<22} rc {r['returncode']}  wall {r['wall_seconds'] / 60:6.1f} min  peak RSS {r['peak_rss_gib']:6.2f} GiB")
    for scheme in [q for q in a.quant.split(",") if q]:
        for s in (res.get(scheme) or {}).get("steps") or []:
            print(f"  {scheme} {s['step']:<26} {s['seconds'] / 60:6.1f} min  peak {s['peak_rss_gib']:6.2f} GiB")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
        print(f"wrote {a.json}")
    return 0 if all(r["returncode"] == 0 for r in res["steps"].values()) else 1
