"""Calibration sets: real component inputs recorded from sampling runs of the original pipeline.

``capture`` runs the PyTorch pipeline (tokenizer, text encoder, the model's scheduler, CFG) once
per prompt, prompt ``i`` with seed ``seed + i``, and records the U-Net's feed at ``n_timesteps``
steps spread evenly over the whole trajectory (first and last included; activation ranges drift
with the timestep, Q-Diffusion), each as a CFG pair ``[cond, uncond]``; for a distilled student (a
guidance-embedded U-Net) it runs the student's own sampler (its scheduler and step count, one batch-1
call per step with the guidance scale as an input) and records those calls, ``guidance`` included. ``save`` writes it as an
artifact directory (stage ``calibrate``)::

    DIR/manifest.json             settings: prompts, seeds, steps, guidance, scheduler + config,
                                  sampled step indices and timesteps; source: model path + hash
    DIR/calibration.safetensors   M = prompts x timesteps rows, ordered by prompt, then step
        unet.sample                 (M, B, C, h, w) float32  after scale_model_input (B: 2, a CFG pair; 1 for a student)
        unet.timestep               (M, B)          float32
        unet.encoder_hidden_states  (M, B, L, D)    float32
        unet.guidance               (M, 1)          float32  a student's guidance input only
        unet.text_embeds            (M, 2, T)       float32  SDXL-style U-Nets only
        unet.time_ids               (M, 2, 6)       float32  SDXL-style U-Nets only
        unet.noise_pred             (M, 2, C, h, w) float32  the U-Net's output on that feed
        unet.prompt_index           (M,)            int32
        unet.step_index             (M,)            int32
        text_encoder.input_ids      (P, 1, L)       int32
        vae_decoder.latent          (P, 1, C, h, w) float32  final latents / scaling_factor

Feed names are the U-Net's input names (those of the export specs, ``unet_spec`` etc.). The last
``max(1, round(0.2 * P))`` prompts are held out (``split="heldout"``), so quantization error can be
measured on samples that were not used to calibrate.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pocketfusion import artifact
from pocketfusion.errors import UserError
from pocketfusion.validate import resolve_device

logger = logging.getLogger(__name__)

STAGE = "calibrate"
FILE = "calibration.safetensors"
FORMAT_VERSION = 1
SPLITS = ("all", "calib", "heldout")
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
DEFAULT_STEPS = 20  # sampling steps of a classifier-free-guided model's calibration runs
SDXL_INPUTS = ("text_embeds", "time_ids")
_REQUIRED = ("unet.sample", "unet.timestep", "unet.encoder_hidden_states", "unet.noise_pred", "unet.prompt_index",
             "unet.step_index", "text_encoder.input_ids", "vae_decoder.latent")


def heldout_count(n_prompts: int) -> int:
    """How many of ``n_prompts`` prompts (the last ones) are held out of calibration."""
    return max(1, round(0.2 * n_prompts))


@dataclass
class CalibrationSet:
    """Recorded component inputs of sampling runs, stacked as in ``calibration.safetensors``.

    ``settings`` holds steps, guidance, scheduler class + config, sampled step indices and
    timesteps; ``source`` the model's path and content hash; ``tensors`` the arrays by key.

    Example:
        >>> model = load_model()
        >>> cset = capture(model, suite_for(model).calibration_prompts(8), steps=20, n_timesteps=10)
        >>> feeds = cset.unet_feeds("calib")      # 6 prompts x 10 CFG pairs, batch 2 each
    """

    prompts: list[str]
    seeds: list[int]
    settings: dict[str, Any]
    source: artifact.SourceRef | None  # the model it was captured from (path, content hash)
    tensors: dict[str, np.ndarray]
    metrics: dict[str, Any] = field(default_factory=dict)

    def prompt_indices(self, split: str = "all") -> list[int]:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        n = len(self.prompts)
        first_heldout = n - heldout_count(n)
        return list({"all": range(n), "calib": range(first_heldout), "heldout": range(first_heldout, n)}[split])

    @property
    def sdxl(self) -> bool:
        return "unet.text_embeds" in self.tensors

    @property
    def embedded(self) -> bool:
        """Recorded from a distilled student: batch-1 feeds with the guidance scale as an input."""
        return "unet.guidance" in self.tensors

    @property
    def unet_input_names(self) -> tuple[str, ...]:
        return UNET_INPUTS + (SDXL_INPUTS if self.sdxl else ()) + (("guidance",) if self.embedded else ())

    def _rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(np.isin(self.tensors["unet.prompt_index"], self.prompt_indices(split)))

    def unet_feeds(self, split: str = "all") -> list[dict[str, np.ndarray]]:
        """U-Net feeds (CFG pairs, batch 2; a student's batch 1) named as ``unet_spec``'s inputs, by prompt then step."""
        return [{n: self.tensors[f"unet.{n}"][r] for n in self.unet_input_names} for r in self._rows(split)]

    def unet_outputs(self, split: str = "all") -> list[dict[str, np.ndarray]]:
        """The PyTorch U-Net's ``noise_pred`` on each of ``unet_feeds(split)``."""
        return [{"noise_pred": self.tensors["unet.noise_pred"][r]} for r in self._rows(split)]

    def text_encoder_feeds(self, split: str = "all") -> list[dict[str, np.ndarray]]:
        """``{"input_ids": (1, L) int32}`` per prompt."""
        return [{"input_ids": self.tensors["text_encoder.input_ids"][i]} for i in self.prompt_indices(split)]

    def vae_decoder_feeds(self, split: str = "all") -> list[dict[str, np.ndarray]]:
        """``{"latent": (1, C, h, w)}`` per prompt: its final latents divided by the scaling factor."""
        return [{"latent": self.tensors["vae_decoder.latent"][i]} for i in self.prompt_indices(split)]


def _check_settings(n_prompts: int, steps: int, n_timesteps: int, guidance: float) -> None:
    if n_prompts < 1:
        raise UserError("calibration needs at least one prompt")
    if not 1 <= steps <= 1000:
        raise UserError(f"--steps must be in 1..1000, got {steps}")
    if not 1 <= n_timesteps <= steps:
        raise UserError(f"--timesteps must be in 1..{steps} (the sampling steps), got {n_timesteps}")
    if not 0.0 <= guidance <= 50.0:
        raise UserError(f"--guidance must be in 0..50, got {guidance}")


def _json_safe(config: Any) -> dict[str, Any]:
    items = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return json.loads(json.dumps(items, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _sdxl_encoder(model, unet, device):
    """A function prompt -> (context (2,L,D), text_embeds (2,T), time_ids (2,6)) as SDXL's pipeline makes them."""
    import torch

    from pocketfusion.checkpoint import build_pipeline

    if model.class_name != "StableDiffusionXLPipeline" or "text_encoder_2" not in model.components:
        raise UserError(
            f"{model.path}: the U-Net takes SDXL's added text/time embeddings but the pipeline ({model.class_name}) "
            "has no second text encoder (text_encoder_2) to make them; calibrate a StableDiffusionXLPipeline folder"
        )
    pipe = build_pipeline(model)
    cfg = unet.config
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    size = float(cfg.sample_size * pipe.vae_scale_factor)
    time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=device).repeat(2, 1)

    def encode(prompt: str):
        pe, npe, pooled, npooled = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=True)
        if pooled.shape[-1] != text_dim:
            raise UserError(f"{model.path}: text_encoder_2 gives {pooled.shape[-1]}-d pooled embeddings, the U-Net expects {text_dim}")
        return torch.cat([pe, npe]), {"text_embeds": torch.cat([pooled, npooled]), "time_ids": time_ids}

    return encode


def upcast_half(model) -> None:
    """A half-precision pipeline (an fp16 single file) is sampled in float32 here: its modules converted in place.

    Calibration and quantization sample the whole pipeline in float32 (on the CPU float16 convolutions are slow; on a
    GPU the figures stay the CPU's); what a stage writes is unaffected (components it leaves alone are copied from the
    source folder as they are)."""
    import torch

    mods = [m for m in model.components.values() if isinstance(m, torch.nn.Module)]
    low = sorted({str(p.dtype).removeprefix("torch.") for m in mods for p in m.parameters()
                  if p.dtype in (torch.float16, torch.bfloat16)})
    if not low:
        return
    logger.warning("weights are %s: sampling in float32", "/".join(low))
    for m in mods:
        m.float()


@contextlib.contextmanager
def on_device(modules, device):
    """``modules`` (the torch modules among them) on ``device`` while inside, each put back where it was after.

    On a CUDA device cuDNN's convolutions run in full float32 meanwhile (PyTorch lets them use TF32, about three
    decimal digits, by default): a calibration or quantization on the GPU computes what the CPU's would, up to
    rounding. On the CPU nothing moves."""
    import torch

    device = torch.device(device)
    mods = [m for m in modules if isinstance(m, torch.nn.Module)]
    where = [next(iter(m.parameters()), torch.empty(0)).device for m in mods]
    tf32 = torch.backends.cudnn.allow_tf32
    try:
        for m in mods:
            m.to(device)
        if device.type == "cuda":
            torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        for m, d in zip(mods, where):
            m.to(d)


def capture_steps(model, steps: int | None, n_timesteps: int) -> tuple[int, int]:
    """(steps, timesteps recorded) of a capture: ``steps`` None is the model's own sampler for a distilled
    student (its default step count, every step recorded up to ``n_timesteps``), else ``DEFAULT_STEPS``."""
    from pocketfusion.checkpoint import sampler_of

    if steps is not None:
        return steps, n_timesteps
    s = sampler_of(model) if model.kind == "pipeline" else None
    if s is not None and s.guidance == "embedded":
        return s.default_steps, min(n_timesteps, s.default_steps)
    return DEFAULT_STEPS, n_timesteps


def capture(model, prompts: Sequence[str], *, steps: int | None = None, n_timesteps: int = 10, guidance: float = 4.0,
            seed: int = 0, progress: bool = True, device: str = "cpu") -> CalibrationSet:
    """Run the PyTorch pipeline on ``prompts`` and record every component's inputs.

    Args:
        model: a ``pocketfusion.checkpoint.load_model`` pipeline.
        prompts: one image per prompt; prompt ``i`` uses seed ``seed + i``.
        steps: sampling steps of the model's scheduler (None: ``capture_steps``: a student's own, else 20).
        n_timesteps: steps recorded per prompt, spread evenly over the trajectory (first and last included).
        guidance: the guidance scale of the sampling run (classifier-free, or a student's guidance input).
        device: ``cpu`` or ``cuda``: where the text encoder(s) and the U-Net run (moved there meanwhile, put back
            after); each prompt's noise is drawn on the CPU from its seed and moved, so the set is the CPU's up to
            rounding; the recorded tensors come back to the CPU.

    Returns:
        A ``CalibrationSet`` (see the module docstring for its arrays).

    Raises:
        UserError: a bare component instead of a pipeline, no prompts, settings out of range, an
            SDXL-style U-Net without the second text encoder that feeds it, or ``cuda`` where torch sees none.
    """
    dev = resolve_device(device)
    if model.kind != "pipeline":
        raise UserError(f"{model.path} holds a bare {model.class_name}; calibration needs a full pipeline folder "
                        "(model_index.json) to run the sampler")
    prompts = list(prompts)
    upcast_half(model)
    steps, n_timesteps = capture_steps(model, steps, n_timesteps)
    _check_settings(len(prompts), steps, n_timesteps, guidance)
    comps = model.components
    with on_device([comps["text_encoder"], comps.get("text_encoder_2"), comps["unet"]], dev):
        return _capture(model, prompts, steps, n_timesteps, guidance, seed, progress, dev)


def _capture(model, prompts: list[str], steps: int, n_timesteps: int, guidance: float, seed: int, progress: bool,
             dev) -> CalibrationSet:
    import torch
    from tqdm import tqdm

    from pocketfusion.guidance import embeds_guidance, guidance_embedding

    t0 = time.perf_counter()
    comps = model.components
    tok, te, unet, vae = comps["tokenizer"], comps["text_encoder"], comps["unet"], comps["vae"]
    sched = type(comps["scheduler"]).from_config(comps["scheduler"].config)  # leave the model's own untouched
    cfg = unet.config
    if cfg.addition_embed_type not in (None, "text_time"):
        raise UserError(f"{model.path}: U-Net addition_embed_type {cfg.addition_embed_type!r} is not supported "
                        "(supported: none, 'text_time')")
    encode_sdxl = _sdxl_encoder(model, unet, dev) if cfg.addition_embed_type == "text_time" else None
    embedded = embeds_guidance(unet)
    h, w = (cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    L = tok.model_max_length
    sched.set_timesteps(steps)
    n_steps = len(sched.timesteps)
    keep = np.linspace(0, n_steps - 1, min(n_timesteps, n_steps)).round().astype(int).tolist()
    rec: dict[str, list] = {k: [] for k in ("sample", "timestep", "encoder_hidden_states", "noise_pred", "prompt_index", "step_index")}
    if encode_sdxl:
        rec.update(text_embeds=[], time_ids=[])
    if embedded:
        rec["guidance"] = []
        gg = torch.full((1,), float(guidance))  # recorded from the CPU
        kwargs_embedded = {"timestep_cond": guidance_embedding(gg, cfg.time_cond_proj_dim).to(dev, unet.dtype)}
    input_ids, latents = [], []
    for i, prompt in enumerate(tqdm(prompts, desc="calibrate", unit="prompt", disable=not progress)):
        ids = tok([prompt, ""], padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
        input_ids.append(ids[:1].numpy().astype(np.int32))
        with torch.no_grad():
            if encode_sdxl:
                ctx, added = encode_sdxl(prompt)
                kwargs = {"added_cond_kwargs": {k: v.to(unet.dtype) for k, v in added.items()}}
            else:
                ctx, added, kwargs = te(ids.to(dev), return_dict=False)[0], {}, {}
        g = torch.Generator().manual_seed(seed + i)  # on the CPU whatever the device: the same noise everywhere
        lat = (torch.randn((1, cfg.in_channels, h, w), generator=g) * sched.init_noise_sigma).to(dev)
        sched.set_timesteps(steps, device=dev)  # resets multistep schedulers' state
        if embedded:  # the student's own call: batch 1, the conditional row, the guidance scale as an input
            ctx, added = ctx[:1], {**{k: v[:1] for k, v in added.items()}, "guidance": gg}
            kwargs = {**kwargs_embedded, **({"added_cond_kwargs": {k: v[:1].to(unet.dtype) for k, v in added.items()
                                                                    if k != "guidance"}} if encode_sdxl else {})}
        b = 1 if embedded else 2
        step_kw = {"generator": g} if "generator" in inspect.signature(sched.step).parameters else {}  # PNDM / DDIM take none
        for k, t in enumerate(sched.timesteps):
            inp = sched.scale_model_input(torch.cat([lat] * b), t)
            tt = torch.full((b,), float(t), device=dev)
            with torch.no_grad():
                eps = unet(inp.to(unet.dtype), tt, ctx.to(unet.dtype), return_dict=False, **kwargs)[0].float()
            if k in keep:
                for name, v in (("sample", inp), ("timestep", tt), ("encoder_hidden_states", ctx), ("noise_pred", eps), *added.items()):
                    rec[name].append(v.float().cpu().numpy())
                rec["prompt_index"].append(i)
                rec["step_index"].append(k)
            if embedded:
                lat = sched.step(eps, t, lat, **step_kw).prev_sample  # LCM re-noises from the image's generator
            else:
                e_c, e_u = eps.chunk(2)
                lat = sched.step(e_u + guidance * (e_c - e_u), t, lat, **step_kw).prev_sample  # ancestral schedulers draw from it
        latents.append((lat / vae.config.scaling_factor).float().cpu().numpy())
    tensors = {f"unet.{k}": np.stack(v).astype(np.int32 if k.endswith("_index") else np.float32, copy=False) for k, v in rec.items()}
    tensors["text_encoder.input_ids"] = np.stack(input_ids)
    tensors["vae_decoder.latent"] = np.stack(latents).astype(np.float32, copy=False)
    return CalibrationSet(prompts=prompts, seeds=[seed + i for i in range(len(prompts))],
                          settings=_capture_settings(steps, guidance, sched, keep, tensors, embedded),
                          source=artifact.source_ref(model.path), tensors=tensors,
                          metrics={"capture_seconds": round(time.perf_counter() - t0, 3)})


def _capture_settings(steps: int, guidance: float, sched, keep: list[int], tensors: dict[str, np.ndarray],
                      embedded: bool = False) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "steps": steps,
        "n_timesteps": len(keep),
        "guidance": float(guidance),
        **({"guidance_input": "embedded"} if embedded else {"cfg_pair": ["cond", "uncond"]}),
        "scheduler": {"class": type(sched).__name__, "config": _json_safe(sched.config)},
        "step_indices": keep,
        "timesteps": [float(sched.timesteps[k]) for k in keep],
        "unet_inputs": [n for n in (*UNET_INPUTS, *SDXL_INPUTS, "guidance") if f"unet.{n}" in tensors],
    }


def save(cset: CalibrationSet, out_dir: str | Path) -> artifact.Manifest:
    """Write ``cset`` as an artifact directory (manifest schema 2, stage ``calibrate``; atomically, an
    existing ``out_dir`` is replaced). A later stage names it by a typed ``artifact.CalibrationRef``."""
    from safetensors.numpy import save_file

    n = len(cset.prompts)
    metrics = {
        **cset.metrics, "prompts": n, "unet_pairs": int(cset.tensors["unet.sample"].shape[0]),
        "heldout_prompt_indices": cset.prompt_indices("heldout"),
    }
    with artifact.staged_dir(out_dir) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in sorted(cset.tensors.items())}, str(tmp / FILE))
        return artifact.write_manifest(tmp, stage=STAGE, settings={"prompts": cset.prompts, "seeds": cset.seeds, **cset.settings},
                                       source=cset.source, metrics=metrics)


