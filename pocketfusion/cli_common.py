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
    p.add_argument("model", nargs="?", default=None,
                   help="diffusers folder, or a single-file SD 1.x / 2.x / SDXL checkpoint (.safetensors; .ckpt with "
                        "--allow-pickle) (default: the bundled demo model)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin/.ckpt weights (read with weights_only=True)")
    p.add_argument("--config", default=None, metavar="DIR",
                   help="single-file MODEL: a diffusers folder whose config files describe its architecture (default: the "
                        "bundled full-size SD 1.x / 2.x / SDXL configs of the detected family)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="single-file MODEL: what the U-Net predicts (default: a hint in the file, else epsilon; SD 2.x: "
                        "v_prediction, the 768-px model)")
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


# Commands whose --lora is merged in memory: they write no stage artifact (an image, a report JSON, a table).
_IN_MEMORY = ("generate", "eval", "info")


def _lora_dir(output) -> Path:
    """Where a stage command's ``--lora`` merge goes: ``<OUT>-lora/`` beside its output."""
    out = Path(output)
    return out.parent / f"{out.name}-lora"


def _load(args, *, loras: bool = True):
    """Load MODEL, with ``--lora`` merged (records in ``args.lora_records``; ``cli.main`` writes them into the manifests
    of what the command wrote).

    A single-file MODEL is loaded in memory by ``generate``, ``eval`` and ``info``; the other commands first write it as
    a diffusers folder ``<OUT>-diffusers/`` (``_convert``) and read that.

    ``generate``, ``eval`` and ``info`` merge in memory. A command that writes a stage artifact (``export``, ``compress``,
    ``calibrate``, ``run``, ``distill``, ``prune``, ``decoder``) runs the LoRA stage first into ``<OUT>-lora/`` and
    reads the model from there: the stages copy untouched components from their source folder and record it as the
    source (teacher lookups, eval --runtime's PyTorch reference), so the source must be a folder that holds the LoRA.
    """
    from pocketfusion.checkpoint import load_model

    model = load_model(args.model, allow_pickle=args.allow_pickle, config=getattr(args, "config", None),
                       prediction_type=getattr(args, "prediction_type", None))
    if model.origin is not None and getattr(args, "command", None) not in _IN_MEMORY and getattr(args, "output", None):
        model = _convert(model, args)
    if not (loras and getattr(args, "lora", None)):
        return model
    from pocketfusion.compress.lora import LoraConfig, merge_in_memory, merge_lora

    cfg = LoraConfig(loras=args.lora)
    if getattr(args, "command", None) in _IN_MEMORY or not getattr(args, "output", None):
        args.lora_records = merge_in_memory(model, cfg)
        return model
    out = _lora_dir(args.output)
    print(f"merging {len(cfg.loras)} LoRA file{'s' * (len(cfg.loras) > 1)} into {model.path} -> {out}/ (this command's source)",
          flush=True)
    args.lora_records = merge_lora(model, cfg, out).metrics["lora"]["loras"]
    args.lora_dir = out
    return load_model(out)


def _convert(model, args):
    """A single-file MODEL for a command that writes a stage artifact: written as a diffusers folder ``<OUT>-diffusers/``
    first, and read from there (the stages copy components from, and record as their source, the folder they read)."""
    from pocketfusion.checkpoint import load_model
    from pocketfusion.single_file import write_diffusers

    out = Path(args.output)
    out = out.parent / f"{out.name}-diffusers"
    print(f"converting {model.path} ({model.origin['family']}, {model.origin['prediction_type']}) -> {out}/ "
          "(a diffusers folder: this command's source)", flush=True)
    write_diffusers(model, out)
    return load_model(out)


def _record_loras(args) -> None:
    """After a command that merged ``--lora``: record the LoRAs in every manifest of its output directory."""
    records = getattr(args, "lora_records", None)
    out = getattr(args, "output", None)
    if records and out and Path(out).is_dir():
        from pocketfusion.compress.lora import annotate

        annotate(out, records, merged_into=getattr(args, "lora_dir", None))


def _no_lora_with_runtime(args) -> None:
    if getattr(args, "lora", None) and getattr(args, "runtime", None):
        raise UserError("--lora merges into PyTorch weights; an export directory's are fixed: merge first "
                        "(pocketfusion lora MODEL --lora FILE[:SCALE] -o DIR), then export")


def _scheduler_arg(p: argparse.ArgumentParser) -> None:
    from pocketfusion.scheduler_names import NAMES  # standard library only

    p.add_argument("--scheduler", choices=list(NAMES), default=None, metavar="NAME",
                   help=f"sample with this scheduler, built from the model's scheduler config ({', '.join(NAMES)}; "
                        "default: the model's own)")
