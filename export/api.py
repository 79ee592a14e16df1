"""``export``: every component of a checkpoint to every requested target, with measured parity.

Output layout (one artifact directory, written atomically)::

    OUT/
      manifest.json                   stage "export": settings, source hash, typed components and
                                      sampler, files, metrics
      tokenizer/  scheduler/          copied from the source (a pipeline), for `generate OUT --runtime R`
      golden/<component>.safetensors  golden inputs and PyTorch reference outputs
      <target>/<component><ext>       e.g. onnx/unet.onnx, executorch/unet.pte

The manifest's ``components`` say where each exported file is, what it takes and gives, the grid it
was quantized on and its layer map; its ``sampler`` says how the runtime pipeline samples the
components (latent shape, scaling factor, tokenizer length, guidance mode). Measured figures go
to ``metrics["components"][component.key]``: ``size_bytes``, ``export_seconds``, ``parity``,
``versus_fp32`` and what the exporter recorded (rewrites, delegation, quantization...).

Parity: each exported component is run, through its runtime, on the golden inputs (for the
U-Net: real inputs from several timesteps of a sampling run) and compared with PyTorch
(``metrics.parity_error``). Beyond the target's tolerance (``rel_max``) the export fails with
``ParityError`` naming component, target, error and threshold. Targets that cannot run here (Core
ML on Linux) record why instead.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from pocketfusion import artifact, backends
from pocketfusion.errors import UserError
from pocketfusion.export.base import ExportConfig, ParityError, tolerance
from pocketfusion.export.components import ComponentSpec, heldout_pairs, pipeline_specs, session_output_error

logger = logging.getLogger(__name__)

GOLDEN_PROMPTS = (
    "a large red circle on a blue background, center",
    "a small white square on a black background, top left",
)


def torch_reference(spec: ComponentSpec) -> list[dict[str, np.ndarray]]:
    import torch

    refs = []
    for feed in spec.golden:
        args = tuple(torch.from_numpy(feed[s.name]) for s in spec.inputs)
        with torch.no_grad():
            out = spec.module(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)  # SDXL's text_encoder_2 gives two
        refs.append({s.name: o.numpy() for s, o in zip(spec.outputs, outs)})
    return refs


def parity(session, spec: ComponentSpec, refs: list[dict[str, np.ndarray]]) -> dict:
    """``metrics.parity_error`` of ``session`` against PyTorch over the golden feeds (``rel_max``: max-abs
    error / max |ref|), and the number of feeds; a component with several outputs (SDXL's
    ``text_encoder_2``) adds ``outputs``: each output's own ``parity_error``."""
    from pocketfusion.metrics import parity_error

    pairs: dict[str, list] = {}
    for feed, ref in zip(spec.golden, refs):
        got = session.run(feed)
        for name, r in ref.items():
            pairs.setdefault(name, []).append((got[name], r))
    res = {**parity_error([pr for prs in pairs.values() for pr in prs]), "feeds": len(spec.golden)}
    if len(pairs) > 1:
        res["outputs"] = {name: parity_error(prs) for name, prs in pairs.items()}
    return res


def size_versus_fp32(spec: ComponentSpec, size_bytes: int) -> dict:
    fp32_bytes = 4 * sum(p.numel() for p in spec.source_module.parameters())
    return {"fp32_weight_bytes": fp32_bytes, "size_ratio_to_fp32_weights": size_bytes / fp32_bytes}


def measured_versus_fp32(session, spec: ComponentSpec, *, max_feeds: int = 64, timing_runs: int = 10) -> dict:
    """What a quantized component costs against the float model it came from, measured through ``session``:
    ``metrics.output_error`` on the calibration set's held-out feeds against the fp32 model's recorded
    outputs (``rel_rms``, ``snr_db``, as ``compress`` reports them) and host latency per call (median)."""
    pairs = heldout_pairs(spec, max_feeds)
    err = session_output_error(session, pairs)
    times = []
    feed = spec.golden[0]
    for i in range(2 + timing_runs):
        t0 = time.perf_counter()
        session.run(feed)
        if i >= 2:  # two warm-up calls
            times.append(time.perf_counter() - t0)
    return {
        "heldout_feeds": len(pairs), "rel_rms": err["rel_rms"], "snr_db": err["snr_db"],
        "latency_ms_median": 1e3 * float(np.median(times)), "latency_runs": timing_runs, "device": session.device,
    }