def load(path: str | Path, model=None) -> CalibrationSet:
    """Read a set written by ``save`` (checksums verified); with ``model``, reject a set made for another model.

    Raises:
        UserError: not a calibration set, corrupt files, or (with ``model``) a set made from a
            different model (other content hash or other tensor shapes).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    root = Path(path)
    if not root.is_dir():
        raise UserError(f"calibration set {root} does not exist (make one with 'pocketfusion calibrate MODEL -o DIR')")
    m = artifact.load_manifest(root)
    if m.stage != STAGE:
        raise UserError(f"{root} is a {m.stage!r} artifact, not a calibration set (made by 'pocketfusion calibrate')")
    settings = dict(m.settings)
    if settings.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{root}: calibration format_version {settings.get('format_version')!r} is not supported "
                        f"(this pocketfusion reads {FORMAT_VERSION})")
    try:
        tensors = load_file(str(root / FILE))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{root / FILE}: cannot be read ({str(e).splitlines()[0]})") from None
    missing = [k for k in _REQUIRED if k not in tensors]
    if missing:
        raise UserError(f"{root / FILE} lacks {', '.join(missing)}")
    cset = CalibrationSet(prompts=list(settings.pop("prompts")), seeds=list(settings.pop("seeds")), settings=settings,
                          source=m.source, tensors=tensors,
                          metrics={k: v for k, v in m.metrics.items() if k == "capture_seconds"})
    if model is not None:
        check_model(cset, model, name=str(root))
    return cset


def check_model(cset: CalibrationSet, model, *, name: str = "calibration set") -> None:
    """Raise ``UserError`` unless ``cset`` was captured from ``model`` (same shapes and content hash)."""
    src = cset.source
    made_for = f"{src.path} (sha256 {src.sha256[:12]})" if src is not None else "an unknown model"
    if model.kind != "pipeline":
        raise UserError(f"{model.path} holds a bare {model.class_name}; calibration sets belong to full pipeline folders")
    cfg, L = model.components["unet"].config, model.components["tokenizer"].model_max_length
    h, w = (cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    D = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
    from pocketfusion.guidance import embeds_guidance

    b = 1 if embeds_guidance(model.components["unet"]) else 2
    expect = {"unet.sample": (b, cfg.in_channels, h, w), "unet.encoder_hidden_states": (b, L, D), "text_encoder.input_ids": (1, L)}
    for key, shape in expect.items():
        got = tuple(cset.tensors[key].shape[1:])
        if got != shape:
            raise UserError(f"calibration set {name} was made for another model, {made_for}: its {key} is {got}, "
                            f"{model.path} needs {shape}")
    if cset.sdxl != (cfg.addition_embed_type == "text_time"):
        raise UserError(f"calibration set {name} was made for another model, {made_for}: SDXL inputs "
                        f"{'present' if cset.sdxl else 'absent'}, {model.path} needs the opposite")
    digest = artifact.content_hash(model.path)
    if src is None or digest != src.sha256:
        raise UserError(f"calibration set {name} was made for {made_for}, not {Path(model.path).resolve()} (sha256 {digest[:12]}); "
                        "make one for this model with 'pocketfusion calibrate MODEL -o DIR'")
