"""The ``pocketfusion`` subcommands of the training stages: ``distill``, ``prune`` and ``decoder`` (their parsers and
their commands). Thin, as ``pocketfusion.cli``: parse, build a config, call one library function. Standard library only
at module level."""

from __future__ import annotations

import json
from pathlib import Path

from pocketfusion.cli_common import _load, _model_arg
from pocketfusion.errors import UserError
from pocketfusion.validate import resolve_device  # torch imported only when called


def cmd_distill(args) -> int:
    from pocketfusion.compress.distill import DistillConfig, distill, summary, work_dir

    given = {"method": args.method, "prompts": args.prompts, "n_prompts": args.num_prompts, "iterations": args.iterations,
             "batch_size": args.batch_size, "lr": args.lr, "n_pairs": args.pairs, "teacher_steps": args.teacher_steps,
             "guidance_range": args.guidance_range, "seed": args.seed, "device": args.device,
             "checkpoint_every": args.checkpoint_every, "work_dir": args.work_dir, "precision": args.precision,
             "teacher": args.teacher}
    cfg = DistillConfig(steps=args.steps, resume=args.resume, gradient_checkpointing=args.gradient_checkpointing,
                        **{k: v for k, v in given.items() if v is not None})
    cfg.check_prompt_file()  # bad file: fail before loading the model
    resolve_device(cfg.device)  # cuda without a GPU: fail before any work
    model = _load(args)
    print(f"distilling {model.path} to {cfg.steps} step(s) with {cfg.method}; checkpoints in {work_dir(args.output, cfg)}"
          f"{' (resuming)' if cfg.resume else ''}", flush=True)
    manifest = distill(model, cfg, Path(args.output), progress=True)
    print(f"wrote {args.output}/ (a diffusers folder: {cfg.steps}-step student, LCMScheduler, guidance embedded)")
    print(summary(manifest))
    return 0


def cmd_prune(args) -> int:
    from pocketfusion.compress.prune import PruneConfig, prune, summary
    from pocketfusion.compress.prune.stage import work_dir

    given = {"runtime": args.runtime, "latency_budget": args.latency_budget, "preset": args.preset,
             "robust_iterations": args.robust_iterations, "recovery_iterations": args.iterations, "batch_size": args.batch_size,
             "lr": args.lr, "n_pairs": args.pairs, "prompts": args.prompts, "n_prompts": args.num_prompts, "seed": args.seed,
             "device": args.device, "checkpoint_every": args.checkpoint_every, "work_dir": args.work_dir}
    cfg = PruneConfig(resume=args.resume, keep_work=args.keep_work, **{k: v for k, v in given.items() if v is not None})
    if cfg.prompts is not None and not Path(cfg.prompts).is_file():
        raise UserError(f"--prompts {cfg.prompts} is not a file (expected a text file, one prompt a line)")
    if args.device_target not in (None, "host"):
        raise UserError(f"--device {args.device_target}: the latency table is measured on this host only for now; "
                        "measure on a phone with 'pocketfusion bench --device android' and pass the table with --latency-table")
    table = None
    if args.latency_table is not None:
        path = Path(args.latency_table)
        if not path.is_file():
            raise UserError(f"--latency-table {path} is not a file")
        try:
            table = json.loads(path.read_text())
            table["units"], table["base_ms"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"--latency-table {path} is not a latency table (written by 'pocketfusion prune --save-table')") from None
    resolve_device(cfg.device)  # cuda without a GPU: fail before any work
    model = _load(args)
    from pocketfusion.export.latency import measure_variants, unit_table

    seq_len = model.components["tokenizer"].model_max_length if "tokenizer" in model.components else 77
    if table is None and cfg.preset is None:
        print(f"measuring the latency table of {model.path}'s U-Net on {cfg.runtime} (each unit removed in turn, exported, "
              "timed round robin)", flush=True)
        table = unit_table(model.unet, cfg.runtime, seq_len=seq_len, runs=cfg.bench_runs, rounds=cfg.bench_rounds, progress=True)
        print(f"  base {table['base_ms']:.3f} ms/call; {len(table['units'])} units; {table['wall_s']:.0f} s", flush=True)
        if args.save_table:
            from pocketfusion.artifact import atomic_write_text

            atomic_write_text(Path(args.save_table), json.dumps(table, indent=2) + "\n")

    def measure(unet, variants):
        return measure_variants(unet, variants, cfg.runtime, seq_len=seq_len, runs=cfg.bench_runs, rounds=cfg.bench_rounds)

    print(f"pruning {model.path} for {cfg.runtime} "
          + (f"(preset {cfg.preset})" if cfg.preset else f"to {cfg.latency_budget:.0%} of its U-Net latency")
          + f"; checkpoints in {work_dir(args.output, cfg)}{' (resuming)' if cfg.resume else ''}", flush=True)
    manifest = prune(model, cfg, Path(args.output), table=table, measure=measure, progress=True)
    print(f"wrote {args.output}/ (a diffusers folder: the source pipeline with a pruned U-Net)")
    print(summary(manifest))
    return 0