def _size(path: Path) -> int:
    """Bytes of an exported component: its file and sidecars (``.data``, ``.io.json``), or its package directory."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*") if f.is_file())


def _check_parity(entry: dict, path: Path, target: str, spec: ComponentSpec, refs, tol: float) -> None:
    """Run the written component through its runtime; record parity (and the measured cost of a grid)."""
    from pocketfusion.runtimes.base import load_session

    try:
        session = load_session(path, backends.backend(target).runtime)
    except UserError as e:  # runtime unavailable on this platform (Core ML on Linux)
        entry["parity"] = {"status": "not run", "reason": str(e)}
        return
    p = parity(session, spec, refs)
    p.update(tolerance=tol, device=session.device, status="pass" if p["rel_max"] <= tol else "fail")
    entry["parity"] = p
    if p["status"] == "fail":
        raise ParityError(
            f"{target}/{spec.name}: relative error (rel_max) {p['rel_max']:.3g} (max abs {p['max_abs']:.3g}) "
            f"exceeds the {target} tolerance {tol:g}"
        )
    if spec.grid is not None and spec.heldout:
        entry["versus_fp32"].update(measured_versus_fp32(session, spec))


def _grid_ref(model, spec: ComponentSpec) -> artifact.GridRef | None:
    """The source model's grid of the spec's component, as an absolute reference."""
    ref = model.ref(spec.source)
    if spec.grid is None or ref is None or ref.grid is None:
        return None
    return dataclasses.replace(ref.grid, path=str(artifact.resolve_path(model.path, ref.grid.path).resolve()))


def _export_one(model, target: str, spec: ComponentSpec, tmp: Path, cfg: ExportConfig, refs) -> tuple[artifact.Component, dict]:
    """Export one component to one target; returns its typed manifest entry and its measured figures."""
    b = backends.backend(target)
    mod = backends.exporter(target)
    (tmp / target).mkdir(exist_ok=True)
    rel = f"{target}/{spec.name}{b.extension}"
    path = tmp / rel
    t0 = time.perf_counter()
    res = mod.export_component(spec, path, cfg)
    seconds = time.perf_counter() - t0
    size = _size(path)
    entry = {"size_bytes": size, "export_seconds": round(seconds, 2), **res.info}
    if spec.grid is not None:  # completed by measured_versus_fp32 where the target runs here
        entry["versus_fp32"] = size_versus_fp32(spec, size)
    if cfg.check_parity:
        _check_parity(entry, path, target, spec, refs, tolerance(target, cfg, res.info))
    logger.info("%s/%s: %.1f s, %d bytes", target, spec.name, seconds, size)
    comp = artifact.Component(
        name=spec.name, path=rel, format=b.format, target=target, inputs=spec.inputs, outputs=spec.outputs,
        grid=_grid_ref(model, spec), layer_map=res.layer_map, golden=f"golden/{spec.name}.safetensors",
    )
    return comp, entry


def _copy_sampler(model, tmp: Path) -> tuple[artifact.Sampler, list[artifact.Component]]:
    """The pipeline's sampler, with its tokenizer (SDXL: both) and scheduler folders copied into the artifact."""
    from pocketfusion.checkpoint import sampler_of

    sampler = sampler_of(model)
    folders = [("tokenizer", sampler.tokenizer), ("scheduler", sampler.scheduler)]
    if sampler.tokenizer_2 is not None:
        folders.append(("tokenizer_2", sampler.tokenizer_2))
    for name, rel in folders:
        shutil.copytree(artifact.resolve_path(model.path, rel), tmp / name)
    sampler = dataclasses.replace(sampler, tokenizer="tokenizer", scheduler="scheduler",
                                  tokenizer_2="tokenizer_2" if sampler.tokenizer_2 is not None else None)
    return sampler, [artifact.Component(name, name, name.removesuffix("_2")) for name, _ in folders]


def export(model, cfg: ExportConfig, out: str | Path, *, progress: bool = True) -> artifact.Manifest:
    """Export ``model``'s components (``cfg.components``) to ``cfg.targets`` into the artifact directory ``out``.

    Every component whose source has a quantization grid (``compress.quant.grid.load_grid``) is
    lowered on it. Returns the written manifest.

    Raises:
        ExportError: a converter cannot express a component.
        ParityError: an exported component misses its target's tolerance.
        MissingBackendError: a target's package is not installed (names the extra).
    """
    from tqdm import tqdm

    out = Path(out)
    for t in cfg.targets:  # fail early on a missing backend
        backends.exporter(t)
    specs = pipeline_specs(model, list(GOLDEN_PROMPTS), seed=cfg.seed, names=cfg.components)
    if not specs:
        raise UserError(f"nothing to export: the model has none of {', '.join(cfg.components)}")
    source = artifact.source_ref(model.path)
    components: list[artifact.Component] = []
    results: dict[str, dict] = {}
    sampler = None
    with artifact.staged_dir(out) as tmp:
        (tmp / "golden").mkdir()
        refs = {}
        for spec in specs:
            refs[spec.name] = torch_reference(spec)
            artifact.write_golden(tmp / "golden" / f"{spec.name}.safetensors", list(zip(spec.golden, refs[spec.name])))
        jobs = [(t, s) for t in cfg.targets for s in specs]
        for target, spec in tqdm(jobs, desc="export", disable=not progress, unit="component"):
            comp, entry = _export_one(model, target, spec, tmp, cfg, refs[spec.name])
            components.append(comp)
            results[comp.key] = entry
        if model.kind == "pipeline":
            sampler, extra = _copy_sampler(model, tmp)
            components += extra
        artifact.write_manifest(tmp, stage="export", settings=cfg.to_dict(), source=source, components=components,
                                sampler=sampler, metrics={"components": results})
    return artifact.load_manifest(out)
