"""The distill stage: ``distill(model, DistillConfig, out)`` trains a 1-, 2- or 4-step student of a
pipeline's U-Net, with the guidance scale as an input, and writes one artifact directory (stage ``distill``).

The output is a normal diffusers folder that plain diffusers loads and samples
(``LatentConsistencyModelPipeline``, or ``StableDiffusionPipeline``, which passes the guidance embedding
itself when the U-Net has ``time_cond_proj_dim``)::

    unet/            the student (safetensors), ``time_cond_proj_dim = cfg.w_embedding_dim``
    scheduler/       diffusers' ``LCMScheduler`` (``original_inference_steps = cfg.teacher_steps``)
    vae/, text_encoder/, tokenizer/   the source's, as they are
    manifest.json    typed: components, ``sampler`` (guidance ``embedded``, ``default_steps = cfg.steps``);
                     settings (``DistillConfig.to_dict()``), metrics["training"] (wall time, device, iterations, loss)

Checkpoints and the cached teacher samples live in a work directory beside the output until it is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from pocketfusion import artifact, pruning
from pocketfusion.compress.distill.config import DistillConfig
from pocketfusion.compress.workdir import device_name, frozen
from pocketfusion.errors import UserError
from pocketfusion.validate import resolve_device

logger = logging.getLogger(__name__)

STAGE = "distill"
_SETTINGS = "distill.json"
# settings a resumed run may change without changing what it computes
_RESUME_FREE = ("iterations", "checkpoint_every", "resume", "keep_work", "work_dir", "teacher_batch")
_FORMATS = {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers", "tokenizer": "tokenizer", "scheduler": "scheduler"}


def work_dir(out: str | Path, cfg: DistillConfig) -> Path:
    """Where checkpoints and cached teacher samples go: ``cfg.work_dir``, else ``.<out name>.distill-work`` beside ``out``."""
    out = Path(out)
    return Path(cfg.work_dir) if cfg.work_dir is not None else out.parent / f".{out.name}.distill-work"


def distill(model, cfg: DistillConfig, out: str | Path, *, progress: bool = True) -> artifact.Manifest:
    """Distill ``model``'s sampler into a ``cfg.steps``-step student and write the artifact ``out``.

    Args:
        model: a loaded Stable Diffusion (1.x/2.x) pipeline (``checkpoint.Model``), float, not distilled.
        cfg: the stage's options (``DistillConfig``).
        out: the output directory (written under a temporary name, renamed into place when complete).
        progress: progress bars (teacher sampling; training with loss and ETA).

    Returns:
        The written ``artifact.Manifest``.

    Raises:
        UserError: a bare component, an SDXL or quantized or already distilled model, a bad output path,
            no prompts, CUDA asked for but missing, or a checkpoint made with other settings (``resume``).
    """
    _check_input(model, out, cfg)
    try:
        return _distill(model, cfg, Path(out), progress)
    finally:  # the caller's model stays where load_model put it
        if cfg.device != "cpu":
            model.components["text_encoder"].to("cpu")
            model.unet.to("cpu")


def _distill(model, cfg: DistillConfig, out: Path, progress: bool) -> artifact.Manifest:
    import torch

    from pocketfusion.compress.distill import teacher as TE
    from pocketfusion.compress.distill.student import Schedule, make_student

    work = work_dir(out, cfg)
    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    prompts = TE.select_prompts(model, cfg)
    source = artifact.source_ref(model.path)
    tmodel = _teacher_model(model, cfg)
    tsource = artifact.source_ref(tmodel.path) if tmodel is not model else source
    teacher = frozen(tmodel.unet, device)
    schedule = Schedule(dict(model.components["scheduler"].config), cfg.timestep_scaling)
    cond, uncond = TE.encode(model, prompts, device).cpu(), TE.encode(model, [""], device, negative=True).cpu()
    _claim_work_dir(work, cfg)
    pairs = TE.teacher_pairs(tmodel, teacher, cond, uncond, prompts, cfg, device=device, work=work, model_hash=tsource.sha256,
                             record=trajectory_timesteps(cfg, schedule.T), progress=progress)
    sampling_s = time.perf_counter() - t0
    student = make_student(model.unet, cfg.w_embedding_dim)
    result, final = _train(student, teacher, schedule, pairs, cond, uncond, cfg, work, progress)
    train_s_this_run = time.perf_counter() - t0 - sampling_s
    rank, world = _rank()
    losses = result.losses
    tail = losses[-max(1, len(losses) // 10):]
    metrics: dict[str, Any] = {"training": {
        "method": cfg.method, "steps": cfg.steps, "device": cfg.device, "device_name": device_name(device),
        "iterations": result.iterations, "resumed_from": result.resumed_from, "batch_size": cfg.batch_size, "processes": world,
        "teacher_pairs": len(pairs), "teacher_pairs_cached": pairs.cached, "prompts": len(prompts),
        "final_loss": losses[-1], "loss_last_10pct": sum(tail) / len(tail), "first_loss": losses[0],
        "teacher_sampling_s": round(pairs.seconds, 2), "train_s": round(result.elapsed_s, 2),
        "train_s_this_run": round(train_s_this_run, 2), "wall_s": round(time.perf_counter() - t0, 2),
        "weights": "ema_target" if cfg.method == "lcm" else "online",
        "teacher": {"path": str(tsource.path), "sha256": tsource.sha256},
    }}
    if rank == 0:  # data-parallel (accelerate launch): rank 0 writes, the others read what it wrote
        manifest = _write(model, final, cfg, out, source=source, metrics=metrics)
        if not cfg.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()
    return manifest if rank == 0 else artifact.load_manifest(out)


def trajectory_timesteps(cfg: DistillConfig, T: int = 1000) -> tuple[int, ...]:
    """The student timesteps after the first at which the teacher's trajectory is kept (multistep ``regression``)."""
    from pocketfusion.compress.distill.student import lcm_timesteps

    return tuple(lcm_timesteps(cfg.steps, cfg.teacher_steps, T)[1:]) if cfg.method == "regression" else ()


