"""Removable units of a ``UNet2DConditionModel`` and how a pruned U-Net is stored and loaded.

A *unit* is one ResNet block, one attention (``Transformer2DModel``) block, or the mid-block as a whole.
Removing a unit keeps its skip path, so every other weight keeps its shape and meaning:

* an attention block is residual (``x + f(x)``): removed, it is the identity;
* a ResNet block computes ``(shortcut(x) + f(x, temb)) / output_scale_factor``: removed, only
  ``shortcut(x) / output_scale_factor`` is left, ``shortcut`` being its 1x1 ``conv_shortcut`` where
  the block changes the channel count (every up-block ResNet, which takes the skip connection) and the
  identity elsewhere;
* the mid-block removed is the identity (diffusers' ``mid_block_type: null``).

``gate(unet)`` wraps every unit so that a training loop can drop any subset per call (SnapFusion's
robust training); ``remove(unet, names)`` deletes units for good. A pruned U-Net is saved as a
diffusers folder whose ``config.json`` expresses what a diffusers config can (a block whose attentions
are all gone becomes ``DownBlock2D`` / ``UpBlock2D``; a removed mid-block ``mid_block_type: null``) and
whose ``pruning.json`` lists the other removed units; ``checkpoint.load_component`` applies it. A folder
without ``pruning.json`` loads in plain diffusers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pocketfusion.errors import CheckpointError, UserError

PRUNING_FILE = "pruning.json"
MID = "mid_block"


@dataclass(frozen=True)
class Unit:
    name: str  # module path: "down_blocks.0.resnets.0", "up_blocks.1.attentions.2", "mid_block"
    kind: str  # "resnet" | "attention" | "mid"
    stage: str  # "down" | "mid" | "up"
    params: int


def units(unet) -> list[Unit]:
    """Every removable unit of ``unet`` in forward order (down, mid, up), the mid-block itself included."""
    found = []
    for stage, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        for i, block in enumerate(blocks):
            for kind, attr in (("resnet", "resnets"), ("attention", "attentions")):
                for j, m in enumerate(getattr(block, attr, None) or []):
                    if not isinstance(m, _Removed):
                        found.append(Unit(f"{stage}_blocks.{i}.{attr}.{j}", kind, stage, _params(m)))
    mid = unet.mid_block
    if mid is not None:
        found.append(Unit(MID, "mid", "mid", _params(mid)))
        for kind, attr in (("resnet", "resnets"), ("attention", "attentions")):
            for j, m in enumerate(getattr(mid, attr, None) or []):
                if not isinstance(m, _Removed):
                    found.append(Unit(f"{MID}.{attr}.{j}", kind, "mid", _params(m)))
    order = {"down": 0, "mid": 1, "up": 2}
    return sorted(found, key=lambda u: (order[u.stage], u.name != MID))


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _parent(unet, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (unet.get_submodule(parent) if parent else unet), leaf


def _get(unet, name: str) -> nn.Module:
    return unet.get_submodule(name)


def _set(unet, name: str, module: nn.Module | None) -> None:
    parent, leaf = _parent(unet, name)
    if isinstance(parent, nn.ModuleList):
        parent[int(leaf)] = module
    else:
        setattr(parent, leaf, module)


class _Removed(nn.Module):
    """Marker base of a removed unit's stand-in."""


class RemovedResnet(_Removed):
    """A ResNet block without its residual branch: ``shortcut(x) / output_scale_factor``."""

    def __init__(self, resnet: nn.Module | None = None, *, conv_shortcut: nn.Module | None = None, scale: float = 1.0):
        super().__init__()
        if resnet is not None:
            if getattr(resnet, "up", False) or getattr(resnet, "down", False):
                raise UserError("a ResNet block that resamples cannot be removed (its skip path resamples too)")
            conv_shortcut, scale = resnet.conv_shortcut, float(resnet.output_scale_factor)
        self.conv_shortcut = conv_shortcut
        self.scale = scale

    def forward(self, x, temb=None, *args, **kwargs):
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x / self.scale if self.scale != 1.0 else x


