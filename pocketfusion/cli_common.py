"""What every ``pocketfusion`` subcommand module shares: the MODEL argument and loading it. Standard library only."""

from __future__ import annotations

import argparse


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="diffusers folder (default: the bundled demo model)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin/.ckpt weights (read with weights_only=True)")


def _load(args):
    from pocketfusion.checkpoint import load_model

    return load_model(args.model, allow_pickle=args.allow_pickle)
