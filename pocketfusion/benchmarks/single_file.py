"""Single-file checkpoint loading against the equivalent diffusers folder: load time and peak RAM, full size.

    python benchmarks/single_file.py [--dtype fp16|fp32] [--rounds 2] [--work DIR] [--json OUT]

Writes a full-size SD-1.5-layout model with random weights (the bundled ``sd15`` configs) twice into a temporary
folder under ``--work`` (default: the system's temp dir): as a diffusers folder and as one original-layout
``.safetensors`` file (``single_file.to_original``). Then each is loaded by ``checkpoint.load_model`` in its own fresh
process, ``--rounds`` times, alternating; each process reports the load's wall time and its peak resident memory
(``ru_maxrss``), and a process that only imports the libraries gives the baseline. The files are deleted afterwards.
Run with ``OMP_NUM_THREADS=1`` on a shared host.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
import torch, diffusers, transformers  # noqa: F401  (the baseline imports these too)
from pocketfusion.checkpoint import load_model
t = time.perf_counter()
if sys.argv[1] != "-":
    m = load_model(sys.argv[1])
    n = sum(p.numel() for c in m.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters())
else:
    n = 0
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "parameters": n}))
"""


def write_models(root: Path, dtype: str, *, folder: bool = True) -> tuple[Path, Path]:
    """A random-weight full-size SD 1.5 as a diffusers folder (unless ``folder`` is False) and as a single file;
    returns (folder, file)."""
    import torch
    from safetensors.torch import save_file
    from transformers.modeling_utils import no_init_weights

    from pocketfusion import single_file
    from pocketfusion.checkpoint import Model, _build, build_pipeline

    cfg_dir = single_file.CONFIGS / "sd15"
    g = torch.Generator().manual_seed(0)
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    components = {}
    for name in ("unet", "vae", "text_encoder"):
        cfg = json.loads((cfg_dir / name / "config.json").read_text())
        with no_init_weights():
            module = _build(cfg.get("_class_name") or cfg["architectures"][0], cfg, cfg_dir / name)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        components[name] = module.to(torch_dtype).eval()
    import diffusers

    sched = json.loads((cfg_dir / "scheduler" / "scheduler_config.json").read_text())
    components["scheduler"] = getattr(diffusers, sched["_class_name"]).from_config(sched)
    components["tokenizer"] = single_file.clip_tokenizer(json.loads((cfg_dir / "tokenizer" / "tokenizer_config.json").read_text()))
    model = Model(path=root, kind="pipeline", class_name="StableDiffusionPipeline", components=components)
    out, file = root / "diffusers", root / "sd15.safetensors"
    if folder:
        build_pipeline(model).save_pretrained(str(out), safe_serialization=True)
    sd = single_file.to_original({n: components[n].state_dict() for n in ("unet", "vae", "text_encoder")}, "sd1")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(file))
    return out, file


def _child(target: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", _CHILD, target], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"loading {target} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(dtype: str = "fp16", rounds: int = 2, work: str | None = None) -> dict:
    root = Path(tempfile.mkdtemp(prefix="pf-single-file-", dir=work))
    try:
        # written by a child too: ru_maxrss survives fork + exec, so a big parent would raise every child's figure
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sys; from pocketfusion.benchmarks.single_file import write_models; "
                        "write_models(__import__('pathlib').Path(sys.argv[1]), sys.argv[2])", str(root), dtype],
                       check=True, capture_output=True)
        folder, file = root / "diffusers", root / "sd15.safetensors"
        write_s = time.perf_counter() - t
        sizes = {"single_file_gb": file.stat().st_size / 1e9,
                 "diffusers_folder_gb": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9}
        runs = {"baseline": [_child("-")], "diffusers_folder": [], "single_file": []}
        for _ in range(rounds):
            runs["diffusers_folder"].append(_child(str(folder)))
            runs["single_file"].append(_child(str(file)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = {k: {"seconds_min": min(r["seconds"] for r in v), "peak_rss_gib_max": max(r["peak_rss_gib"] for r in v)}
               for k, v in runs.items()}
    return {"dtype": dtype, "rounds": rounds, "write_seconds": write_s, **sizes, "summary": summary, "runs": runs,
            "threads": os.environ.get("OMP_NUM_THREADS"), "host_cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="weights' dtype (fp16: ~2 GB, fp32: ~4 GB)")
    ap.add_argument("--rounds", type=int, default=2, help="loads of each, alternating, each in a fresh process")
    ap.add_argument("--work", default=None, help="where the temporary files go (default: the system's temp dir)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    res = measure(args.dtype, args.rounds, args.work)
    s = res["summary"]
    print(f"SD 1.5 layout, {args.dtype}: single file {res['single_file_gb']:.2f} GB, diffusers folder "
          f"{res['diffusers_folder_gb']:.2f} GB (written in {res['write_seconds']:.0f} s)")
    for k in ("baseline", "diffusers_folder", "single_file"):
        print(f"{k:<17} load {s[k]['seconds_min']:7.1f} s   peak RSS {s[k]['peak_rss_gib_max']:6.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