def _rank() -> tuple[int, int]:
    """(rank, world size) of the process group the training loop joined under ``accelerate launch``, else (0, 1)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _claim_work_dir(work: Path, cfg: DistillConfig) -> None:
    from pocketfusion.compress.workdir import claim

    claim(work, {k: v for k, v in cfg.to_dict().items() if k not in _RESUME_FREE}, resume=cfg.resume, record=_SETTINGS,
          fresh=("checkpoints",))


def _check_input(model, out, cfg: DistillConfig) -> None:
    if model.kind != "pipeline":
        raise UserError(f"{model.path} is a bare {model.class_name}: distill needs the full pipeline (its teacher samples need "
                        "the text encoder and scheduler)")
    if model.class_name not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise UserError(f"{model.path} is a {model.class_name}: distill supports Stable Diffusion 1.x/2.x and SDXL pipelines")
    if model.quantized:
        raise UserError(f"{model.path} is quantized: distill its float source, then quantize the student")
    if getattr(model.unet.config, "time_cond_proj_dim", None) is not None:
        raise UserError(f"{model.path} is already distilled (its U-Net takes the guidance scale as an input); distill its teacher")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    if out.resolve() == Path(model.path).resolve():
        raise UserError(f"output {out} is the source model folder; choose another directory")
    resolve_device(cfg.device)


def _teacher_model(model, cfg: DistillConfig):
    """The pipeline whose U-Net makes the targets: ``cfg.teacher`` when given (checked to share the input's text
    encoder, noise schedule and latent space), else ``model`` itself."""
    if cfg.teacher is None:
        return model
    import torch

    from pocketfusion.checkpoint import load_model, sampler_of

    teacher = load_model(cfg.teacher)
    if teacher.kind != "pipeline" or teacher.class_name != model.class_name:
        raise UserError(f"--teacher {cfg.teacher} is a {teacher.class_name}, not a {model.class_name} like {model.path}")
    if teacher.quantized or getattr(teacher.unet.config, "time_cond_proj_dim", None) is not None:
        raise UserError(f"--teacher {cfg.teacher} is quantized or distilled: give the float 50-step original")
    a, b = sampler_of(model), sampler_of(teacher)
    if tuple(a.latent_shape) != tuple(b.latent_shape):
        raise UserError(f"--teacher {cfg.teacher}: latent shape {tuple(b.latent_shape)} differs from {tuple(a.latent_shape)}")
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
    sa, sb = (dict(m.components["scheduler"].config) for m in (model, teacher))
    if diff := [k for k in keys if sa.get(k) != sb.get(k)]:
        raise UserError(f"--teacher {cfg.teacher}: its noise schedule differs ({', '.join(diff)})")
    ta, tb = model.components["text_encoder"].state_dict(), teacher.components["text_encoder"].state_dict()
    if ta.keys() != tb.keys() or any(not torch.equal(ta[k], tb[k]) for k in ta):
        raise UserError(f"--teacher {cfg.teacher}: its text encoder differs from {model.path}'s (the student is conditioned "
                        "on the input's text encoder)")
    return teacher


def _train(student, teacher, schedule, pairs, cond, uncond, cfg: DistillConfig, work: Path, progress: bool):
    """Run the training loop; returns (TrainResult, the student weights to save)."""
    from pocketfusion.compress.distill.methods import lcm_loss, regression_loss
    from pocketfusion.compress.distill.student import Shadow
    from pocketfusion.training import TrainConfig, train

    tcfg = TrainConfig(iterations=cfg.iterations, lr=cfg.lr, grad_clip=cfg.grad_clip, device=cfg.device, seed=cfg.seed,
                       precision=cfg.precision, checkpoint_every=cfg.checkpoint_every, resume=cfg.resume,
                       log_every=max(1, cfg.iterations // 50))
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    desc = f"distill {cfg.method} {cfg.steps}-step"
    if cfg.method == "lcm":
        shadow = Shadow(student)
        loss_fn = lcm_loss(student, teacher, shadow, schedule, pairs, cond, uncond, cfg)
        result = train({"student": student, "target": shadow}, loss_fn, tcfg, ckpt_dir=work / "checkpoints", progress=progress,
                       desc=desc)
        shadow.update(student, cfg.ema_decay)  # the last optimizer step's target update
        final = shadow.load_into(student)
    else:
        loss_fn = regression_loss(student, schedule, pairs, cond, cfg)
        result = train({"student": student}, loss_fn, tcfg, ckpt_dir=work / "checkpoints", progress=progress, desc=desc)
        final = student
    final = final.cpu().eval()
    if cfg.gradient_checkpointing:
        final.disable_gradient_checkpointing()
    return result, final


def lcm_scheduler_config(model, cfg: DistillConfig) -> dict:
    """diffusers' ``LCMScheduler`` config for the student: the teacher's noise schedule and prediction type."""
    from diffusers import LCMScheduler

    src = {k: v for k, v in dict(model.components["scheduler"].config).items() if not k.startswith("_")}
    sched = LCMScheduler.from_config(src, original_inference_steps=cfg.teacher_steps, timestep_scaling=cfg.timestep_scaling)
    return dict(sched.config)


def _write(model, unet, cfg: DistillConfig, out: Path, *, source: artifact.SourceRef, metrics: dict) -> artifact.Manifest:
    from diffusers import LCMScheduler

    from pocketfusion.checkpoint import sampler_of

    src = Path(model.path)
    index = json.loads((src / "model_index.json").read_text())
    with artifact.staged_dir(out) as tmp:
        artifact.copy_components(src, tmp, skip=("unet", "scheduler"))
        index["scheduler"] = ["diffusers", "LCMScheduler"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        LCMScheduler.from_config(lcm_scheduler_config(model, cfg)).save_pretrained(str(tmp / "scheduler"))
        pruning.save_unet(unet, tmp / "unet")  # a pruned U-Net's pruning.json too
        sampler = dataclasses.replace(sampler_of(model), scheduler="scheduler", guidance="embedded", default_steps=cfg.steps)
        comps = [artifact.Component(n, n, _FORMATS.get(n) or _FORMATS[n.rstrip("_0123456789")]) for n in model.components]
        notes = [f"distilled student ({cfg.method}, {cfg.steps} steps): the U-Net takes the guidance scale g as timestep_cond = "
                 f"sinusoidal embedding of (g - 1) * 1000, {cfg.w_embedding_dim} wide (diffusers' get_guidance_scale_embedding)"]
        return artifact.write_manifest(tmp, stage=STAGE, settings=cfg.to_dict(), source=source, components=comps,
                                       sampler=sampler, metrics=metrics, notes=notes)


def summary(manifest: artifact.Manifest) -> str:
    """A few lines on what a distill manifest records: the student and its training cost."""
    m = manifest.metrics["training"]
    return "\n".join([
        f"  student: {m['steps']} step(s), method {m['method']}, guidance embedded ({m['weights']} weights)",
        f"  training: {m['iterations']} iterations of batch {m['batch_size']} x {m['processes']} process(es) on {m['device']} "
        f"({m['device_name']}), "
        f"loss {m['first_loss']:.4g} -> {m['final_loss']:.4g}",
        f"  cost: {m['wall_s']:.1f} s wall ({m['teacher_sampling_s']:.1f} s teacher sampling of {m['teacher_pairs']} pairs"
        f"{', cached' if m['teacher_pairs_cached'] else ''}; {m['train_s']:.1f} s training)",
    ])
