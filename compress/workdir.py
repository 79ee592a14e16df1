"""What the training stages (distill, prune, decoder) share: their work directory (checkpoints, cached teacher
samples) and its settings record, the frozen float teacher, the training device's name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pocketfusion import artifact
from pocketfusion.errors import UserError


def claim(work: Path, settings: dict, *, resume: bool, record: str, fresh: tuple[str, ...]) -> None:
    """A fresh run removes ``fresh`` (checkpoints and other per-run state under ``work``) and records ``settings``
    in ``work/record``; a resumed run checks them (the training loop checks only its own config, not what the stage
    computes around it) and raises ``UserError`` naming what changed."""
    path = work / record
    if resume and path.is_file():
        then = json.loads(path.read_text())
        if changed := [f"{k}: {then.get(k)!r} -> {v!r}" for k, v in settings.items() if then.get(k) != v]:
            raise UserError(f"cannot resume from {work}: settings changed ({'; '.join(changed)}); "
                            "use the same settings, or drop --resume to start over")
        return
    if not resume:
        for name in fresh:
            p = work / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    artifact.atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def frozen(module, device):
    """``module`` as a frozen float32 teacher on ``device`` (a float copy when it is not float32; else itself, in eval
    mode without gradients)."""
    import copy

    import torch

    m = copy.deepcopy(module).float() if next(module.parameters()).dtype != torch.float32 else module
    m = m.to(device).eval()
    m.requires_grad_(False)
    return m


def device_name(device) -> str:
    """The GPU's name, or the CPU's (for the training record)."""
    import platform

    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
