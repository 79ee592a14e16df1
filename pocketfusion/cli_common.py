"""What every ``pocketfusion`` subcommand module shares: the MODEL argument (with ``--lora``) and loading it. Standard
library only at module level."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from pocketfusion.errors import UserError  # stdlib-only module

_LORA_HELP = ("LoRA file (.safetensors: diffusers/PEFT or kohya format) merged into the U-Net and text encoder at SCALE "
              "(default 1.0) in memory before the command runs; repeatable, merged in order")


def _model_arg(p: argparse.ArgumentParser, *, lora_help: str = _LORA_HELP) -> None:
    p.add_argument("model", nargs="?", default=None, help="diffusers folder (default: the bundled demo model)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin/.ckpt weights (read with weights_only=True)")
    p.add_argument("--lora", action="append", type=_lora_spec, default=None, metavar="FILE[:SCALE]", help=lora_help)


def _lora_spec(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` -> (path, scale); a path holding ':' is taken whole when it exists."""
    path, scale = text, 1.0
    if ":" in text and not Path(text).exists():
        path, _, tail = text.rpartition(":")
        try:
            scale = float(tail)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: SCALE {tail!r} is not a number (give FILE or FILE:SCALE, "
                                             "e.g. style.safetensors:0.8)") from None
        if not math.isfinite(scale):
            raise argparse.ArgumentTypeError(f"{text!r}: SCALE must be a finite number")
    if not path:
        raise argparse.ArgumentTypeError(f"{text!r}: no FILE (give FILE or FILE:SCALE)")
    return path, scale


def _load(args, *, loras: bool = True):
    """Load MODEL; with ``--lora``, merge the LoRAs into it in memory and keep their records in ``args.lora_records``
    (``cli.main`` writes them into the manifests of what the command wrote)."""
    from pocketfusion.checkpoint import load_model

    model = load_model(args.model, allow_pickle=args.allow_pickle)
    if loras and getattr(args, "lora", None):
        from pocketfusion.compress.lora import LoraConfig, merge_in_memory

        args.lora_records = merge_in_memory(model, LoraConfig(loras=args.lora))
    return model


def _record_loras(args) -> None:
    """After a command that merged ``--lora`` in memory: record the LoRAs in every manifest of its output directory."""
    records = getattr(args, "lora_records", None)
    out = getattr(args, "output", None)
    if records and out and Path(out).is_dir():
        from pocketfusion.compress.lora import annotate

        annotate(out, records)


def _no_lora_with_runtime(args) -> None:
    if getattr(args, "lora", None) and getattr(args, "runtime", None):
        raise UserError("--lora merges into PyTorch weights; an export directory's are fixed: merge first "
                        "(pocketfusion lora MODEL --lora FILE[:SCALE] -o DIR), then export")


def _scheduler_arg(p: argparse.ArgumentParser) -> None:
    from pocketfusion.scheduler_names import NAMES  # standard library only

    p.add_argument("--scheduler", choices=list(NAMES), default=None, metavar="NAME",
                   help=f"sample with this scheduler, built from the model's scheduler config ({', '.join(NAMES)}; "
                        "default: the model's own)")
