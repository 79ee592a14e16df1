"""``pocketfusion compress`` (quantize, after an optional compact decoder and step distillation) and
``pocketfusion calibrate``: parse, build the stage's config, call the library."""

from __future__ import annotations

import sys
from pathlib import Path

from pocketfusion.cli_common import _load, _model_arg, _scheduler_arg
from pocketfusion.cli_training import _decoder_config
from pocketfusion.errors import UserError
from pocketfusion.validate import resolve_device  # torch imported only when called


def cmd_calibrate(args) -> int:
    from pocketfusion.calibration import CalibrationConfig, calibrate, heldout_count

    cfg = CalibrationConfig(prompts=args.prompts, n_prompts=args.num_prompts, steps=args.steps, n_timesteps=args.timesteps,
                            guidance=args.guidance, seed=args.seed, device=args.device)
    cfg.check_prompt_file()  # bad file: fail before loading the model
    resolve_device(cfg.device)  # cuda without a GPU: fail before loading the model
    from pocketfusion.generate import with_scheduler

    model = with_scheduler(_load(args), args.scheduler)  # capture samples with the model's scheduler component
    cset = calibrate(model, cfg, Path(args.output), progress=True)
    n, k = len(cset.prompts), cset.settings["n_timesteps"]
    print(f"wrote {args.output}/ ({n} prompts x {k} timesteps = {n * k} U-Net CFG pairs; last {heldout_count(n)} prompts held out)")
    return 0