class RemovedAttention(_Removed):
    """An attention block removed: the identity (``return_dict=False`` callers index ``[0]``)."""

    def forward(self, hidden_states, *args, return_dict: bool = True, **kwargs):
        return (hidden_states,)


class RemovedMid(_Removed):
    has_cross_attention = True  # takes (and ignores) whatever the U-Net passes

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _stand_in(unit_module: nn.Module, kind: str) -> nn.Module:
    if kind == "resnet":
        return RemovedResnet(unit_module)
    return RemovedAttention() if kind == "attention" else RemovedMid()


def _kind(unet, name: str) -> str:
    if name == MID:
        return "mid"
    kind = {"resnets": "resnet", "attentions": "attention"}.get(name.split(".")[-2] if "." in name else "")
    if kind is None:
        raise UserError(f"{name!r} is not a removable unit (a ResNet or attention block, or mid_block)")
    return kind


def check_names(unet, names) -> list[str]:
    """``names`` validated against ``unet``'s units (unknown ones raise ``UserError`` listing a few known)."""
    known = {u.name for u in units(unet)}
    names = list(dict.fromkeys(names))
    if bad := [n for n in names if n not in known]:
        raise UserError(f"unknown U-Net unit(s) {bad[:3]}; units are e.g. {sorted(known)[:4]}")
    return names


def remove(unet, names) -> None:
    """Remove units ``names`` from ``unet`` in place (their weights are dropped, their skip paths kept)."""
    names = check_names(unet, names)
    if MID in names:
        unet.mid_block = None
        names = [n for n in names if not n.startswith(MID)]
    for n in names:
        if unet.mid_block is None and n.startswith(MID + "."):
            continue
        _set(unet, n, _stand_in(_get(unet, n), _kind(unet, n)))


class Gate(nn.Module):
    """A unit that can be switched off per forward pass (``gates.drop`` names the units off)."""

    def __init__(self, module: nn.Module, kind: str, name: str, state: dict):
        super().__init__()
        self.module, self.kind, self.name, self._state = module, kind, name, state
        # not a registered submodule: it shares the unit's own shortcut conv, which must stay one state_dict entry
        self.__dict__["removed"] = _stand_in(module, kind)
        if hasattr(module, "has_cross_attention"):  # the U-Net asks its mid-block whether to pass the context
            self.has_cross_attention = module.has_cross_attention

    def forward(self, *args, **kwargs):
        if self.name in self._state["drop"]:
            return self.removed(*args, **kwargs)
        return self.module(*args, **kwargs)


class Gates:
    """Handle on a gated U-Net: set ``drop`` to the units to skip on the next calls; ``ungate`` restores it."""

    def __init__(self, unet, names: list[str], state: dict):
        self.unet, self.names, self._state = unet, names, state

    @property
    def drop(self) -> frozenset[str]:
        return self._state["drop"]

    @drop.setter
    def drop(self, names) -> None:
        self._state["drop"] = frozenset(names)

    def ungate(self) -> None:
        for n in sorted(self.names, key=lambda n: n.count(".")):  # outer gates first
            g = _get(self.unet, n)
            if isinstance(g, Gate):
                _set(self.unet, n, g.module)


def gate(unet, names=None) -> Gates:
    """Wrap units ``names`` (default: all) of ``unet`` in ``Gate``s, in place. The stand-ins share the
    units' own shortcut convolutions, so weights stay where they are (``state_dict`` keys gain ``.module``)."""
    names = check_names(unet, names if names is not None else [u.name for u in units(unet)])
    state: dict = {"drop": frozenset()}
    for n in sorted(names, key=lambda n: -n.count(".")):  # inner units before the mid-block that holds them
        _set(unet, n, Gate(_get(unet, n), _kind(unet, n), n, state))
    return Gates(unet, names, state)