def _int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    """``"6,12,16,16"`` -> ``(6, 12, 16, 16)``; None stays None; anything else is a UserError naming ``flag``."""
    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise UserError(f"{flag} {text!r}: comma-separated integers, e.g. 6,12,16,16") from None


def _decoder_config(args, **given):
    from pocketfusion.compress.decoder import DecoderConfig

    cfg = DecoderConfig(**{k: v for k, v in given.items() if v is not None})
    cfg.check_prompt_file()  # bad file: fail before loading the model
    return cfg


def cmd_decoder(args) -> int:
    from pocketfusion.compress.decoder import compress_decoder, summary, work_dir

    if args.donor is not None:
        from pocketfusion.checkpoint import load_model
        from pocketfusion.compress.decoder.adopt import adopt_decoder

        model, donor = _load(args), load_model(args.donor)
        m = adopt_decoder(model, donor, Path(args.output))
        d = m.metrics["decoder"]
        print(f"wrote {args.output}/ ({model.path} with the compact VAE of {donor.path}; no training)")
        if "psnr_db" in d:
            print(f"  decoder as measured on its own source: PSNR {d['psnr_db']['mean_db']:.2f} dB mean, "
                  f"{d.get('macs_ratio', float('nan')):.2f}x fewer MACs")
        return 0

    cfg = _decoder_config(args, kind=args.kind, keep=args.keep, widths=_int_list(args.widths, "--widths"), channels=args.channels,
                          iterations=args.iterations,
                          batch_size=args.batch_size, lr=args.lr, n_pairs=args.pairs, teacher_steps=args.teacher_steps,
                          prompts=args.prompts,
                          n_prompts=args.num_prompts, seed=args.seed, device=args.device, checkpoint_every=args.checkpoint_every,
                          work_dir=args.work_dir, resume=args.resume, keep_work=args.keep_work or None,
                          train_encoder=False if args.no_encoder else None)
    resolve_device(cfg.device)  # cuda without a GPU: fail before any work
    model = _load(args)
    print(f"distilling a {cfg.kind} VAE of {model.path}; checkpoints in {work_dir(args.output, cfg)}"
          f"{' (resuming)' if cfg.resume else ''}", flush=True)
    manifest = compress_decoder(model, cfg, Path(args.output), progress=True)
    print(f"wrote {args.output}/ (a diffusers folder: the source pipeline with a compact {cfg.kind} VAE)")
    print(summary(manifest))
    return 0


