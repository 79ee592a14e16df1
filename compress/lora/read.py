"""Reading LoRA files: safetensors only, in the diffusers/PEFT or the kohya/A1111 format, into one ``LoraLayer`` per
adapted layer (its down and up matrices and its alpha). Which model layer each one names is decided in ``merge``.

Key formats (``COMP`` is ``unet``, ``text_encoder`` or ``text_encoder_2``; ``PATH`` a module path of that component):

* PEFT / diffusers (``save_lora_weights``): ``COMP.PATH.lora_A.weight`` (down), ``COMP.PATH.lora_B.weight`` (up); alpha
  and rank per component from the file's ``lora_adapter_metadata`` (``COMP.lora_alpha``, ``COMP.alpha_pattern``,
  ``COMP.use_rslora``), else alpha = rank (scale 1).
* older diffusers: ``COMP.PATH.lora.down.weight`` / ``.lora.up.weight``, ``COMP.PATH.lora_linear_layer.down.weight``,
  and the attention-processor names (``...attn1.processor.to_q_lora.down.weight``, ``...self_attn.to_out_lora...``).
* kohya / A1111: ``lora_unet_NAME.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` (``lora_te_``/``lora_te1_``: the
  text encoder, ``lora_te2_``: SDXL's second); ``NAME`` is the module path with ``_`` for ``.``; scale alpha / rank
  (no alpha: 1). Convolutions: a ``kh x kw`` down and a 1x1 up.

Pickled files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) are refused, never unpickled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pocketfusion.errors import UserError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te_": "text_encoder"}

# older diffusers names: attention-processor LoRAs, by component kind (the U-Net's attention vs CLIP's)
_PROCESSOR_UNET = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_PROCESSOR_TE = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}
# key suffix -> role, for the diffusers/PEFT names (longest first)
_DIFFUSERS_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
)
_KOHYA_SUFFIXES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"))
_UNSUPPORTED = {
    "dora_scale": "DoRA (dora_scale)", "lora_magnitude_vector": "DoRA (lora_magnitude_vector)", "lora_B.bias": "LoRA biases (lora_B.bias)",
    "hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr", "lora_mid": "LyCORIS LoCon with a mid (Tucker) weight",
}


@dataclass
class LoraLayer:
    """One adapted layer of a LoRA file: ``name`` is a module path (diffusers/PEFT) or kohya's underscored name."""

    component: str
    name: str
    down: Any = None
    up: Any = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)


@dataclass
class LoraWeights:
    """A parsed LoRA file: its layers, the keys that name no layer in any known format, and per-component PEFT metadata."""

    path: Path
    sha256: str
    format: str  # "peft" | "diffusers" (older names) | "kohya" | "mixed"
    layers: list[LoraLayer]
    unparsed: list[str]
    metadata: dict[str, dict]
    n_keys: int