def expressible(config: dict, removed) -> tuple[dict, list[str]]:
    """The diffusers config of ``config`` with ``removed`` units gone where a config can say so, and the
    removed units it cannot express (to be listed in ``pruning.json``)."""
    removed = set(removed)
    cfg = dict(config)
    types = {"down_blocks": list(cfg["down_block_types"]), "up_blocks": list(cfg["up_block_types"])}
    swap = {"CrossAttnDownBlock2D": "DownBlock2D", "CrossAttnUpBlock2D": "UpBlock2D"}
    whole = set()  # blocks that lose every attention: an attention-free block type says so
    for (stage, i), n in _attention_counts(config).items():
        if n and types[stage][i] in swap and all(f"{stage}.{i}.attentions.{j}" in removed for j in range(n)):
            whole.add((stage, str(i)))
            types[stage][i] = swap[types[stage][i]]
    rest = []
    for name in sorted(removed):
        if name == MID or (name.startswith(MID + ".") and MID in removed):
            continue
        parts = name.split(".")
        if parts[0] != MID and parts[2] == "attentions" and (parts[0], parts[1]) in whole:
            continue
        rest.append(name)
    cfg["down_block_types"], cfg["up_block_types"] = types["down_blocks"], types["up_blocks"]
    if MID in removed:
        cfg["mid_block_type"] = None
    return cfg, rest


def _attention_counts(config: dict) -> dict[tuple[str, int], int]:
    """Attention blocks per (stage, block index) that a config implies."""
    lpb = config["layers_per_block"]
    n = len(config["down_block_types"])
    lpb = list(lpb) if isinstance(lpb, list | tuple) else [lpb] * n
    out = {}
    for i, t in enumerate(config["down_block_types"]):
        out[("down_blocks", i)] = lpb[i] if "CrossAttn" in t else 0
    for i, t in enumerate(config["up_block_types"]):
        out[("up_blocks", i)] = (lpb[::-1][i] + 1) if "CrossAttn" in t else 0
    return out


def save(unet, folder: str | Path, *, removed, source_config: dict) -> dict:
    """Write a pruned ``unet`` (its units ``removed`` already gone) as a diffusers folder; returns the
    pruning record (``pruning.json``'s content: ``removed``, ``not_in_config``, ``plain_diffusers``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config, rest = expressible(source_config, removed)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    record = {"removed": sorted(removed), "not_in_config": sorted(rest), "plain_diffusers": not rest}
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **config}, indent=2) + "\n")
    sd = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    if rest:
        (folder / PRUNING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def removed_units(unet) -> list[str]:
    """The units of a loaded U-Net that are removed beyond what its config says (their stand-ins)."""
    return sorted(name for name, m in unet.named_modules() if isinstance(m, _Removed))


def save_unet(unet, folder: str | Path) -> list[str]:
    """``unet.save_pretrained(folder)`` (safetensors) for any U-Net, a pruned one included: units removed beyond
    what its config says are listed in ``pruning.json``. Returns those units."""
    rest = removed_units(unet)
    unet.save_pretrained(str(folder), safe_serialization=True)
    if rest:
        record = {"removed": rest, "not_in_config": rest, "plain_diffusers": False}
        (Path(folder) / PRUNING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return rest


def apply_file(unet, folder: Path) -> None:
    """Apply ``folder/pruning.json`` (if any) to a U-Net just built from ``folder/config.json``."""
    path = Path(folder) / PRUNING_FILE
    if not path.is_file():
        return
    try:
        record = json.loads(path.read_text())
        names = [str(n) for n in record["not_in_config"]]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a pruning record ({e})") from None
    try:
        remove(unet, names)
    except UserError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read(folder: str | Path) -> dict | None:
    path = Path(folder) / PRUNING_FILE
    return json.loads(path.read_text()) if path.is_file() else None
