"""``python -m pocketfusion.demo.lora train|measure``: see ``pocketfusion.demo.lora``."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from pocketfusion.demo.lora import SHIPPED

    ap = argparse.ArgumentParser(prog="python -m pocketfusion.demo.lora", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the demo LoRA; writes OUT/pytorch_lora_weights.safetensors and OUT/lora.json")
    t.add_argument("-o", "--out", type=Path, required=True)
    t.add_argument("--model", default=None, help="base model folder (default: the demo model)")
    t.add_argument("--iterations", type=int, default=1500)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--rank", type=int, default=4)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--images", type=int, default=3000, help="renders of the new concept (and as many base prompts)")
    t.add_argument("--prior", type=float, default=0.5, help="share of each batch from the base training prompts")
    t.add_argument("--no-text-encoder", action="store_true", help="adapt the U-Net only")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (results are reproducible per thread count)")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--checkpoint-every", type=int, default=250)
    m = sub.add_parser("measure", help="concept and base prompt accuracy of the base model and with the LoRA merged")
    m.add_argument("lora", nargs="?", type=Path, default=SHIPPED)
    m.add_argument("--model", default=None)
    m.add_argument("--scale", type=float, default=1.0)
    m.add_argument("--base-prompts", type=int, default=60, help="held-out base prompts (evenly spaced subset of the 240)")
    m.add_argument("--steps", type=int, default=50)
    m.add_argument("--guidance", type=float, default=4.0)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--threads", type=int, default=None)
    m.add_argument("--write", action="store_true", help="record the figures in the JSON beside the LoRA file (LORA.json)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.cmd == "train":
        from pocketfusion.demo.lora.train import LoraTrainConfig, train_lora

        cfg = LoraTrainConfig(iterations=a.iterations, batch=a.batch, rank=a.rank, alpha=float(a.rank), lr=a.lr, images=a.images,
                              prior=a.prior, text_encoder=not a.no_text_encoder, seed=a.seed, device=a.device)
        path = train_lora(cfg, a.out, model=a.model, resume=a.resume, checkpoint_every=a.checkpoint_every)
        rec = json.loads((a.out / "lora.json").read_text())
        rec["command"] = "python -m pocketfusion.demo.lora " + shlex.join(sys.argv[1:] if argv is None else argv)
        rec["threads"] = a.threads
        (a.out / "lora.json").write_text(json.dumps(rec, indent=1))
        print(path)
    else:
        from pocketfusion.demo.lora.measure import measure_lora

        res = measure_lora(a.lora, model=a.model, scale=a.scale, n_base=a.base_prompts, steps=a.steps, guidance=a.guidance,
                           seed=a.seed, write=a.write)
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
