"""The LoRA stage: ``merge_lora(model, LoraConfig, out)`` merges LoRA files into a model and writes a diffusers folder
(stage ``lora``) that plain diffusers loads::

    unet/, text_encoder/ (, text_encoder_2/)   the merged components (safetensors); the untouched ones copied as they are
    vae/, tokenizer/, scheduler/               the source's
    manifest.json                              settings (``LoraConfig.to_dict()``), source, the source's sampler;
                                               metrics["lora"]["loras"]: per LoRA its file's sha256, format, scale,
                                               matched and unmatched key counts, adapted layers per component

``annotate(dir, records)`` records the LoRAs a command merged first (``--lora``) in the manifests of what it wrote.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pocketfusion import artifact
from pocketfusion.compress.lora.config import LoraConfig
from pocketfusion.compress.lora.merge import merge_in_memory
from pocketfusion.errors import UserError

logger = logging.getLogger(__name__)

STAGE = "lora"
_FORMATS = {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers", "tokenizer": "tokenizer", "scheduler": "scheduler"}


def merge_lora(model, cfg: LoraConfig, out: str | Path) -> artifact.Manifest:
    """Merge ``cfg``'s LoRAs (in order) into ``model`` and write the result to ``out`` (stage ``lora``).

    The merge is done in place: afterwards ``model`` holds the merged weights.

    Args:
        model: a loaded ``checkpoint.Model``: a pipeline, or a bare U-Net or text-encoder folder; float.
        cfg: the LoRA files and scales (``LoraConfig``).
        out: the output directory (written under a temporary name, renamed into place when complete).

    Returns:
        The written ``artifact.Manifest``.

    Raises:
        UserError: everything ``merge_in_memory`` refuses (pickled or unreadable files, shapes or names that do not fit
            the model, a quantized model), or an output that is the source folder or a file.

    Example:
        >>> from pocketfusion.checkpoint import load_model
        >>> m = merge_lora(load_model("demo"), LoraConfig(loras=[("style.safetensors", 0.8)]), "runs/demo-style")
        >>> m.metrics["lora"]["loras"][0]["format"]
        'kohya'
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    if out.resolve() == Path(model.path).resolve():
        raise UserError(f"output {out} is the source model folder; choose another directory")
    source = artifact.source_ref(model.path)
    records = merge_in_memory(model, cfg)
    touched = sorted({c for r in records for c in r["layers"]})
    metrics = {"lora": {"loras": records, "components": touched}}
    notes = [_note(r) for r in records]
    return _write(model, touched, cfg, out, source=source, metrics=metrics, notes=notes)


def _note(r: dict) -> str:
    layers = ", ".join(f"{n} {c} layers" for c, n in r["layers"].items())
    skipped = f"; {r['unmatched_keys']} unmatched keys skipped (e.g. {', '.join(r['unmatched'])})" if r["unmatched_keys"] else ""
    return f"LoRA {Path(r['path']).name} ({r['format']}, scale {r['scale']:g}) merged: {r['matched_keys']} keys, {layers}{skipped}"


def _write(model, touched: list[str], cfg: LoraConfig, out: Path, *, source, metrics: dict, notes: list[str]) -> artifact.Manifest:
    from pocketfusion import pruning
    from pocketfusion.checkpoint import sampler_of

    src = Path(model.path)
    with artifact.staged_dir(out) as tmp:
        if model.kind == "component":  # a bare U-Net or text encoder: the folder is the component
            (name, comp), = model.components.items()
            _save(name, comp, tmp, pruning)
            comps = [artifact.Component(name, ".", _FORMATS.get(name) or _FORMATS[name.rstrip("_0123456789")])]
            return artifact.write_manifest(tmp, stage=STAGE, settings=cfg.to_dict(), source=source, components=comps,
                                           metrics=metrics, notes=notes)
        artifact.copy_components(src, tmp, skip=tuple(touched))
        (tmp / "model_index.json").write_text((src / "model_index.json").read_text())
        for name in touched:
            _save(name, model.components[name], tmp / name, pruning)
        comps = [artifact.Component(n, n, _FORMATS.get(n) or _FORMATS[n.rstrip("_0123456789")]) for n in model.components]
        return artifact.write_manifest(tmp, stage=STAGE, settings=cfg.to_dict(), source=source, components=comps,
                                       sampler=sampler_of(model), metrics=metrics, notes=notes)


def _save(name: str, comp, folder: Path, pruning) -> None:
    if name == "unet":
        pruning.save_unet(comp, folder)  # a pruned U-Net keeps its pruning.json
    else:
        comp.save_pretrained(str(folder), safe_serialization=True)


def annotate(directory: str | Path, records: list[dict], *, merged_into: str | Path | None = None) -> list[Path]:
    """Record LoRAs merged before a command ran (``--lora``) in every manifest under ``directory``.

    Each manifest gets ``metrics["lora"] = {"merged_into": ..., "loras": records}`` and a note. ``merged_into`` is the
    LoRA stage's folder the command read its model from (its ``source``), or None when the LoRAs were merged in memory
    (then ``source`` names a folder whose weights do not include them). Returns the manifests changed.
    """
    changed = []
    root = Path(directory)
    names = ", ".join(f"{Path(r['path']).name} (scale {r['scale']:g})" for r in records)
    where = (f"merged into {merged_into} (stage lora) before this command read it" if merged_into is not None else
             "merged in memory into the model read from the source before this stage; the source folder's own weights do not "
             "include them")
    for path in sorted(root.rglob(artifact.MANIFEST)) if root.is_dir() else []:
        data = json.loads(path.read_text())
        data.setdefault("metrics", {})["lora"] = {"merged_into": str(merged_into) if merged_into is not None else None,
                                                  "loras": records}
        data["notes"] = [*data.get("notes", []), f"LoRAs {names}: {where}"]
        artifact.atomic_write_text(path, json.dumps(data, indent=2) + "\n")
        changed.append(path)
    return changed


def summary(manifest: artifact.Manifest) -> str:
    """One line per merged LoRA."""
    lines = []
    for r in manifest.metrics["lora"]["loras"]:
        layers = ", ".join(f"{c} {n}" for c, n in r["layers"].items())
        lines.append(f"  {Path(r['path']).name}: {r['format']}, scale {r['scale']:g}, {r['matched_keys']} keys matched "
                     f"({layers} layers), {r['unmatched_keys']} unmatched")
    return "\n".join(lines)
