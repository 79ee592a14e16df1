"""Merging parsed LoRAs into a loaded model's layers, exactly as diffusers' ``load_lora_weights`` + ``fuse_lora``
(PEFT's ``merge``) does: ``W += (up @ down) * (alpha / rank * scale)`` for a linear layer, and for a convolution
``W += conv(down^T, up)^T * (alpha / rank * scale)`` (1x1: the matrix product), computed in float32 for a half-precision
model on the CPU.

Every LoRA of a config is read and checked against the model (names, shapes) before any weight changes, so a bad
file leaves the model as it was.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from pocketfusion.compress.lora.config import LoraConfig, LoraFile
from pocketfusion.compress.lora.read import LoraLayer, LoraWeights, read_lora
from pocketfusion.errors import UserError

logger = logging.getLogger(__name__)

SHOWN = 5  # unmatched keys named in an error or a note


@dataclass
class _Planned:
    layer: LoraLayer
    module: Any  # the torch module whose weight changes
    scaling: float


def merge_in_memory(model, cfg: LoraConfig) -> list[dict]:
    """Merge ``cfg``'s LoRAs, in order, into ``model``'s U-Net and text encoder(s) in place (no file is written).

    Args:
        model: a loaded ``checkpoint.Model`` (a pipeline, or a bare U-Net or text encoder), float, not quantized.
        cfg: the LoRA files and scales (``LoraConfig``).

    Returns:
        One record per LoRA, in order: ``path``, ``sha256``, ``format``, ``scale``, ``matched_keys``, ``unmatched_keys``,
        ``layers`` (adapted layers per component) and ``unmatched`` (the first few unmatched keys).

    Raises:
        UserError: a quantized model; a file ``read_lora`` refuses; a LoRA layer whose shape does not fit the model's
            (naming the layer and both shapes); keys that name no layer of the model (naming the first few) unless
            ``cfg.allow_unmatched``.

    Example:
        >>> from pocketfusion.checkpoint import load_model
        >>> m = load_model("demo")
        >>> merge_in_memory(m, LoraConfig(loras=[("style.safetensors", 0.8)]))[0]["matched_keys"]
        96
    """
    if model.quantized:
        raise UserError(f"{model.path} is quantized: merge LoRAs into its float source, then quantize")
    return _merge(model, cfg)


def merge_into_quantized(model, cfg: LoraConfig) -> tuple[list[dict], Any]:
    """What stable-diffusion.cpp does with a LoRA on a quantized model, for comparison only (``pocketfusion lora``
    refuses a quantized model): each adapted U-Net layer's delta is added to its dequantized weight and the sum is
    re-quantized by round-to-nearest onto fresh abs-max scales of the layer's own bits and groups (ggml's add on a
    quantized tensor). A delta smaller than half a quantization step is rounded away: the LoRA fades at 4 bits.

    Returns the records of ``merge_in_memory`` and the U-Net's new ``QuantGrid`` (in place: ``model`` holds it).
    """
    from pocketfusion.compress.quant import grid as G
    from pocketfusion.compress.quant.unet import rtn_like

    qgrid = G.load_grid(model, "unet")
    if qgrid is None:
        raise UserError(f"{model.path}: no quantized U-Net to apply the LoRA to")
    records = _merge(model, cfg)
    return records, rtn_like(model.unet, qgrid)


def _merge(model, cfg: LoraConfig) -> list[dict]:
    plans = []
    for spec in cfg.loras:
        weights = read_lora(spec.path)
        plans.append((spec, weights, *_plan(model, weights, spec, cfg.allow_unmatched)))
    records = []
    for spec, weights, planned, unmatched in plans:
        for p in planned:
            _apply(p)
        records.append(_record(spec, weights, planned, unmatched))
        logger.info("merged LoRA %s at scale %s: %d layers", weights.path, spec.scale, len(planned))
    return records


def _plan(model, weights: LoraWeights, spec: LoraFile, allow_unmatched: bool) -> tuple[list[_Planned], list[str]]:
    """Each layer of ``weights`` with its module and scaling; the keys that match no layer."""
    import torch

    unmatched = list(weights.unparsed)
    planned, absent = [], set()
    index: dict[str, dict[str, str]] = {}
    for layer in weights.layers:
        comp = model.components.get(layer.component)
        if not isinstance(comp, torch.nn.Module):
            unmatched.extend(layer.keys)
            absent.add(layer.component)
            continue
        if layer.keys[0].startswith("lora_"):  # kohya: the module path with "_" for "."
            names = index.setdefault(layer.component, _underscored(comp))
            path = names.get(layer.name)
        else:
            path = layer.name
        module = _submodule(comp, path) if path is not None else None
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            unmatched.extend(layer.keys)
            continue
        if layer.down is None or layer.up is None:
            missing, have = ("up", "down") if layer.up is None else ("down", "up")
            raise UserError(f"LoRA {weights.path}: layer {layer.component}.{path} has a {have} matrix but no {missing} matrix "
                            f"(keys {layer.keys})")
        _check_shapes(weights, layer, f"{layer.component}.{path}", module)
        planned.append(_Planned(layer, module, _scaling(weights, layer, path, spec.scale)))
    if unmatched and (not allow_unmatched or not planned):
        where = f"{model.path}" + (f" ({model.class_name})" if model.kind == "component" else "")
        shown = ", ".join(unmatched[:SHOWN]) + (f" and {len(unmatched) - SHOWN} more" if len(unmatched) > SHOWN else "")
        hint = ("" if not planned else "; pass --allow-unmatched (LoraConfig.allow_unmatched) to merge the "
                f"{sum(len(p.layer.keys) for p in planned)} keys that match")
        why = f"it has no {' or '.join(sorted(absent))}" if absent else "a LoRA for another architecture?"
        raise UserError(f"LoRA {weights.path}: {len(unmatched)} of {weights.n_keys} keys name no layer of {where}: {shown}"
                        f" ({why}){hint}")
    return planned, unmatched


def _underscored(component) -> dict[str, str]:
    """kohya's name of every linear and convolution layer (the module path with ``_`` for ``.``) -> the path."""
    import torch

    out: dict[str, str] = {}
    for name, m in component.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            out.setdefault(name.replace(".", "_"), name)
    return out


