"""Test helpers of the export stage: quantized model folders as ``compress`` writes them, and exports.

The model fixtures themselves (tiny U-Net families, a tiny pipeline) are ``pocketfusion.testing.fixtures``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketfusion import artifact, backends


def export_tiny_unet(target: str, family: str, out_dir, cfg=None):
    """Export ``tiny_unet(family)`` with ``target``'s exporter into ``out_dir``.

    Returns ``(spec, path, exported)``: the component spec (with seeded golden inputs), the written
    path and the exporter's ``Exported`` (``info``, ``layer_map``).
    """
    from pocketfusion.export.base import ExportConfig
    from pocketfusion.export.components import unet_spec
    from pocketfusion.testing.fixtures import TINY_SEQ_LEN, tiny_unet

    spec = unet_spec(tiny_unet(family), seq_len=TINY_SEQ_LEN)
    path = Path(out_dir) / f"unet{backends.backend(target).extension}"
    res = backends.exporter(target).export_component(spec, path, cfg or ExportConfig(targets=(target,)))
    return spec, path, res


def save_quantized(folder, make_grid, *, copy_from=None, unet=None, calibration=None):
    """What ``compress`` writes, for tests: a U-Net put on a grid by ``make_grid(unet)`` (returns the
    QuantGrid, applied in place), saved with that grid and a manifest whose ``unet`` component
    references it (``GridRef``).

    ``copy_from``: a pipeline folder copied to ``folder`` first, its U-Net quantized; otherwise
    ``unet`` (default ``tiny_unet()``) saved as a bare U-Net folder. ``calibration``: a calibration
    set directory copied in and referenced by the manifest (``CalibrationRef``). Returns ``folder``.
    """
    folder = Path(folder)
    if copy_from is not None:
        from pocketfusion.checkpoint import load_model

        shutil.copytree(copy_from, folder)
        (folder / artifact.MANIFEST).unlink(missing_ok=True)
        unet, rel = load_model(folder).components["unet"], "unet"
    else:
        from pocketfusion.testing.fixtures import tiny_unet

        unet, rel = (unet if unet is not None else tiny_unet()), "."
    grid = make_grid(unet)
    udir = artifact.resolve_path(folder, rel)
    unet.save_pretrained(str(udir), safe_serialization=True)
    grid.save(udir, unet)
    calib = None
    if calibration is not None:
        shutil.copytree(calibration, folder / "calibration")
        calib = artifact.CalibrationRef("calibration", artifact.content_hash(folder / "calibration"))
    comp = artifact.Component("unet", rel, "diffusers", grid=artifact.GridRef(rel, grid.scheme, grid.method))
    artifact.write_manifest(folder, stage="compress", settings={"scheme": grid.scheme, "method": grid.method}, source=None,
                            components=[comp], calibration=calib)
    return folder


@dataclass
class ExportedModel:
    """One component of an export of a model folder: the loaded model, its grid, the export's typed
    manifest entry and measured figures."""

    model: Any  # checkpoint.Model
    grid: Any  # compress.quant.grid.QuantGrid of the component's source, or None
    dir: Path  # the export directory
    component: artifact.Component
    entry: dict  # metrics["components"][component.key]

    @property
    def path(self) -> Path:
        return artifact.resolve_path(self.dir, self.component.path)


def export_entry(folder, cfg, out, key: str) -> ExportedModel:
    """``export`` of the model in ``folder``; the component ``key`` (e.g. ``"onnx/unet"``) of the result."""
    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.quant.grid import load_grid
    from pocketfusion.export.api import export
    from pocketfusion.export.base import SOURCES

    model = load_model(folder)
    manifest = export(model, cfg, out, progress=False)
    target, name = key.split("/")
    return ExportedModel(model, load_grid(model, SOURCES[name]), Path(out), manifest.component(name, target),
                         manifest.metrics["components"][key])
