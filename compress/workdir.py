"""The work directory of a training stage (checkpoints, cached teacher samples) and its settings record."""

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
