"""``pocketfusion lora``: merge LoRA files into a model and write a diffusers folder (``compress.lora``)."""

from __future__ import annotations

from pathlib import Path

from pocketfusion.cli_common import _load, _model_arg
from pocketfusion.errors import UserError


def cmd_lora(args) -> int:
    from pocketfusion.compress.lora import LoraConfig, merge_lora, summary

    if not args.lora:
        raise UserError("pocketfusion lora needs at least one --lora FILE[:SCALE]")
    cfg = LoraConfig(loras=args.lora, allow_unmatched=args.allow_unmatched)
    manifest = merge_lora(_load(args, loras=False), cfg, Path(args.output))
    print(f"wrote {args.output}/ (a diffusers folder: {', '.join(manifest.metrics['lora']['components'])} with the LoRAs merged)")
    print(summary(manifest))
    return 0


def _add_lora(sub) -> None:
    p = sub.add_parser("lora", help="merge LoRA files (diffusers/PEFT or kohya .safetensors) into the U-Net and text encoder; "
                                    "writes a diffusers folder")
    _model_arg(p, lora_help="LoRA file (.safetensors: diffusers/PEFT or kohya format) and its scale (default 1.0); "
                            "repeatable, merged in order")
    p.add_argument("--allow-unmatched", action="store_true",
                   help="skip LoRA keys that name no layer of MODEL (counted in the manifest) instead of failing")
    p.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    p.set_defaults(func=cmd_lora)

