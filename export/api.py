"""``export``: every component of a checkpoint to every requested target, with measured parity.

Output layout (one artifact directory, written atomically)::

    OUT/
      manifest.json                 stage "export": settings, source hash, files, metrics
      pipeline.json                 what the runtime pipeline needs (latent shape, scaling factor, ...)
      tokenizer/  scheduler/        copied from the source, for `generate OUT --runtime R`
      golden/<component>.safetensors  golden inputs and PyTorch reference outputs
      <target>/<component><ext>     e.g. onnx/unet.onnx, executorch/unet.pte

Parity: each exported component is run, through its runtime, on the golden inputs (for the
U-Net: real inputs from several timesteps of a sampling run) and compared with PyTorch. Beyond the
target's tolerance the export fails with ``ParityError`` naming component, target, error and
threshold. Targets that cannot run here (Core ML on Linux) record why instead.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from pocketfusion import artifact
from pocketfusion.errors import UserError
from pocketfusion.export.base import EXPORTERS, TOLERANCE, ExportConfig, ParityError
from pocketfusion.export.components import ComponentSpec, pipeline_specs

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
        refs.append({spec.outputs[0].name: out.numpy()})
    return refs


def parity(session, spec: ComponentSpec, refs: list[dict[str, np.ndarray]]) -> dict:
    """Max-abs, mean-abs and relative error (max-abs / max|ref|) of ``session`` over the golden feeds."""
    max_abs = mean_abs = peak = 0.0
    for feed, ref in zip(spec.golden, refs):
        got = session.run(feed)
        for name, r in ref.items():
            g = np.asarray(got[name], dtype=np.float64).reshape(r.shape)
            err = np.abs(g - r)
            max_abs = max(max_abs, float(err.max()))
            mean_abs = max(mean_abs, float(err.mean()))
            peak = max(peak, float(np.abs(r).max()))
    return {"max_abs": max_abs, "mean_abs": mean_abs, "rel": max_abs / max(peak, 1e-12), "feeds": len(spec.golden), "ref_max_abs": peak}


def size_versus_fp32(spec: ComponentSpec, size_bytes: int) -> dict:
    fp32_bytes = 4 * sum(p.numel() for p in spec.module.parameters())
    return {"fp32_weight_bytes": fp32_bytes, "size_ratio_to_fp32_weights": size_bytes / fp32_bytes}


def measured_versus_fp32(session, spec: ComponentSpec, *, max_feeds: int = 64, timing_runs: int = 10) -> dict:
    """What a quantized U-Net costs against the float model it came from, measured through ``session``:
    error on the calibration set's held-out feeds against the fp32 U-Net's recorded outputs (relative
    RMS error and SNR, as ``compress`` reports them) and host latency per call (median)."""
    import torch

    from pocketfusion.compress.quant import output_error

    pairs = spec.heldout[:: max(1, -(-len(spec.heldout) // max_feeds))]
    refs, outs = [], []
    for feed, ref in pairs:
        got = session.run(feed)
        for name, r in ref.items():
            refs.append(torch.from_numpy(np.asarray(r, dtype=np.float32)))
            outs.append(torch.from_numpy(np.asarray(got[name], dtype=np.float32).reshape(r.shape)))
    err = output_error(refs, outs)
    times = []
    feed = spec.golden[0]
    for i in range(2 + timing_runs):
        t0 = time.perf_counter()
        session.run(feed)
        if i >= 2:  # two warm-up calls
            times.append(time.perf_counter() - t0)
    return {
        "heldout_feeds": len(pairs), "rel": err["rel"], "snr_db": err["snr_db"],
        "latency_ms_median": 1e3 * float(np.median(times)), "latency_runs": timing_runs, "device": session.device,
    }


def _tolerance(target: str, cfg: ExportConfig, info: dict | None = None) -> float:
    if target == "coreml" and cfg.coreml_precision == "fp16":
        return TOLERANCE["coreml-fp16"]
    quant = (info or {}).get("quantization") or {}
    if quant.get("tolerance_key") in TOLERANCE:  # the exporter names its case (e.g. "executorch-qd8")
        return TOLERANCE[quant["tolerance_key"]]
    bits = quant.get("activation_bits")
    if bits and f"{target}-a{bits}" in TOLERANCE:  # statically quantized activations
        return TOLERANCE[f"{target}-a{bits}"]
    return TOLERANCE[target]


def _pipeline_json(model) -> dict:
    comps = model.components
    unet = comps["unet"]
    d = {"unet_batch": 2, "latent_shape": [1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size]}
    if model.kind == "pipeline":
        vae = comps["vae"]
        d.update(
            scaling_factor=vae.config.scaling_factor,
            max_length=comps["tokenizer"].model_max_length,
            scheduler=type(comps["scheduler"]).__name__,
        )
    return d


def export_model(model, cfg: ExportConfig, out: str | Path, *, progress: bool = True) -> artifact.Manifest:
    """Export ``model``'s components to ``cfg.targets`` into the artifact directory ``out``.

    Raises:
        ExportError: a converter cannot express a component.
        ParityError: an exported component misses its target's tolerance.
        MissingBackendError: a target's package is not installed (names the extra).
    """
    from tqdm import tqdm

    from pocketfusion.runtimes.base import load_session

    out = Path(out)
    exporters = {t: importlib.import_module(EXPORTERS[t]) for t in cfg.targets}  # fail early on a missing backend
    specs = [s for s in pipeline_specs(model, list(GOLDEN_PROMPTS), seed=cfg.seed) if s.name in cfg.components]
    if not specs:
        raise UserError(f"nothing to export: the model has none of {', '.join(cfg.components)}")
    source = artifact.source_ref(model.path)
    results: dict[str, dict] = {}
    with artifact.staged_dir(out) as tmp:
        (tmp / "golden").mkdir()
        refs = {}
        for spec in specs:
            refs[spec.name] = torch_reference(spec)
            artifact.write_golden(artifact.golden_path(tmp, spec.name), list(zip(spec.golden, refs[spec.name])))
        if model.kind == "pipeline":
            for name in ("tokenizer", "scheduler"):
                shutil.copytree(Path(model.path) / name, tmp / name)
        artifact.atomic_write_text(tmp / "pipeline.json", json.dumps(_pipeline_json(model), indent=2) + "\n")
        jobs = [(t, s) for t in cfg.targets for s in specs]
        for target, spec in tqdm(jobs, desc="export", disable=not progress, unit="component"):
            mod = exporters[target]
            (tmp / target).mkdir(exist_ok=True)
            path = tmp / target / f"{spec.name}{mod.EXTENSION}"
            t0 = time.perf_counter()
            info = mod.export_component(spec, path, cfg)
            seconds = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*") if f.is_file())
            if path.is_dir():
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            entry = {
                "target": target, "component": spec.name, "path": path.relative_to(tmp).as_posix(),
                "inputs": [s.to_dict() for s in spec.inputs], "outputs": [s.to_dict() for s in spec.outputs],
                "size_bytes": size, "export_seconds": round(seconds, 2), **info,
            }
            if spec.quant is not None:  # completed by measured_versus_fp32 where the target runs here
                entry["versus_fp32"] = size_versus_fp32(spec, size)
            tol = _tolerance(target, cfg, info)
            if cfg.check_parity and mod.RUNTIME is not None:
                try:
                    session = load_session(path, mod.RUNTIME)
                except UserError as e:  # runtime unavailable on this platform (Core ML on Linux)
                    entry["parity"] = {"status": "not run", "reason": str(e)}
                else:
                    p = parity(session, spec, refs[spec.name])
                    p.update(tolerance=tol, device=session.device, status="pass" if p["rel"] <= tol else "fail")
                    entry["parity"] = p
                    if p["status"] == "fail":
                        raise ParityError(
                            f"{target}/{spec.name}: relative error {p['rel']:.3g} (max abs {p['max_abs']:.3g}) "
                            f"exceeds the {target} tolerance {tol:g}"
                        )
                    if spec.quant is not None and spec.heldout:
                        entry["versus_fp32"].update(measured_versus_fp32(session, spec))
            results[f"{target}/{spec.name}"] = entry
            logger.info("%s/%s: %.1f s, %d bytes", target, spec.name, seconds, size)
        artifact.write_manifest(tmp, stage="export", settings=cfg.to_dict(), source=source, metrics={"components": results})
    return artifact.load_manifest(out)