def resolve_file(path: str | Path) -> Path:
    """The safetensors file of a LoRA given as a file or as a folder holding ``pytorch_lora_weights.safetensors``."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"LoRA {p}: pickled {p.suffix} files are refused (unpickling can run code); convert it to .safetensors")
    if p.is_dir():
        found = p / DIFFUSERS_WEIGHT_NAME
        if not found.is_file():
            raise UserError(f"LoRA {p} is a folder without {DIFFUSERS_WEIGHT_NAME}; give the .safetensors file")
        return found
    if not p.is_file():
        raise UserError(f"LoRA file {p} does not exist")
    return p


def read_lora(path: str | Path) -> LoraWeights:
    """Parse one LoRA file (see the module docstring for the formats).

    Raises:
        UserError: a pickled file, a file that is not safetensors, no LoRA weights in it, DoRA / LoRA-bias / LyCORIS
            weights, or a bad alpha. (A layer with a down but no up matrix is refused when it is merged.)
    """
    from safetensors import SafetensorError, safe_open

    from pocketfusion.artifact import sha256_file

    file = resolve_file(path)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"LoRA {file} is not a readable safetensors file ({why})") from None
    for key in tensors:
        for marker, what in _UNSUPPORTED.items():
            if marker in key:
                raise UserError(f"LoRA {file}: {what} is not supported (key {key}); give a plain LoRA")
    layers: dict[tuple[str, str], LoraLayer] = {}
    unparsed, formats = [], set()
    for key in sorted(tensors):
        parsed = _parse_key(key)
        if parsed is None:
            unparsed.append(key)
            continue
        comp, name, role, fmt = parsed
        formats.add(fmt)
        layer = layers.setdefault((comp, name), LoraLayer(comp, name))
        if getattr(layer, role) is not None:
            raise UserError(f"LoRA {file}: two {role} weights for layer {comp}.{name} (keys {layer.keys + [key]})")
        value = tensors[key]
        if role == "alpha":
            if value.numel() != 1 or not bool(value.isfinite().all()):
                raise UserError(f"LoRA {file}: {key} is not one finite number (shape {tuple(value.shape)})")
            value = value.item()
        setattr(layer, role, value)
        layer.keys.append(key)
    if not layers:
        shown = ", ".join(list(tensors)[:3]) or "none"
        raise UserError(f"LoRA {file}: no LoRA weights found (keys: {shown}{', ...' if len(tensors) > 3 else ''}); expected the "
                        "diffusers/PEFT (unet.*.lora_A.weight) or kohya (lora_unet_*.lora_down.weight) format")
    fmt = formats.pop() if len(formats) == 1 else "mixed"
    return LoraWeights(path=file, sha256=sha256_file(file), format=fmt, layers=list(layers.values()), unparsed=unparsed,
                       metadata=_peft_metadata(file, header), n_keys=len(tensors))


def _parse_key(key: str) -> tuple[str, str, str, str] | None:
    """(component, layer name, role, format) of one key, or None when it is in no known format."""
    for prefix, comp in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            for suffix, role in _KOHYA_SUFFIXES:
                if key.endswith(suffix):
                    return comp, key[len(prefix):-len(suffix)], role, "kohya"
            return None
    comp = next((c for c in sorted(COMPONENTS, key=len, reverse=True) if key.startswith(c + ".")), None)
    if comp is None:
        return None
    rest = key[len(comp) + 1:].replace(".processor.", ".")
    for suffix, role in _DIFFUSERS_SUFFIXES:
        if rest.endswith(suffix):
            name = rest[:-len(suffix)]
            fmt = "peft" if suffix.startswith(".lora_A") or suffix.startswith(".lora_B") else "diffusers"
            return comp, name, role, fmt
    for role in ("down", "up"):
        suffix = f".{role}.weight"
        if rest.endswith(suffix):
            parent, _, proc = rest[:-len(suffix)].rpartition(".")
            table = _PROCESSOR_UNET if comp == "unet" else _PROCESSOR_TE
            if proc in table and parent:
                return comp, f"{parent}.{table[proc]}", role, "diffusers"
    return None


def _peft_metadata(file: Path, header: dict[str, str]) -> dict[str, dict]:
    """``{component: LoraConfig fields}`` from diffusers' ``lora_adapter_metadata`` (keys ``unet.r``, ``unet.lora_alpha``, ...)."""
    raw = header.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
        if not isinstance(flat, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise UserError(f"LoRA {file}: its {METADATA_KEY} is not valid JSON ({e})") from None
    out: dict[str, dict] = {}
    for key, value in flat.items():
        comp, _, field_name = key.partition(".")
        if comp in COMPONENTS and field_name:
            out.setdefault(comp, {})[field_name] = value
    for comp, meta in out.items():
        if meta.get("use_dora"):
            raise UserError(f"LoRA {file}: its {comp} adapter is DoRA (use_dora), which is not supported; give a plain LoRA")
        if meta.get("lora_bias"):
            raise UserError(f"LoRA {file}: its {comp} adapter has LoRA biases (lora_bias), which are not supported")
    return out
