"""``adopt_decoder(model, donor, out)``: give a model the compact VAE another model already distilled from the
same original VAE, without training (stage ``decoder``).

The compact decoder learns the original VAE's decoding of the latent space; every model that shares that VAE
(the original, its pruned U-Net, its distilled students) samples into the same space, so one compact VAE serves
them all. ``donor`` is an artifact of ``compress_decoder``; its source's VAE must equal ``model``'s VAE weight
for weight (checked), else the adoption is refused. The donor's measured figures travel with it in the manifest
(``metrics["decoder"]``, marked as measured on the donor's source latents).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from pocketfusion import artifact
from pocketfusion.errors import UserError

STAGE = "decoder"
_FORMATS = {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers", "tokenizer": "tokenizer", "scheduler": "scheduler"}


def adopt_decoder(model, donor, out: str | Path) -> artifact.Manifest:
    """Write ``out``: ``model`` with ``donor``'s compact VAE.

    Raises:
        UserError: ``donor`` is not a ``decoder`` artifact, its source is not on this machine, or that source's VAE
            is not ``model``'s.
    """
    import torch

    from pocketfusion.checkpoint import find_source, load_model, sampler_of

    out = Path(out)
    if model.kind != "pipeline":
        raise UserError(f"{model.path} is a bare {model.class_name}: a compact VAE goes into a pipeline")
    dm = artifact.load_manifest(donor.path) if (Path(donor.path) / artifact.MANIFEST).is_file() else None
    if dm is None or dm.stage != STAGE:
        raise UserError(f"--from {donor.path} is not a compact-VAE artifact (made by 'pocketfusion decoder')")
    if type(model.components["vae"]).__name__ != "AutoencoderKL":
        raise UserError(f"{model.path} already has a {type(model.components['vae']).__name__} VAE")
    src_path = find_source(donor)
    if src_path is None:
        raise UserError(f"the original of {donor.path} ({dm.source.path if dm.source else '?'}) is not on this machine: "
                        "cannot check that its VAE is this model's")
    a, b = load_model(src_path).components["vae"].state_dict(), model.components["vae"].state_dict()
    if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
        raise UserError(f"{donor.path}'s compact VAE was distilled from another VAE than {model.path}'s")
    if out.resolve() == Path(model.path).resolve():
        raise UserError(f"output {out} is the source model folder; choose another directory")
    src = Path(model.path)
    index = json.loads((src / "model_index.json").read_text())
    vae = donor.components["vae"]
    source = artifact.source_ref(src)
    with artifact.staged_dir(out) as tmp:
        artifact.copy_components(src, tmp, skip=("vae",))
        shutil.copytree(Path(donor.path) / "vae", tmp / "vae")
        index["vae"] = ["diffusers", type(vae).__name__]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        sampler = dataclasses.replace(sampler_of(model), scaling_factor=float(vae.config.scaling_factor))
        comps = [artifact.Component(n, n, _FORMATS.get(n) or _FORMATS[n.rstrip("_0123456789")]) for n in model.components]
        donor_ref = artifact.source_ref(donor.path)
        metrics = {"decoder": {**dm.metrics.get("decoder", {}), "measured_on": f"the donor's source latents ({src_path})"},
                   "adopted_from": {"path": str(donor.path), "sha256": donor_ref.sha256}}
        notes = [f"compact VAE adopted from {donor.path} (distilled from the same original VAE; no training here)"]
        # the input's own record (its settings and seed; a distilled student's teacher, a pruned model's figures) stays readable
        settings: dict = {}
        if (src / artifact.MANIFEST).is_file():
            own = artifact.load_manifest(src)
            metrics.update({k: v for k, v in own.metrics.items() if k in ("training", "pruning")})
            settings = dict(own.settings)
        return artifact.write_manifest(tmp, stage=STAGE, settings={**settings, "adopt_from": str(donor.path)}, source=source,
                                       components=comps, sampler=sampler, metrics=metrics, notes=notes)
