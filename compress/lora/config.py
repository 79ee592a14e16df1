"""``LoraConfig``: which LoRA files the LoRA stage merges, at which scales, in which order."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketfusion.errors import UserError
from pocketfusion.validate import config_from_dict, is_num

CONFIG_VERSION = 1


@dataclass(frozen=True)
class LoraFile:
    """One LoRA file and the scale it is merged at (``W += scale * alpha / rank * up @ down``; negative subtracts it)."""

    path: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", str(self.path))
        if not self.path:
            raise UserError("LoraFile: path is empty")
        if not is_num(self.scale, -1e6, 1e6):
            raise UserError(f"LoraFile {self.path}: scale={self.scale!r}: a finite number")
        object.__setattr__(self, "scale", float(self.scale))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "scale": self.scale}


@dataclass(frozen=True)
class LoraConfig:
    """How ``merge_lora`` merges LoRAs into a model.

    Args:
        loras: the LoRA files, merged in this order (each a ``LoraFile``, a ``(path, scale)`` pair, a path, or a dict
            with ``path`` and ``scale``); a ``.safetensors`` file (or a folder holding ``pytorch_lora_weights.safetensors``)
            in the diffusers/PEFT format (``lora_A``/``lora_B``, or the older ``.lora.down``/``.lora.up`` names) or
            the kohya/A1111 format (``lora_unet_*``/``lora_te_*``, ``lora_down``/``lora_up``, ``alpha``).
        allow_unmatched: merge what matches and skip LoRA keys that name no layer of the model (counted and listed in
            the manifest); by default such keys are an error.

    Example:
        >>> LoraConfig(loras=[("style.safetensors", 0.8)]).to_dict()["loras"]
        [{'path': 'style.safetensors', 'scale': 0.8}]
    """

    loras: tuple[LoraFile, ...]
    allow_unmatched: bool = False
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.loras, (str, Path, LoraFile, Mapping)):
            object.__setattr__(self, "loras", (self.loras,))
        try:
            object.__setattr__(self, "loras", tuple(_lora_file(x) for x in self.loras))
        except TypeError:
            raise UserError(f"LoraConfig: loras={self.loras!r}: a sequence of LoRA files") from None
        if not self.loras:
            raise UserError("LoraConfig: no LoRA files given (give at least one --lora FILE[:SCALE])")
        if not isinstance(self.allow_unmatched, bool):
            raise UserError(f"LoraConfig: allow_unmatched={self.allow_unmatched!r}: a bool")
        if self.version != CONFIG_VERSION:
            raise UserError(f"LoraConfig: version={self.version!r}: only {CONFIG_VERSION}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, ``version`` included."""
        return {"loras": [f.to_dict() for f in self.loras], "allow_unmatched": self.allow_unmatched, "version": self.version}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraConfig:
        """Inverse of ``to_dict``; raises UserError on an unknown key or ``version`` or a bad value."""
        return config_from_dict(cls, d)


def _lora_file(x) -> LoraFile:
    if isinstance(x, LoraFile):
        return x
    if isinstance(x, (str, Path)):
        return LoraFile(str(x))
    if isinstance(x, Mapping):
        if unknown := sorted(set(x) - {"path", "scale"}):
            raise UserError(f"LoraConfig: a LoRA entry has unknown keys {unknown}; known: ['path', 'scale']")
        return LoraFile(**x)
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return LoraFile(x[0], x[1])
    raise UserError(f"LoraConfig: {x!r} is not a LoRA file (a path, (path, scale) or {{'path': ..., 'scale': ...}})")
