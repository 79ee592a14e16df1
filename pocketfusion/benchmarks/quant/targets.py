"""Rows on an exported U-Net file: where the file is (the manifest's typed components), how a row runs
it (the registry's runtime), and the fp32 export copy with a quantized U-Net swapped in (for images)."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from pocketfusion import artifact, backends
from pocketfusion.benchmarks.quant.coreml_readback import SIZE_ONLY_NOTE, coreml_measure
from pocketfusion.benchmarks.quant.measure import artifact_bytes, session_runner
from pocketfusion.benchmarks.quant.rows import Planned, Row, planned


def runs_here(target: str) -> bool:
    """Whether ``target``'s runtime predicts on this (Linux) host; Core ML rows are measured by read-back."""
    return backends.backend(target).runs_on_linux


def runtime_of(target: str) -> str:
    return backends.backend(target).runtime


def unet_component(export_dir: Path, target: str) -> artifact.Component:
    """The U-Net's typed entry of ``target`` in an export directory's manifest."""
    return artifact.load_manifest(export_dir, verify=False).component("unet", target)


def unet_path(export_dir: Path, target: str) -> Path:
    """The U-Net file (or ``.mlpackage`` folder) of ``target`` in an export directory."""
    return artifact.resolve_path(export_dir, unet_component(export_dir, target).path)


def _side_files(main: Path) -> list[Path]:
    """``main`` and the files beside it that belong to it (``.io.json``, ``.data``)."""
    return [p for p in main.parent.iterdir() if p.name == main.name or p.name.startswith(main.name + ".")]


def swap_unet(base: Path, target: str, unet_file: Path, dst: Path) -> Path:
    """Copy the fp32 export directory ``base`` (its ``target`` only, golden sets left out) to ``dst``
    with the U-Net file replaced by ``unet_file`` (and its side files: ``.io.json``, ``.data``), and
    write its manifest again (components, sampler; the U-Net's size updated; checksums).

    ``unet_file`` must carry the name of the U-Net file it replaces (an ONNX file names its
    external-data file inside)."""
    base, unet_file = Path(base), Path(unet_file)
    m = artifact.load_manifest(base, verify=False)
    comps = [dataclasses.replace(c, golden=None) for c in m.components if c.target in (None, target)]
    unet = m.component("unet", target)
    if Path(unet.path).name != unet_file.name:
        raise ValueError(f"{unet_file.name} would replace {unet.path}: give the quantized file the exported file's name")
    keep = {Path(c.path).parts[0] for c in comps}
    keep |= {Path(p).parts[0] for p in ((m.sampler.scheduler, m.sampler.tokenizer) if m.sampler else ())}
    drop = {Path(c.path).parts[0] for c in m.components if c.target not in (None, target)}
    drop |= {Path(c.golden).parts[0] for c in m.components if c.golden}
    drop -= keep
    shutil.copytree(base, dst, ignore=lambda d, names: drop.intersection(names) if Path(d) == base else set())
    tgt = artifact.resolve_path(dst, unet.path)
    for old in _side_files(tgt):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    for src in _side_files(unet_file):
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tgt.parent / src.name)
    metrics = {k: dict(v) for k, v in m.metrics.get("components", {}).items() if k in {c.key for c in comps}}
    if unet.key in metrics:
        metrics[unet.key]["size_bytes"] = artifact_bytes(tgt)
    (dst / artifact.MANIFEST).unlink(missing_ok=True)
    artifact.write_manifest(dst, stage="export", settings=m.settings, source=m.source, components=comps, calibration=m.calibration,
                            sampler=m.sampler, metrics={"components": metrics}, notes=m.notes)
    return dst


def run_on_target(b, r: Row, target: str, path: Path, swap_dir: Path, layer_map: Mapping[str, str]) -> None:
    """Run the U-Net file ``path`` in ``target``'s runtime (error, latency) and, for a pipeline,
    generate images through the fp32 export with it swapped in; where the runtime does not run here
    (Core ML), measure by reading the weights back through ``layer_map`` (the export's)."""
    from pocketfusion.runtimes.base import load_session

    if not runs_here(target):
        coreml_measure(b, r, path, layer_map)
        return
    s = load_session(path, runtime_of(target), threads=b.threads)
    r.run = session_runner(s)
    r.extra["device"] = s.device
    if b.model.kind == "pipeline":
        swapped = swap_unet(b.base_export(target), target, path, swap_dir)
        r.generate = b.runtime_generate(swapped, runtime_of(target))


def fp32_target_row(b, target: str) -> Planned:
    """pocketfusion's fp32 export of ``target`` (the reference every row of that target is a % of)."""

    def make(r: Row):
        from pocketfusion.runtimes.base import load_session

        base = b.base_export(target)
        r.make_seconds = b.base_seconds.get(target)
        r.size_bytes = r.fp32_bytes = b.fp32_file_bytes(target)
        r.size_kind = "file"
        if not runs_here(target):
            r.notes.append(SIZE_ONLY_NOTE)
            return
        s = load_session(unet_path(base, target), runtime_of(target), threads=b.threads)
        r.run, r.generate = session_runner(s), (b.runtime_generate(base, runtime_of(target)) if b.model.kind == "pipeline" else None)
        r.extra["device"] = s.device

    return planned(f"fp32 {target}", "fp32", target, 32, {"fp32", target}, make)


def artifact_peer(b, target: str, produce: Callable[[Path, Path], Path], name: str,
                  on_file: Callable[[Row, Path], None] | None = None) -> Callable[[Row], None]:
    """``make(row)`` of a peer tool that quantizes pocketfusion's fp32 ``target`` file:
    ``produce(fp32 file, out file)``; ``on_file(row, out)`` adds what the tool's file shows."""

    def make(r: Row):
        base = b.base_export(target)
        comp = unet_component(base, target)
        src = artifact.resolve_path(base, comp.path)
        out = b.work / "peers" / target / name / src.name
        out.parent.mkdir(parents=True, exist_ok=True)
        produce(src, out)
        r.size_bytes, r.size_kind, r.fp32_bytes = artifact_bytes(out), "file", b.fp32_file_bytes(target)
        if on_file is not None:
            on_file(r, out)
        run_on_target(b, r, target, out, b.work / "swap" / target / name, comp.layer_map)  # the tool keeps the fp32 file's names

    return make