def cmd_compress(args) -> int:
    from pocketfusion.compress.quant import QuantConfig, quantize, summary

    if args.calib is not None and not Path(args.calib).exists():
        raise UserError(f"--calib {args.calib} does not exist (a prompts .txt file or a directory made by 'pocketfusion calibrate')")
    from pocketfusion.steps import StepLog

    opt = {"calib_steps": args.calib_steps, "image_steps": args.image_steps, "image_prompts": args.image_prompts,
           "max_minutes": args.max_minutes}
    cfg = QuantConfig(scheme=args.quant, method=args.method, calib=args.calib, n_prompts=args.num_prompts,
                      group_size=args.group_size, seed=args.seed, calib_timesteps=args.timesteps, sensitivity=args.sensitivity,
                      device=args.device, **{k: v for k, v in opt.items() if v is not None})
    resolve_device(cfg.device)  # cuda without a GPU: fail before any work
    dcfg = None
    if args.distill_steps is not None:  # (prune ->) distill -> quantize: the student is calibrated on its own sampler
        from pocketfusion.compress.distill import DistillConfig

        given = {"method": args.distill_method, "iterations": args.distill_iterations, "n_pairs": args.distill_pairs,
                 "batch_size": args.distill_batch_size}
        dcfg = DistillConfig(steps=args.distill_steps, **{k: v for k, v in given.items() if v is not None})
    vcfg = _decoder_config(args, kind=args.decoder, iterations=args.decoder_iterations) if args.decoder else None
    log = StepLog()
    with log.step("load" + (" + convert" if Path(args.model).is_file() else "")):
        model = _load(args)
    merged = getattr(args, "lora", None) or (model.manifest is not None and "lora" in model.manifest.metrics)
    if merged and args.calib is None:
        print("note: the model has a LoRA merged but --calib is not given: calibrating on the built-in prompts, which do "
              "not use the LoRA's words; pass --calib PROMPTS.txt with prompts that do (benchmarks/lora_quant.py mixes the "
              "LoRA's training prompts with base prompts)", file=sys.stderr)
    if vcfg is not None:  # the compact decoder first: it learns from the teacher's samples (a student has no CFG sampler)
        from pocketfusion.checkpoint import load_model
        from pocketfusion.compress.decoder import compress_decoder
        from pocketfusion.compress.decoder import summary as decoder_summary

        decoder_dir = Path(args.output).parent / f"{Path(args.output).name}-decoder"
        print(f"decoder stage: distilling a {vcfg.kind} VAE of {model.path} -> {decoder_dir}/", flush=True)
        print(decoder_summary(compress_decoder(model, vcfg, decoder_dir, progress=True)))
        model = load_model(decoder_dir)
    if dcfg is not None:
        from pocketfusion.checkpoint import load_model
        from pocketfusion.compress.distill import distill
        from pocketfusion.compress.distill import summary as distill_summary

        student_dir = Path(args.output).parent / f"{Path(args.output).name}-student"
        print(f"stage 1/2: distilling {model.path} to {dcfg.steps} step(s) with {dcfg.method} -> {student_dir}/", flush=True)
        print(distill_summary(distill(model, dcfg, student_dir, progress=True)))
        model = load_model(student_dir)
        print(f"stage 2/2: quantizing the student ({args.quant}, calibrated on its own {dcfg.steps}-step sampler)", flush=True)
    manifest = quantize(model, cfg, Path(args.output), progress=True, steps=log)
    print(f"wrote {args.output}/ ({args.quant}, {args.method})")
    print(summary(manifest))
    return 0


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="quantize the U-Net (weights on an int8/int4 grid every exporter lowers) with calibration")
    _model_arg(p)
    p.add_argument("--quant", required=True, choices=["w8", "w4", "w8a8", "w8a16"],
                   help="w8: int8 per channel; w4: int4 groups (+ int8 where measured sensitive); w8a8 / w8a16: w8 + activation bits")
    p.add_argument("--method", default="gptq", choices=["gptq", "rtn"],
                   help="gptq: calibrated error-compensating rounding (default); rtn: round to nearest")
    p.add_argument("--group-size", type=int, default=32, help="int4 group of input channels (default 32)")
    p.add_argument("--calib", default=None, metavar="PROMPTS.txt|CALIB_DIR",
                   help="prompts file (one a line) or a set from 'pocketfusion calibrate' (default: built-in demo prompts)")
    p.add_argument("--num-prompts", type=int, default=None, metavar="N", help="calibration prompts (default 32, or every line of the file)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first calibration prompt")
    p.add_argument("--calib-steps", type=int, default=None, metavar="N",
                   help="sampling steps of each calibration prompt's run (default 20, or a student's own count)")
    p.add_argument("--timesteps", type=int, default=10, metavar="K", help="U-Net feeds recorded per calibration prompt (default 10)")
    p.add_argument("--image-prompts", type=int, default=None, metavar="N",
                   help="held-out prompts whose images are compared with fp32's (default 4; 0: skip)")
    p.add_argument("--image-steps", type=int, default=None, metavar="N", help="sampling steps of those images (default: --calib-steps)")
    p.add_argument("--sensitivity", default="auto", choices=["auto", "measured", "projected"],
                   help="w4: each layer's 4-bit cost on the U-Net's output, measured a layer at a time or projected for all "
                        "layers from 8 backward passes (auto: measured unless that is estimated over 15 min)")
    p.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="refuse to start when the run's plan (printed first, from a U-Net call timed here) exceeds M minutes")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the quantize stage's calibration sampling, U-Net passes and GPTQ run (default cpu)")
    p.add_argument("--distill-steps", type=int, default=None, choices=[1, 2, 4],
                   help="distill the sampler first (written to OUT-student/), then quantize the student")
    p.add_argument("--distill-method", default=None, choices=["lcm", "regression"], help="see 'pocketfusion distill'")
    p.add_argument("--distill-iterations", type=int, default=None, metavar="N", help="see 'pocketfusion distill --iterations'")
    p.add_argument("--distill-pairs", type=int, default=None, metavar="N", help="see 'pocketfusion distill --pairs'")
    p.add_argument("--distill-batch-size", type=int, default=None, metavar="N", help="see 'pocketfusion distill --batch-size'")
    p.add_argument("--decoder", default=None, choices=["tiny", "pruned"],
                   help="first distill a compact VAE decoder (written to OUT-decoder/; before --distill-steps), see 'pocketfusion decoder'")
    p.add_argument("--decoder-iterations", type=int, default=None, metavar="N", help="see 'pocketfusion decoder --iterations'")
    p.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    p.set_defaults(func=cmd_compress)


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="record real component inputs (U-Net CFG pairs across the trajectory) as a calibration set")
    _model_arg(p)
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="text file, one prompt a line (default: built-in demo prompts, demo model only)")
    p.add_argument("--num-prompts", type=int, default=None, metavar="N",
                   help="use the first N prompts (default: 32 built-in prompts, or every line of FILE)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; a distilled student's own step count)")
    _scheduler_arg(p)
    p.add_argument("--timesteps", type=int, default=10, metavar="K",
                   help="steps recorded per prompt, spread over the trajectory (default 10)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed+i")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the text encoder and U-Net run (default cpu; the noise is drawn on the CPU either way)")
    p.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    p.set_defaults(func=cmd_calibrate)