def _add_distill(sub) -> None:
    p = sub.add_parser("distill", help="step distillation: a student that samples in 1, 2 or 4 steps with the guidance scale as an input")
    _model_arg(p)
    p.add_argument("--steps", type=int, required=True, choices=[1, 2, 4], help="the student's sampling steps")
    p.add_argument("--method", default=None, choices=["lcm", "regression"],
                   help="regression (default: measured best at 1, 2 and 4 steps): onto the teacher's trajectories and samples; "
                        "lcm: latent consistency distillation")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="text file, one prompt a line (default: built-in demo prompts, demo model only)")
    p.add_argument("--num-prompts", type=int, default=None, metavar="N",
                   help="prompts drawn (default: every line of FILE, or as many demo prompts as --pairs)")
    p.add_argument("--iterations", type=int, default=None, metavar="N", help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="batch per optimizer step (default 16)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--pairs", type=int, default=None, metavar="N", help="teacher samples made before training (default 1024)")
    p.add_argument("--teacher-steps", type=int, default=None, metavar="N", help="teacher DDIM steps, and the LCM solver's (default 50)")
    p.add_argument("--teacher", default=None, metavar="MODEL",
                   help="the pipeline whose U-Net makes the targets (default: MODEL itself); e.g. a pruned MODEL's unpruned original")
    p.add_argument("--guidance-range", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="teacher guidance scales drawn uniformly (default 2 6)")
    p.add_argument("--seed", type=int, default=None, help="seed of the prompts, teacher samples and training (default 0)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="training device (default cpu)")
    p.add_argument("--precision", default=None, choices=["none", "bf16", "fp16"], help="mixed precision (default none; fp16: cuda only)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass (less memory)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N", help="checkpoint every N iterations (default 100; 0: never)")
    p.add_argument("--work-dir", default=None, help="checkpoints and cached teacher samples (default: .<OUT>.distill-work beside -o)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the work directory")
    p.add_argument("--keep-work", action="store_true",
                   help="keep the work directory (cached teacher latents, checkpoints) after a successful run")
    p.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    p.set_defaults(func=cmd_distill)


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="SnapFusion-style U-Net pruning driven by latency measured on the runtime, recovered by "
                                     "knowledge distillation")
    _model_arg(p)
    p.add_argument("--runtime", default=None, choices=["onnxruntime", "executorch", "litert"],
                   help="the runtime whose measured latency drives the search (default onnxruntime)")
    p.add_argument("--device", dest="device_target", default=None, metavar="host|android[:SERIAL]",
                   help="where the latency table is measured (default: this host)")
    p.add_argument("--latency-budget", type=float, default=None, metavar="F",
                   help="fraction of the original per-call U-Net latency to reach (default 0.55)")
    p.add_argument("--preset", default=None, choices=["bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny"],
                   help="BK-SDM's fixed block removal instead of the search (same recovery)")
    p.add_argument("--latency-table", default=None, metavar="FILE", help="reuse a latency table (JSON) instead of measuring one")
    p.add_argument("--save-table", default=None, metavar="FILE", help="write the measured latency table here (JSON)")
    p.add_argument("--robust-iterations", type=int, default=None, metavar="N",
                   help="robust training before the search, units dropped at random (default 300; 0: none)")
    p.add_argument("--iterations", type=int, default=None, metavar="N", help="KD recovery iterations (default 1000)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="batch per optimizer step (default 32)")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate, cosine decay (default 2e-4)")
    p.add_argument("--pairs", type=int, default=None, metavar="N", help="teacher samples made before training (default 1024)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="text file, one prompt a line (default: the built-in demo prompts)")
    p.add_argument("--num-prompts", type=int, default=None, metavar="N", help="prompts drawn")
    p.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    p.add_argument("--train-device", dest="device", default=None, choices=["cpu", "cuda"], help="training device (default cpu)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N", help="checkpoint every N iterations (default 100)")
    p.add_argument("--work-dir", default=None, help="checkpoints and cached teacher samples (default: .<OUT>.prune-work beside -o)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the work directory")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory (teacher samples, checkpoints, the search's "
                                                              "choice) after writing, e.g. to resume with more --iterations")
    p.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    p.set_defaults(func=cmd_prune)


def _add_decoder(sub) -> None:
    p = sub.add_parser("decoder", help="a compact VAE (TAESD-style AutoencoderTiny, or the original's pruned) distilled from "
                                       "the model's own on its teacher latents; the rest of the pipeline is kept")
    _model_arg(p)
    p.add_argument("--kind", default="tiny", choices=["tiny", "pruned"],
                   help="tiny: diffusers' AutoencoderTiny (default); pruned: the original AutoencoderKL with --keep of each "
                        "stage's channels (SnapFusion), initialised from the original's")
    p.add_argument("--keep", type=float, default=None, metavar="F", help="pruned: the share of channels kept (default 0.5)")
    p.add_argument("--widths", default=None, metavar="W,W,...",
                   help="pruned: each stage's kept channels instead of --keep, in block_out_channels order (highest "
                        "resolution first), e.g. 6,12,16,16 for the demo's 16,32,64,64; stages of equal width keep equal widths")
    p.add_argument("--from", dest="donor", default=None, metavar="MODEL",
                   help="no training: adopt the compact VAE of MODEL (made by 'pocketfusion decoder' from the same original VAE), "
                        "e.g. to give a pruned or distilled model the decoder its original already has")
    p.add_argument("--channels", type=int, default=None, metavar="N", help="the decoder's width (default 24)")
    p.add_argument("--iterations", type=int, default=None, metavar="N", help="optimizer steps (default 1500)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="latents per optimizer step (default 32)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate, cosine decay (default 2e-3)")
    p.add_argument("--pairs", type=int, default=None, metavar="N", help="teacher latents sampled before training (default 512)")
    p.add_argument("--teacher-steps", type=int, default=None, metavar="N", help="teacher DDIM steps (default 50)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="text file, one prompt a line (default: built-in demo prompts, demo model only)")
    p.add_argument("--num-prompts", type=int, default=None, metavar="N", help="prompts drawn (default: as many as --pairs allows)")
    p.add_argument("--no-encoder", action="store_true", help="do not train the compact encoder (image-to-image will not work)")
    p.add_argument("--seed", type=int, default=None, help="seed of the prompts, teacher latents and training (default 0)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="training device (default cpu)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N", help="checkpoint every N iterations (default 100; 0: never)")
    p.add_argument("--work-dir", default=None, help="checkpoints and cached teacher latents (default: .<OUT>.decoder-work beside -o)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the work directory")
    p.add_argument("--keep-work", action="store_true",
                   help="keep the work directory (cached teacher latents, checkpoints) after a successful run")
    p.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    p.set_defaults(func=cmd_decoder)
