"""The main job, end to end, on one model; writes one artifact directory.

load → generate a showcase grid → evaluate prompt accuracy on the held-out prompts → time one
image → export every component to each target whose backend is installed (parity measured) →
quantize the U-Net (``compress``, default W8 GPTQ on the built-in calibration prompts) →
evaluate the quantized pipeline on the same prompts and seeds (prompt accuracy, image PSNR vs
fp32) → export the quantized U-Net to the same targets → benchmark both exports on this host
(latency, peak memory, each in its own process, interleaved) → generate the showcase prompts with every
pipeline (PyTorch and each runtime here, same seeds; ``images/``, PSNR against each one's source) → write
``grid.png``, ``eval.png``, ``eval.json``, ``export/``, ``compressed/``, ``export-<scheme>/``, ``bench.json``,
``images/``, ``report.html`` (``runtimes.run_report``: the run's one page, built from these manifests, every
path relative to it) and ``manifest.json``.
On a distilled student whose teacher is at hand (``checkpoint.find_source``: the bundled ``demo`` for
``demo-4step`` and ``demo-1step``), it also measures the end-to-end speed against that teacher at
the teacher's own sampler (50 steps with classifier-free guidance for the demo): in PyTorch
(interleaved, one image at a time) and on every runtime (the teacher exported to the same targets,
``teacher-export/``, benched in the same interleaved run).
Targets whose backend is missing are listed in the manifest with the extra that installs them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pocketfusion.errors import UserError


@dataclass(frozen=True)
class RunConfig:
    steps: int | None = None  # None: the model's own step count (50 for the demo teacher)
    guidance: float = 4.0
    seed: int = 0
    eval_prompts: int | None = None
    targets: tuple[str, ...] | None = None  # None: every target whose backend is installed
    quant: str | None = "w8"  # compress scheme (w8 / w4 / w8a8 / w8a16), None: skip the compress stage
    quant_prompts: int = 8  # calibration prompts for compress
    bench_runs: int = 10  # timed calls per component in the bench stage; 0: skip it

    def __post_init__(self) -> None:
        from pocketfusion.generate import GenerateConfig

        if self.eval_prompts is not None and self.eval_prompts < 1:
            raise UserError(f"--prompts must be >= 1, got {self.eval_prompts}")
        GenerateConfig(steps=self.steps or 1, guidance=self.guidance, seed=self.seed)  # validates
        from pocketfusion.backends import check_targets

        check_targets(self.targets or ())
        from pocketfusion.compress.quant import SCHEMES

        if self.quant is not None and self.quant not in SCHEMES:
            raise UserError(f"unknown quantization scheme {self.quant!r} (choose from {', '.join(SCHEMES)}, or none)")
        if self.bench_runs < 0:
            raise UserError(f"--bench-runs must be >= 0, got {self.bench_runs}")
        if self.quant_prompts < 2:
            raise UserError(f"--quant-prompts must be >= 2 (some are held out to measure the error), got {self.quant_prompts}")

    def to_dict(self) -> dict:
        return asdict(self)


def run(model, cfg: RunConfig, out: Path, *, showcase: Sequence[str]) -> str:
    """Run the job and write ``out`` atomically; returns a human-readable summary."""
    from pocketfusion import artifact
    from pocketfusion.checkpoint import sampler_of
    from pocketfusion.generate import GenerateConfig, default_steps, evaluate, generate_images, grid, save_png, time_one_image
    from pocketfusion.info import describe

    model.require_pipeline()
    if cfg.steps is None:
        cfg = dataclasses.replace(cfg, steps=default_steps(model))
    gen = GenerateConfig(steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed)
    source = artifact.source_ref(model.path)
    with artifact.staged_dir(out) as tmp:
        images, _ = generate_images(model, list(showcase), gen)
        save_png(grid(images, cols=3), tmp / "grid.png")
        result = evaluate(model, gen, cfg.eval_prompts, progress=True)
        eval_images = result.pop("images")
        save_png(grid(eval_images, cols=20), tmp / "eval.png")
        per_image = time_one_image(model, gen, showcase[0])
        info = describe(model)
        metrics = {
            "prompt_accuracy": result["per_attribute"],
            "all_attributes_correct": result["all_correct"],
            "eval_prompts": result["n"],
            "seconds_per_image_batch1": per_image,
            "guidance_mode": sampler_of(model).guidance,
            "seconds_per_image_batched": result["seconds_per_image_batched"],
            "macs_per_call": {k: v["macs"]["total"] for k, v in info["components"].items()},
            "parameters": {k: v["parameters"] for k, v in info["components"].items()},
        }
        shown = {"model": (images, gen)}  # the showcase prompts' images of each PyTorch pipeline, at its own sampler
        teacher = _teacher(model)
        if teacher is not None:
            metrics["teacher"] = _pytorch_against_teacher(model, teacher, gen, showcase[0])
            metrics["teacher"].update(_teacher_evaluation(teacher, gen, result["n"]))
            tgen = dataclasses.replace(gen, steps=default_steps(teacher))
            shown["teacher"] = (generate_images(teacher, list(showcase), tgen)[0], tgen)
        exported = _export(model, cfg, tmp / "export")
        if exported is not None:
            metrics["export"] = exported
        if cfg.quant is not None:
            metrics["compress"], qimages = _compress(model, cfg, gen, tmp, eval_images, metrics.get("export"), showcase)
            shown["compressed"] = (qimages, gen)
        if teacher is not None and cfg.bench_runs and metrics.get("export", {}).get("components"):
            _export(teacher, cfg, tmp / "teacher-export")
        if cfg.bench_runs and metrics.get("export", {}).get("components"):
            metrics["bench"] = _bench(cfg, tmp)
        metrics["showcase"] = _showcase(tmp, list(showcase), shown, cfg)
        artifact.atomic_write_text(tmp / "eval.json", json.dumps(result, indent=2) + "\n")
        from pocketfusion.runtimes.run_report import write_run_report

        run = {"settings": cfg.to_dict(), "source": source.to_dict(), "metrics": metrics}
        write_run_report(tmp, run, tmp / "report.html")  # before the manifest, which lists (and hashes) it
        artifact.write_manifest(tmp, stage="run", settings=cfg.to_dict(), source=source, metrics=metrics)
    return _summary(out, cfg, metrics)


def _summary(out: Path, cfg: RunConfig, metrics: dict) -> str:
    bench = ", bench.json" if "bench" in metrics else ""
    lines = [f"wrote {out}/ (report.html, grid.png, eval.png, eval.json, images/, manifest.json{bench})"]
    for attr, acc in metrics["prompt_accuracy"].items():
        lines.append(f"  {attr:<11} {acc:6.1%}")
    lines.append(f"  all five    {metrics['all_attributes_correct']:6.1%}  over {metrics['eval_prompts']} held-out prompts")
    mode = "CFG" if metrics.get("guidance_mode", "cfg") == "cfg" else "guidance-embedded"
    lines.append(f"  {metrics['seconds_per_image_batch1']:.2f} s per {cfg.steps}-step {mode} image (batch 1, this machine)")
    for key, e in metrics.get("export", {}).get("components", {}).items():
        lines.append(_export_line(key, e, indent=2))
    for target, why in metrics.get("export", {}).get("skipped", {}).items():
        lines.append(f"  export {target}: skipped ({why})")
    if "compress" in metrics:
        c = metrics["compress"]
        lines.append(f"  compress {c['scheme']} ({c['method']}): U-Net weights {c['weights_ratio_fp16_scales']:.1%} of fp32, "
                     f"held-out U-Net SNR {c['unet_snr_db']:.1f} dB")
        acc = "  ".join(f"{a} {v:.1%}" for a, v in c["prompt_accuracy"].items())
        lines.append(f"    {c['eval_prompts']} prompts: PSNR vs fp32 images mean {c['image_psnr_db']['mean_db']:.1f} dB, "
                     f"min {c['image_psnr_db']['min_db']:.1f} dB; accuracy {acc}")
        for key, e in c.get("export", {}).get("components", {}).items():
            lines.append(_export_line(key, e, indent=4))
    if "teacher" in metrics:
        t = metrics["teacher"]
        lines.append(f"  against the teacher ({t['teacher_steps']}-step CFG, {t['path']}): PyTorch {t['speedup']:.1f}x faster end to end "
                     f"({t['student_s']:.3f} s vs {t['teacher_s']:.3f} s per image, interleaved)")
    for label, rs in metrics.get("bench", {}).get("speed_vs_teacher", {}).items():
        lines.append(f"  bench {label} end to end vs the teacher (x faster): " + ", ".join(f"{k} {v:.1f}x" for k, v in rs.items()))
    for key, b in metrics.get("bench", {}).get("median_ms", {}).items():
        lines.append(f"  bench {key:<33} {b:8.2f} ms  peak {metrics['bench']['peak_rss_mib'][key]:6.1f} MiB")
    for label, rs in metrics.get("bench", {}).get("speed_vs_float", {}).items():
        lines.append(
            f"  bench {label} speed vs float (>1: faster): " + ", ".join(f"{k} {v:.2f}x" for k, v in rs.items())
        )
    return "\n".join(lines)


def _bench(cfg: RunConfig, tmp: Path) -> dict:
    """Both exports timed on this host (``runtimes.bench``), interleaved; ``bench.json``."""
    from pocketfusion import artifact
    from pocketfusion.runtimes.bench import BenchConfig, bench

    dirs = [tmp / "export"] + ([tmp / f"export-{cfg.quant}"] if cfg.quant and (tmp / f"export-{cfg.quant}").is_dir() else [])
    teacher = (tmp / "teacher-export").is_dir()
    dirs += [tmp / "teacher-export"] if teacher else []
    # end to end: the run's own steps; against a teacher, each export at its own sampler (the student's steps, the teacher's CFG steps)
    res = bench(dirs, BenchConfig(runs=cfg.bench_runs, warmup=2, rounds=2 if len(dirs) > 1 else 1, steps=None if teacher else cfg.steps),
                relative_to=tmp)  # the exports' paths relative to bench.json: valid once the run is moved into place
    artifact.atomic_write_text(tmp / "bench.json", json.dumps(res, indent=2) + "\n")
    key = lambda r: f"{r['artifact']}:{r['runtime']}/{r['component']}"  # noqa: E731
    return {
        "median_ms": {key(r): r["latency_ms"]["median"] for r in res["results"]},
        "peak_rss_mib": {key(r): r["peak_rss_mib"] for r in res["results"]},
        "speed_vs_float": {k: v for k, v in res.get("ratios", {}).items() if k != "teacher-export"},  # float / this median
        "speed_vs_teacher": _speed_vs_teacher(res) if teacher else {},
        "host": res["host"].get("processor"), "runs": cfg.bench_runs, "notes": res["notes"],
    }


def _speed_vs_teacher(res: dict) -> dict:
    """End to end, the teacher's median over each export's (fp32, and the quantized U-Net's), per runtime: one interleaved run."""
    e2e = {(r["artifact"], r["runtime"]): r["latency_ms"]["median"] for r in res["results"] if r["component"] == "end_to_end"}
    out: dict[str, dict[str, float]] = {}
    for (label, runtime), ms in e2e.items():
        teacher = e2e.get(("teacher-export", runtime))
        if label != "teacher-export" and teacher:
            out.setdefault(label, {})[runtime] = teacher / ms
    return out


def _teacher(model):
    """The loaded teacher of a distilled student (``checkpoint.find_teacher``), else None."""
    from pocketfusion.checkpoint import find_teacher, load_model, sampler_of

    if sampler_of(model).guidance != "embedded" or (path := find_teacher(model)) is None:
        return None
    teacher = load_model(path)
    return teacher if teacher.kind == "pipeline" and sampler_of(teacher).guidance == "cfg" else None


def _pytorch_against_teacher(model, teacher, gen, prompt: str, rounds: int = 3) -> dict:
    """One image at a time, student (``gen``) and teacher (its own steps, CFG) interleaved: median seconds and the ratio."""
    import dataclasses

    import numpy as np

    from pocketfusion.generate import default_steps, generate_images

    tgen = dataclasses.replace(gen, steps=default_steps(teacher))
    for m, g in ((model, gen), (teacher, tgen)):  # warm-up
        generate_images(m, [prompt], g)
    s, t = [], []
    for _ in range(rounds):
        s.append(generate_images(model, [prompt], gen)[1])
        t.append(generate_images(teacher, [prompt], tgen)[1])
    student_s, teacher_s = float(np.median(s)), float(np.median(t))
    return {"path": str(teacher.path), "teacher_steps": tgen.steps, "student_steps": gen.steps, "student_s": student_s,
            "teacher_s": teacher_s, "speedup": teacher_s / student_s, "rounds": rounds}


def _export_line(key: str, e: dict, *, indent: int) -> str:
    p = e.get("parity", {})
    err = f"rel_max {p['rel_max']:.1e}" if "rel_max" in p else f"parity: {p.get('status', 'skipped')}"
    ratio = (
        f" ({e['size_ratio_to_float_export']:.1%} of the {e['float_export_precision']} export)"
        if "size_ratio_to_float_export" in e
        else ""
    )
    v = e.get("versus_fp32", {})
    vs = f", {v['size_ratio_to_fp32_weights']:.1%} of fp32 weights" if v else ""
    if "snr_db" in v:
        vs += f", SNR vs fp32 {v['snr_db']:.1f} dB, {v['latency_ms_median']:.2f} ms/call"
    return f"{' ' * indent}export {key:<{26 - indent}} {e['size_bytes'] / 1e6:7.2f} MB{ratio}  {err}{vs}"


def _compress(model, cfg: RunConfig, gen, tmp: Path, fp32_images, fp32_export: dict | None, showcase: Sequence[str]) -> tuple[dict, list]:
    """Quantize the U-Net into ``tmp/compressed``, evaluate the quantized pipeline against the fp32
    one (same prompts and seeds) and export it (every component, the U-Net quantized) to ``tmp/export-<scheme>``.
    Returns the metrics and the quantized pipeline's images of the ``showcase`` prompts."""
    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.quant import QuantConfig, quantize
    from pocketfusion.generate import evaluate, generate_images
    from pocketfusion.metrics import image_psnr

    cman = quantize(model, QuantConfig(scheme=cfg.quant, n_prompts=cfg.quant_prompts, seed=cfg.seed), tmp / "compressed")
    qmodel = load_model(tmp / "compressed")
    m = cman.metrics
    res = evaluate(qmodel, gen, cfg.eval_prompts, progress=True)
    out = {
        "scheme": m["scheme"], "method": m["method"],
        "weights_ratio_fp16_scales": m["unet_bytes"]["ratio_fp16_scales"],
        "unet_snr_db": m["unet_heldout_error"][m["method"]]["snr_db"],
        "unet_heldout_error": m["unet_heldout_error"],
        "eval_prompts": res["n"], "prompt_accuracy": res["per_attribute"], "all_attributes_correct": res["all_correct"],
        "image_psnr_db": image_psnr(fp32_images, res.pop("images")),
        "seconds_per_image_batched": res["seconds_per_image_batched"],
    }
    shown = generate_images(qmodel, list(showcase), gen)[0]
    targets = tuple(c.split("/")[0] for c in (fp32_export or {}).get("components", {}) if c.endswith("/unet"))
    if targets:
        from pocketfusion.export.api import export
        from pocketfusion.export.base import ExportConfig

        # every component (the text encoder and decoder as the float export has them): the quantized pipeline end to end
        man = export(qmodel, ExportConfig(targets=targets), tmp / f"export-{cfg.quant}")
        comps = dict(man.metrics["components"])
        for key, e in comps.items():
            ref = fp32_export["components"].get(key)
            if ref:  # against the same target's float export (Core ML's is fp16 unless asked otherwise)
                e["size_ratio_to_float_export"] = e["size_bytes"] / ref["size_bytes"]
                e["float_export_precision"] = ref.get("precision", "fp32")
        out["export"] = {"components": comps}
    return out, shown


def _teacher_evaluation(teacher, gen, n: int) -> dict:
    """The teacher's prompt accuracy as its manifest records it (``metrics.evaluation``), when measured on the run's
    prompts (the same count, seed and guidance, the teacher at its own steps); else why it is not shown."""
    from pocketfusion import artifact

    root = Path(teacher.path)
    if not (root / artifact.MANIFEST).is_file():
        return {"evaluation_missing": "the teacher has no manifest"}
    ev = artifact.load_manifest(root, verify=False).metrics.get("evaluation")
    if not isinstance(ev, dict) or "per_attribute" not in ev:
        return {"evaluation_missing": "the teacher's manifest records no evaluation"}
    same = ev.get("prompts") == n and ev.get("seed") == gen.seed and ev.get("guidance") == gen.guidance
    if not same:
        return {"evaluation_missing": f"the teacher's recorded evaluation ({ev.get('prompts')} prompts, seed {ev.get('seed')}, "
                                      f"guidance {ev.get('guidance')}) is not on this run's {n} prompts"}
    keep = ("steps", "guidance", "seed", "prompts", "per_attribute", "all_correct")
    return {"evaluation": {**{k: ev[k] for k in keep if k in ev}, "from": "the teacher's manifest (metrics.evaluation)"}}


def _showcase(tmp: Path, prompts: list[str], shown: dict, cfg: RunConfig) -> dict:
    """The showcase prompts' images of every pipeline, one PNG each under ``images/``, with PSNR against its source's.

    ``shown``: PyTorch pipeline (``teacher``, ``model``, ``compressed``) -> (images, GenerateConfig). Each export of
    them (``teacher-export``, ``export``, ``export-<scheme>``) is also run here through every runtime it has that this
    host runs (``runtimes.pipeline``: same prompts, seeds and steps) and scored against its PyTorch pipeline.
    """
    from PIL import Image

    from pocketfusion import artifact, backends
    from pocketfusion.generate import save_png

    folders = {"teacher": "teacher-export", "model": "export", "compressed": f"export-{cfg.quant}"}
    sources = {"model": "teacher" if "teacher" in shown else None, "compressed": "model", "teacher": None}
    rows, skipped = [], {}

    def add(key: str, pipeline: str, runtime: str, images: list, steps: int, reference: str | None, artifact_dir: str | None):
        paths = []
        for i, img in enumerate(images):
            rel = f"images/{key}/{i:02d}.png"
            save_png(Image.fromarray(img), tmp / rel)
            paths.append(rel)
        ref = next((r for r in rows if r["key"] == reference), None)
        rows.append({"key": key, "pipeline": pipeline, "runtime": runtime, "artifact": artifact_dir, "steps": steps,
                     "images": paths, "reference": reference, "psnr_db": _psnr(ref["_images"], images) if ref else None,
                     "_images": images})

    for pipeline in ("teacher", "model", "compressed"):
        if pipeline not in shown:
            continue
        images, g = shown[pipeline]
        add(pipeline, pipeline, "pytorch", images, g.steps, sources[pipeline], None)
        folder = folders[pipeline]
        if not (tmp / folder / artifact.MANIFEST).is_file():
            continue
        from pocketfusion.runtimes.pipeline import RuntimePipeline

        for target in artifact.load_manifest(tmp / folder, verify=False).targets():
            b = backends.backend(target)
            if not b.runs_on_linux and sys.platform != "darwin":
                skipped[f"{folder}/{b.runtime}"] = f"{b.runtime} runs only on macOS"
                continue
            if not backends.installed(target, runtime=True):
                skipped[f"{folder}/{b.runtime}"] = f"{b.runtime} not installed: pip install 'pocketfusion[{b.extra}]'"
                continue
            pipe = RuntimePipeline(tmp / folder, b.runtime)
            imgs, _ = pipe.generate(prompts, steps=g.steps, guidance=g.guidance, seed=g.seed)
            add(f"{folder}.{b.runtime}", pipeline, b.runtime, imgs, g.steps, pipeline, folder)
    for r in rows:
        del r["_images"]
    return {"prompts": prompts, "seed": cfg.seed, "guidance": cfg.guidance, "rows": rows, "skipped": skipped}


def _psnr(ref: list, images: list) -> dict:
    """``metrics.image_psnr`` with identical images as None (JSON has no infinity): mean over the differing ones."""
    import math

    from pocketfusion.metrics import image_psnr

    p = image_psnr(ref, images)
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in p.items()}


def _export(model, cfg: RunConfig, out: Path) -> dict | None:
    from pocketfusion import backends
    from pocketfusion.export.api import export
    from pocketfusion.export.base import ExportConfig

    wanted = cfg.targets if cfg.targets is not None else backends.TARGETS
    skipped = {t: f"not installed: pip install 'pocketfusion[{backends.backend(t).extra}]'" for t in wanted if not backends.installed(t)}
    targets = tuple(t for t in wanted if t not in skipped)
    if not targets:
        return {"components": {}, "skipped": skipped}
    manifest = export(model, ExportConfig(targets=targets), out)
    return {"components": dict(manifest.metrics["components"]), "skipped": skipped}