def _submodule(component, path: str):
    try:
        return component.get_submodule(path)
    except AttributeError:
        return None


def _check_shapes(weights: LoraWeights, layer: LoraLayer, where: str, module) -> None:
    import torch

    down, up, w = layer.down, layer.up, module.weight
    conv = isinstance(module, torch.nn.Conv2d)
    want = 4 if conv else 2
    kind = "convolution" if conv else "linear layer"
    bad = None
    if down.ndim != want or up.ndim != want:
        bad = f"down {tuple(down.shape)} and up {tuple(up.shape)} are not {want}-D as a {kind}'s are"
    elif up.shape[1] != down.shape[0]:
        bad = f"the ranks differ: down {tuple(down.shape)}, up {tuple(up.shape)}"
    elif conv and tuple(up.shape[2:]) != (1, 1):
        bad = f"the up matrix {tuple(up.shape)} is not 1x1"
    elif conv and module.groups != 1:
        bad = f"the convolution has {module.groups} groups"
    else:
        delta = (up.shape[0], down.shape[1], *down.shape[2:])
        if tuple(delta) != tuple(w.shape):
            bad = (f"the LoRA's update is {tuple(delta)} (up {tuple(up.shape)} @ down {tuple(down.shape)}) but the model's "
                   f"weight is {tuple(w.shape)}")
    if bad:
        raise UserError(f"LoRA {weights.path}: layer {where} ({kind}): {bad}: a LoRA for another architecture?")


def _pattern_key(patterns, name: str) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` key that matches module ``name``, as PEFT's ``get_pattern_key`` finds it."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _scaling(weights: LoraWeights, layer: LoraLayer, path: str, scale: float) -> float:
    """PEFT's ``scaling``: alpha / rank (alpha / sqrt(rank) with rsLoRA), then times ``scale`` as ``fuse_lora`` does."""
    r = int(layer.down.shape[0])
    meta = weights.metadata.get(layer.component)
    rslora = False
    if layer.alpha is not None:  # kohya: per layer
        alpha = float(layer.alpha)
    elif meta:  # diffusers' lora_adapter_metadata: PEFT's LoraConfig of the component
        alpha = meta.get("lora_alpha", 8)
        key = _pattern_key(meta.get("alpha_pattern") or {}, path)
        if key is not None:
            alpha = meta["alpha_pattern"][key]
        rslora = bool(meta.get("use_rslora"))
    else:  # no alpha recorded: scale 1
        alpha = r
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    if scale != 1:
        scaling *= scale
    return scaling


def _apply(p: _Planned) -> None:
    """``W += delta`` with PEFT's own arithmetic (``LoraLayer.get_delta_weight`` then ``merge``)."""
    import torch

    w = p.module.weight
    a = p.layer.down.to(device=w.device, dtype=w.dtype)
    b = p.layer.up.to(device=w.device, dtype=w.dtype)
    cast = w.device.type == "cpu" and w.dtype in (torch.float16, torch.bfloat16)
    if cast:
        a, b = a.float(), b.float()
    with torch.no_grad():
        if isinstance(p.module, torch.nn.Linear):
            delta = (b @ a) * p.scaling
        elif tuple(w.shape[2:4]) == (1, 1):
            delta = (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * p.scaling
        else:
            delta = torch.nn.functional.conv2d(a.transpose(0, 1), b).transpose(0, 1) * p.scaling
        if cast:
            delta = delta.to(w.dtype)
        w.data += delta


def _record(spec: LoraFile, weights: LoraWeights, planned: list[_Planned], unmatched: list[str]) -> dict:
    layers: dict[str, int] = {}
    for p in planned:
        layers[p.layer.component] = layers.get(p.layer.component, 0) + 1
    return {
        "path": str(weights.path), "sha256": weights.sha256, "format": weights.format, "scale": spec.scale,
        "matched_keys": sum(len(p.layer.keys) for p in planned), "unmatched_keys": len(unmatched), "layers": layers,
        "unmatched": unmatched[:SHOWN],
    }
