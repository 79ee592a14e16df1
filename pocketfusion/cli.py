"""The ``pocketfusion`` command line. Thin: parse, build a config, call one library function.

Only the standard library is imported at module level, so ``pocketfusion --help`` never loads torch.
Exit status: 0 success, 2 bad input or usage (one ``error:`` line on stderr), anything else a bug.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from pocketfusion.cli_common import _load, _model_arg, _no_lora_with_runtime, _record_loras, _scheduler_arg
from pocketfusion.cli_compress import _add_calibrate, _add_compress
from pocketfusion.cli_lora import _add_lora
from pocketfusion.cli_training import _add_decoder, _add_distill, _add_prune
from pocketfusion.errors import Terminated, UserError  # stdlib-only module

logger = logging.getLogger("pocketfusion")


SHOWCASE_PROMPTS = (
    "a large red circle on a blue background, center",
    "a small yellow square on a black background, top left",
    "a large white triangle on a green background, bottom right",
    "a small blue circle on a yellow background, top right",
    "a large green square on a white background, bottom left",
    "a small black triangle on a red background, center",
    "a large yellow triangle on a blue background, top left",
    "a small red square on a white background, bottom right",
    "a large blue triangle on a red background, top right",
)


from pocketfusion.backends import RUNTIME_CHOICES as _RUNTIME_CHOICES  # noqa: E402  (stdlib-only module)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print usage too)
        sys.stderr.write(f"error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _gen_args(p: argparse.ArgumentParser, *, seed: int = 0) -> None:
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own, 50 for the demo teacher)")
    p.add_argument("--guidance", type=float, default=4.0,
                   help="guidance scale (default 4.0): classifier-free, or a distilled student's guidance input")
    p.add_argument("--seed", type=int, default=seed, help="seed of the first image; image i uses seed+i")


def _gen_config(args, model=None, batch_size: int = 16):
    """The generation settings; ``--steps`` defaults to the model's (or the export's) own step count."""
    from pocketfusion.generate import GenerateConfig, default_steps

    steps = args.steps if args.steps is not None else default_steps(model if model is not None else args.model)
    return GenerateConfig(steps=steps, guidance=args.guidance, seed=args.seed, batch_size=batch_size,
                          scheduler=getattr(args, "scheduler", None))


def _check_output(path: Path, suffixes: tuple[str, ...]) -> None:
    if path.suffix.lower() not in suffixes:
        raise UserError(f"output {path} must end in {' or '.join(suffixes)}")
    if path.exists() and path.is_dir():
        raise UserError(f"output {path} is a directory")


def cmd_generate(args) -> int:
    from pocketfusion.generate import generate_images, grid, save_png

    _no_lora_with_runtime(args)
    out = Path(args.output)
    _check_output(out, (".png",))
    if args.runtime:
        from pocketfusion.runtimes.pipeline import RuntimePipeline

        if args.model is None:
            raise UserError("--runtime needs an export directory (pocketfusion export ... -o DIR)")
        cfg = _gen_config(args)
        pipe = RuntimePipeline(args.model, args.runtime, scheduler=cfg.scheduler)
        images, sec = pipe.generate(args.prompt, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed)
        where = f" on {pipe.device}"
    else:
        model = _load(args)
        cfg = _gen_config(args, model)
        images, sec = generate_images(model, args.prompt, cfg, progress=True)
        where = ""
    save_png(grid(images), out)
    print(f"wrote {out} ({len(images)} image{'s' * (len(images) > 1)}, {sec:.2f} s per image{where})")
    return 0


def cmd_export(args) -> int:
    from pocketfusion.export.api import export
    from pocketfusion.export.base import COMPONENTS, ExportConfig

    targets = tuple(t.strip() for t in args.target.split(",") if t.strip())
    components = tuple(c.strip() for c in args.components.split(",") if c.strip()) if args.components else COMPONENTS
    cfg = ExportConfig(
        targets=targets, components=components, onnx_opset=args.opset, coreml_deployment_target=args.coreml_target,
        coreml_precision=args.coreml_precision, max_delegates=args.max_delegates, rewrite=not args.no_rewrite,
        onnx_weights=args.onnx_weights, winograd=args.winograd, tflite_weights=args.tflite_weights,
        check_parity=not args.no_parity, executorch_activations=args.executorch_activations,
    )
    model = _load(args)
    manifest = export(model, cfg, Path(args.output))
    print(f"wrote {args.output}/")
    print(format_export(manifest, indent=2))
    return 0


def format_export(manifest, *, indent: int = 2) -> str:
    """One line per exported component (size, time, parity), plus its error against fp32 when quantized."""
    lines = []
    figures = manifest.metrics.get("components", {})
    pad = " " * indent
    for c in manifest.components:
        if c.target is None:
            continue
        e = figures.get(c.key, {})
        p = e.get("parity", {})
        err = f"rel_max {p['rel_max']:.2e} ({p['status']})" if "rel_max" in p else f"parity {p.get('status', 'skipped')}"
        extra = f", {e['delegation'].get('delegate_blobs')} XNNPACK blobs" if "delegation" in e else ""
        ratio = (f" ({e['size_ratio_to_float_export']:.1%} of the {e['float_export_precision']} export)"
                 if "size_ratio_to_float_export" in e else "")
        size, secs = e.get("size_bytes", 0) / 1e6, e.get("export_seconds", 0)
        lines.append(f"{pad}{c.key:<{28 - indent}} {size:8.2f} MB{ratio}  {secs:6.1f} s  {err}{extra}")
        v = e.get("versus_fp32")
        if v:
            measured = (f", held-out SNR {v['snr_db']:.1f} dB (rel_rms {v['rel_rms']:.1e}, {v['heldout_feeds']} feeds), "
                        f"{v['latency_ms_median']:.2f} ms/call") if "snr_db" in v else ""
            lines.append(f"{pad}{'':<{28 - indent}} vs fp32: {v['size_ratio_to_fp32_weights']:.1%} of its weights{measured}")
    return "\n".join(lines)


def _eval_json(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "images"}


def cmd_eval(args) -> int:
    from pocketfusion.artifact import atomic_write_text
    from pocketfusion.generate import evaluate

    _no_lora_with_runtime(args)
    out = Path(args.output) if args.output else None
    if out is not None:
        _check_output(out, (".json",))
    if args.runtime:
        from pocketfusion.runtimes.pipeline import evaluate_runtime

        if args.model is None:
            raise UserError("--runtime needs an export directory (pocketfusion export ... -o DIR)")
        cfg = _gen_config(args)
        result = evaluate_runtime(args.model, args.runtime, cfg, args.prompts, progress=True)
        report = _eval_json(result)
        report["model"] = str(args.model)
        if "psnr_vs_pytorch_db" in report:
            p = report["psnr_vs_pytorch_db"]
            print(f"PSNR vs PyTorch: mean {p['mean']:.1f} dB, min {p['min']:.1f} dB "
                  f"({p['identical_images']} identical) on {report['device']}")
    else:
        model = _load(args)
        model.require_pipeline()
        cfg = _gen_config(args, model)
        result = evaluate(model, cfg, args.prompts, progress=True)
        report = _eval_json(result)
        report["model"] = str(model.path)
        if getattr(args, "lora_records", None):
            report["loras"] = args.lora_records  # merged in memory (--lora)
    for attr, acc in report["per_attribute"].items():
        print(f"{attr:<11} {acc:7.1%}")
    print(f"{'all five':<11} {report['all_correct']:7.1%}   ({report['n']} held-out prompts)")
    if out is not None:
        atomic_write_text(out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def cmd_bench(args) -> int:
    from pocketfusion.runtimes.bench import BenchConfig, bench, format_table

    runtimes = tuple(r.strip() for r in args.runtime.split(",") if r.strip()) if args.runtime else None
    rounds = args.rounds if args.rounds is not None else (3 if len(args.artifacts) > 1 else 1)
    cfg = BenchConfig(runtimes=runtimes, threads=args.threads, runs=args.runs, warmup=args.warmup, rounds=rounds,
                      steps=args.steps, student_steps=args.student_steps, end_to_end=not args.no_end_to_end)
    dirs = [Path(d) for d in args.artifacts]
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"artifact directory {d} does not exist")
    if args.json:
        _check_output(Path(args.json), (".json",))
    if args.device == "host":
        res = bench(dirs, cfg, probe_cache=Path(args.json).parent / "roofline-probes.json" if args.json else None)
        print(format_table(res))
    else:
        from pocketfusion.runtimes.bench import device_bench

        res = device_bench(dirs, args.device, cfg, runner=Path(args.runner) if args.runner else None,
                           rootfs=Path(args.rootfs) if args.rootfs else None)
        for r in res["results"]:
            lat = r["latency_ms"]
            print(f"{r['device']:<28} {r['runtime']:<12} {r['component']:<13} {lat.get('median', lat.get('mean', 0)):9.2f} ms  "
                  f"peak {r.get('peak_rss_mib') or 0:7.1f} MiB  {r.get('timing_label', '')}")
        for n in res["notes"]:
            print(f"note: {n}")
    if args.json:
        from pocketfusion.artifact import atomic_write_text

        atomic_write_text(args.json, json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_report(args) -> int:
    from pocketfusion.runtimes.report import write_report

    write_report([Path(p) for p in args.results], Path(args.output))
    print(f"wrote {args.output}")
    return 0


def cmd_models(args) -> int:
    from pocketfusion.checkpoint import bundled_models

    rows = bundled_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<18} {'steps':>5}  {'guidance':<9} {'all five':>8}  {'worst attribute':<18} {'Frechet':>8} {'diversity':>9}  path")
    for r in rows:
        ev = r.get("evaluation") or {}
        acc = ev.get("per_attribute") or {}
        worst = min(acc.items(), key=lambda kv: kv[1]) if acc else None
        fd, div = ev.get("frechet"), ev.get("diversity")
        print(f"{r['name']:<18} {r['steps']:>5}  {r['guidance']:<9} "
              f"{format(ev['all_correct'], '8.1%') if 'all_correct' in ev else '       –'}  "
              f"{f'{worst[0]} {worst[1]:.1%}' if worst else '–':<18} {format(fd, '8.2f') if fd is not None else '       –'} "
              f"{format(div, '9.2f') if div is not None else '        –'}  {r['path']}")
    print("figures: measured on the held-out prompts (see each model's manifest.json, metrics.evaluation)")
    return 0


def cmd_info(args) -> int:
    from pocketfusion.info import describe, format_table

    model = _load(args)
    info = describe(model)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_table(info))
    return 0


def cmd_run(args) -> int:
    from pocketfusion.run import RunConfig, run

    targets = tuple(t.strip() for t in args.target.split(",") if t.strip()) if args.target is not None else None
    cfg = RunConfig(steps=args.steps, guidance=args.guidance, seed=args.seed, eval_prompts=args.prompts, targets=targets,
                    quant=None if args.quant == "none" else args.quant, quant_prompts=args.quant_prompts,
                    bench_runs=args.bench_runs)
    model = _load(args)
    summary = run(model, cfg, Path(args.output), showcase=SHOWCASE_PROMPTS)
    print(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pocketfusion import __version__

    ap = _Parser(prog="pocketfusion", description="Compress, export and benchmark Stable-Diffusion-style models for phones.")
    ap.add_argument("--version", action="version", version=f"pocketfusion {__version__}")
    ap.add_argument("--verbose", "-v", action="store_true", help="log more, and show tracebacks")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_run(sub)
    _add_generate(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_compress(sub)
    _add_distill(sub)
    _add_prune(sub)
    _add_decoder(sub)
    _add_calibrate(sub)
    _add_bench(sub)
    _add_report(sub)
    _add_info(sub)
    _add_lora(sub)
    _add_models(sub)
    _add_app(sub)
    return ap


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="the main job end to end: load, generate a grid, evaluate, export, compress (quantize, "
                                   "evaluate, export), bench, write an artifact directory")
    _model_arg(p)
    _gen_args(p)
    p.add_argument("--prompts", type=int, default=None, help="evaluate on the first N held-out prompts (default: all 240)")
    p.add_argument("--target", default=None, help="export targets (default: every installed one; '' for none)")
    p.add_argument("--quant", default="w8", choices=["w8", "w4", "w8a8", "w8a16", "none"],
                   help="compress stage: quantize the U-Net, evaluate it against fp32 and export it (default w8; none: skip)")
    p.add_argument("--quant-prompts", type=int, default=8, help="calibration prompts for the compress stage (default 8)")
    p.add_argument("--bench-runs", type=int, default=10, help="timed calls per component in the bench stage (default 10; 0: skip)")
    p.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    p.set_defaults(func=cmd_run)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="text to image; several --prompt give a grid")
    _model_arg(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    _gen_args(p)
    _scheduler_arg(p)
    p.add_argument("--runtime", choices=_RUNTIME_CHOICES, default=None,
                   help="run an export directory's components in this runtime instead of PyTorch")
    p.add_argument("-o", "--output", required=True, help="output PNG")
    p.set_defaults(func=cmd_generate)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="prompt accuracy per attribute on the demo grammar's held-out prompts")
    _model_arg(p)
    _gen_args(p)
    _scheduler_arg(p)
    p.add_argument("--prompts", type=int, default=None, help="use the first N held-out prompts (default: all 240)")
    p.add_argument("--runtime", choices=_RUNTIME_CHOICES, default=None,
                   help="evaluate an export directory through this runtime (adds PSNR vs the PyTorch pipeline)")
    p.add_argument("-o", "--output", default=None, help="report JSON")
    p.set_defaults(func=cmd_eval)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export text encoder, U-Net and VAE decoder to ONNX / ExecuTorch / TFLite / Core ML")
    _model_arg(p)
    p.add_argument("--target", default="onnx,executorch,tflite,coreml", help="comma-separated targets (default: all)")
    p.add_argument("--components", default=None,
                   help="comma-separated components (default: all the model has: text_encoder, text_encoder_2 (SDXL), unet, "
                        "vae_decoder)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--coreml-target", default="iOS17", choices=["iOS17", "iOS18"], help="Core ML deployment target")
    p.add_argument("--coreml-precision", default="fp16", choices=["fp16", "fp32"], help="Core ML compute precision")
    p.add_argument("--max-delegates", type=int, default=8, help="fail when the ExecuTorch U-Net splits into more XNNPACK blobs")
    p.add_argument("--onnx-weights", choices=("auto", "fold", "qdq"), default="auto",
                   help="a weight-only quantized ONNX U-Net in onnxruntime: fold (dequantize once at load), qdq (on every "
                        "call; 4-bit MatMulNBits), auto (both timed at export, the faster kept; recorded in the manifest)")
    p.add_argument("--winograd", choices=("auto", "on", "off"), default="auto",
                   help="3x3 convolutions as Winograd F(4,3) / F(2,3): fewer multiplies for more weight bytes (ONNX: up to 4x "
                        "the memory at run time, the file unchanged; ExecuTorch / TFLite: a larger file). auto: ONNX times each "
                        "shape at export and keeps the faster form, ExecuTorch / TFLite take only maps >= 32 a side with >= 128 "
                        "channels; on: every one that fits; off. Recorded in the manifest")
    p.add_argument("--tflite-weights", choices=("auto", "dequantize", "dynamic"), default="auto",
                   help="a quantized U-Net's integer weights in LiteRT: dequantize (fp32 kernels, the on-grid numbers), dynamic "
                        "(fed to the ops: XNNPACK int8 / int4 kernels, activations quantized per call; int4 convolutions "
                        "over im2col patches), auto (both timed and checked "
                        "against a quality floor at export; recorded in the manifest)")
    p.add_argument("--no-rewrite", action="store_true", help="skip the delegation rewrites (for comparison)")
    p.add_argument("--no-parity", action="store_true", help="skip running the exports against PyTorch")
    p.add_argument("--executorch-activations", default="grid", choices=["grid", "dynamic"],
                   help="ExecuTorch int8 activations of a quantized U-Net: grid (default: the grid's own, static for w8a8) "
                        "or dynamic (per-token int8 whatever the grid says)")
    p.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    p.set_defaults(func=cmd_export)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency and peak memory of export directories on this host (each run in its own process)")
    p.add_argument("artifacts", nargs="+", help="export directories; several are measured interleaved and compared")
    p.add_argument("--runtime", default=None, help="comma-separated runtimes (default: all the artifact has)")
    p.add_argument("--threads", type=int, default=None, help="threads per runtime (default: the runtime's own)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per component (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up runs (default 3)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 1, or 3 when comparing)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps of the end-to-end measurement (default: each artifact's own: 50 for the demo teacher)")
    p.add_argument("--student-steps", type=int, default=None,
                   help="end-to-end steps of distilled students only (e.g. 1), the others at --steps or their own: a 1-step "
                        "student and its 50-step teacher in one interleaved run")
    p.add_argument("--no-end-to-end", action="store_true", help="time components only")
    p.add_argument("--json", default=None, help="write results JSON here")
    p.add_argument("--device", default="host", help="host (default), qemu-arm64, android[:SERIAL], mac, iphone")
    p.add_argument("--runner", default=None, help="android / qemu-arm64: pf-run (the native runner's aarch64 bundle, built when absent) "
                        "or a bundle folder of 'app build native --arch aarch64'; "
                        "android also: executor_runner or benchmark_model built for the device")
    p.add_argument("--rootfs", default=None, help="qemu-arm64: where the arm64 userland lives (default ~/.cache/pocketfusion/arm64)")
    p.set_defaults(func=cmd_bench)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="self-contained HTML report (plots inlined) from bench results")
    p.add_argument("results", nargs="+", help="bench results JSON files")
    p.add_argument("-o", "--output", required=True, help="output .html")
    p.set_defaults(func=cmd_report)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="the bundled models (demo teacher, distilled students) with their measured figures")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="components, parameters, dtype and MACs per call")
    _model_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)


def cmd_app(args) -> int:
    from pocketfusion.app_build import build_native, build_web

    if args.app == "web":
        info = build_web(args.output, export=args.export, ort_web=args.ort_web)
        print(f"wrote {args.output}/ (the page, onnxruntime-web's wasm build{', the export' if args.export else ''}: "
              f"{info['size_bytes'] / 2**20:.1f} MiB); serve it: {info['serve']}")
        return 0
    if args.export or args.ort_web:
        raise UserError("--export and --ort-web are options of 'app build web'")
    info = build_native(args.output, arch=args.arch, executorch=args.executorch, jobs=args.jobs)
    print(f"wrote {args.output}/ ({info['arch']} bundle: {info['runner']} and {len(info['files']) - 1} libraries, "
          f"{info['size_bytes'] / 2**20:.1f} MiB; run: {info['run']})")
    return 0


def _add_app(sub) -> None:
    p = sub.add_parser("app", help="build an on-device app: 'app build native' builds the C++ runner pf-run (apps/native) as a bundle")
    p.add_argument("action", choices=["build"], help="build")
    p.add_argument("app", choices=["native", "web"], help="native: pf-run on ExecuTorch's C++ runtime (CMake >= 3.28, a C++17 "
                   "compiler); web: the static page of apps/web with onnxruntime-web vendored (npm)")
    p.add_argument("--arch", choices=["x86_64", "aarch64"], default=None,
                   help="target (default: this host's); aarch64 cross-compiles with g++-aarch64-linux-gnu")
    p.add_argument("--executorch", default=None,
                   help="the executorch wheel's package folder to link (default: the installed wheel; aarch64: the "
                        "aarch64 wheel of the same version, fetched once with pip into ~/.cache/pocketfusion)")
    p.add_argument("--jobs", type=int, default=1, help="parallel compile jobs (default 1)")
    p.add_argument("--export", default=None, help="web: an ONNX export directory copied into the page folder as export/")
    p.add_argument("--ort-web", default=None,
                   help="web: an unpacked onnxruntime-web package (default: npm pack onnxruntime-web, cached in ~/.cache/pocketfusion)")
    p.add_argument("-o", "--output", required=True, help="bundle directory (written atomically): native: bin/pf-run, lib/, "
                   "bundle.json; web: index.html, pf.js, vendor/, export/")
    p.set_defaults(func=cmd_app)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_third_party()
    previous = signal.signal(signal.SIGTERM, _terminate)  # a kill cleans up like Ctrl-C (staged outputs removed)
    try:
        rc = args.func(args)
        if rc == 0:
            _record_loras(args)  # --lora merged in memory: say so in the manifests the command wrote
        return rc
    except UserError as e:
        if args.verbose:
            raise
        sys.stderr.write(f"error: {e}\n")
        return 2
    except Terminated:
        sys.stderr.write("error: terminated (SIGTERM); nothing was left behind\n")
        return 143
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; nothing was left behind\n")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame) -> None:
    raise Terminated()


def _quiet_third_party() -> None:
    import os
    import warnings

    # Converters warn a lot about things that do not concern the user (tracer notes, deprecations,
    # optional kernels missing on CPU); --verbose shows them.
    warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("transformers", "diffusers", "torchao", "torch", "coremltools", "executorch", "onnxscript", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:  # torch configures its own loggers on import; every command but --help imports it anyway
        import torch._logging

        torch._logging.set_logs(all=logging.ERROR)
    except ImportError:
        pass


def entry() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    entry()
