"""Load Stable-Diffusion-style checkpoints from disk, safely.

Accepted inputs:

* a diffusers pipeline folder (``model_index.json`` + ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``; SDXL's ``text_encoder_2/`` and ``tokenizer_2/`` too);
* a bare component folder (``config.json`` + weights), e.g. a U-Net on its own;
* a single-file SD 1.x / SD 2.x / SDXL base checkpoint in the original layout (``pocketfusion.single_file``).

Weights are read from safetensors. Pickled ``.bin`` / ``.ckpt`` files are refused unless the caller
passes ``allow_pickle=True``, and even then are read with ``torch.load(weights_only=True)``, so no
code in a checkpoint runs. Every problem a user can cause (missing folder, bad config, truncated
or corrupt weights, shapes that contradict the config, an unsupported architecture) raises
``CheckpointError`` with one line that says what and where.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pocketfusion.errors import CheckpointError

logger = logging.getLogger(__name__)

DEMO_MODEL = Path(__file__).resolve().parent / "demo" / "model"
# Bundled models, addressable as MODEL by name: the demo teacher and its distilled students.
BUNDLED: dict[str, Path] = {
    "demo": DEMO_MODEL,
    "demo-4step": DEMO_MODEL.parent / "model-4step",
    "demo-1step": DEMO_MODEL.parent / "model-1step",
    "demo-tiny-decoder": DEMO_MODEL.parent / "model-tiny-decoder",
    "demo-pruned": DEMO_MODEL.parent / "model-pruned",
    "demo-mobile": DEMO_MODEL.parent / "model-mobile",
}


def bundled_models() -> list[dict]:
    """Every bundled model that is present: name, path, stage, step count, guidance mode and the
    figures measured on it (``metrics["evaluation"]`` of its manifest, when recorded)."""
    from pocketfusion import artifact

    rows = []
    for name, path in BUNDLED.items():
        if not (path / artifact.MANIFEST).is_file():
            continue
        m = artifact.load_manifest(path, verify=False)
        rows.append({"name": name, "path": str(path), "stage": m.stage,
                     "steps": m.sampler.default_steps if m.sampler else 50, "guidance": m.sampler.guidance if m.sampler else "cfg",
                     "evaluation": m.metrics.get("evaluation")})
    return rows


def find_ref(path: str | Path, sha256: str, *, exclude: Path | None = None) -> Path | None:
    """The folder holding the files of content hash ``sha256``: ``path`` when it still does, else a bundled model
    that does (a model shipped with the package names folders on the machine that made it)."""
    from pocketfusion import artifact

    candidates = [Path(path)] + [p for p in BUNDLED.values() if exclude is None or p.resolve() != exclude.resolve()]
    for p in candidates:
        if p.is_dir() and artifact.content_hash(p) == sha256:
            return p
    return None


def find_teacher(model) -> Path | None:
    """The 50-step model a distilled student learned from: the teacher its distillation recorded (a pruned
    student's unpruned original), else its source (``find_source``)."""
    from pocketfusion import artifact

    if (Path(model.path) / artifact.MANIFEST).is_file():
        t = artifact.load_manifest(model.path, verify=False).metrics.get("training", {}).get("teacher")
        if isinstance(t, dict) and "sha256" in t:
            return find_ref(t["path"], t["sha256"], exclude=Path(model.path))
    return find_source(model)


def find_source(model) -> Path | None:
    """The folder ``model`` was made from (its manifest's ``source``), found by content hash: the recorded
    path when it still holds those files, else a bundled model that does (a student shipped with the
    package names the teacher's path on the machine that distilled it). None when neither does."""
    from pocketfusion import artifact

    if not (Path(model.path) / artifact.MANIFEST).is_file():
        return None
    src = artifact.load_manifest(model.path, verify=False).source
    if src is None:
        return None
    return find_ref(src.path, src.sha256, exclude=Path(model.path))


def resolve_model_path(path: str | Path | None) -> Path:
    """``None`` → the demo model; a bundled model's name (``demo-4step``) → its folder; else the path."""
    if path is None:
        return DEMO_MODEL
    if isinstance(path, str) and path in BUNDLED and not Path(path).exists():
        return BUNDLED[path]
    return Path(path)

# class name -> (library, weight file stem)
SUPPORTED_MODELS: dict[str, tuple[str, str]] = {
    "UNet2DConditionModel": ("diffusers", "diffusion_pytorch_model"),
    "AutoencoderKL": ("diffusers", "diffusion_pytorch_model"),
    "AutoencoderTiny": ("diffusers", "diffusion_pytorch_model"),
    "CLIPTextModel": ("transformers", "model"),
    "CLIPTextModelWithProjection": ("transformers", "model"),
}
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
SUPPORTED_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
_OPTIONAL = ("safety_checker", "feature_extractor", "image_encoder")


@dataclass
class Model:
    """A loaded checkpoint: its components by name (``unet``, ``vae``, ``text_encoder``, ...)."""

    path: Path
    kind: str  # "pipeline" | "component"
    class_name: str  # pipeline class, or the component's class for a bare folder
    components: dict[str, Any] = field(default_factory=dict)
    manifest: Any = None  # artifact.Manifest when the folder carries one
    origin: dict | None = None  # a single-file checkpoint: family, prediction type (and why), config used

    def ref(self, name: str):
        """The manifest's typed entry (``artifact.Component``) for component ``name``, or None."""
        return self.manifest.find(name) if self.manifest is not None else None

    @property
    def quantized(self) -> bool:
        """Whether a stage put a component's weights on a quantization grid (``compress --quant``)."""
        return self.manifest is not None and any(c.grid is not None for c in self.manifest.components)

    @property
    def unet(self):
        return self.components.get("unet")

    def require_pipeline(self) -> None:
        if self.kind != "pipeline":
            raise CheckpointError(
                f"{self.path} holds a bare {self.class_name}; this command needs a full pipeline folder (model_index.json)"
            )


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{what}: {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{what}: {path} is not valid JSON ({e.msg} at line {e.lineno})"
            if isinstance(e, json.JSONDecodeError)
            else f"{what}: {path} is not UTF-8 text"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path} must hold a JSON object")
    return data


def _class_of(config: dict, path: Path) -> str:
    name = config.get("_class_name")
    if name is None and isinstance(config.get("architectures"), list) and config["architectures"]:
        name = config["architectures"][0]
    if not isinstance(name, str):
        raise CheckpointError(f"{path}: config names no model class (_class_name or architectures)")
    if name not in SUPPORTED_MODELS:
        raise CheckpointError(f"{path}: architecture {name!r} is not supported (supported: {', '.join(SUPPORTED_MODELS)})")
    return name


def _weight_files(folder: Path, stem: str, allow_pickle: bool) -> tuple[list[Path], bool]:
    """Return (files, is_safetensors) for a component folder."""
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single], True
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        wm = _read_json(index, "sharded weights index").get("weight_map")
        if not isinstance(wm, dict):
            raise CheckpointError(f"{index}: has no weight_map")
        shards = sorted({folder / v for v in wm.values()})
        for s in shards:
            if not s.is_file():
                raise CheckpointError(f"{folder}: shard {s.name} named in {index.name} is missing")
        return shards, True
    pickled = [p for p in (folder / f"{stem}.bin", folder / "pytorch_model.bin", folder / f"{stem}.ckpt") if p.is_file()]
    if pickled:
        if not allow_pickle:
            raise CheckpointError(
                f"{folder}: only pickled weights ({pickled[0].name}) found; pickle files can run code when loaded. "
                "Convert them to safetensors, or pass --allow-pickle to read them with torch.load(weights_only=True)"
            )
        return [pickled[0]], False
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (found {', '.join(others)}; variants are not loaded implicitly)" if others else ""
    raise CheckpointError(f"{folder}: no weights file {stem}.safetensors{hint}")


def _read_state_dict(files: list[Path], safetensors: bool) -> dict:
    import torch

    sd: dict = {}
    for f in files:
        if safetensors:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                sd.update(load_file(str(f)))
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None
        else:
            try:
                sd.update(torch.load(str(f), map_location="cpu", weights_only=True))
            except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError...
                raise CheckpointError(
                    f"{f}: cannot be read with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                ) from None
    return sd


def _build(class_name: str, config: dict, folder: Path):
    import torch

    library, _ = SUPPORTED_MODELS[class_name]
    try:
        if library == "diffusers":
            import diffusers

            cls = getattr(diffusers, class_name)
            model = cls.from_config({k: v for k, v in config.items()})
        else:
            import transformers

            cls = getattr(transformers, class_name)
            cfg_cls = cls.config_class
            model = cls(cfg_cls.from_dict(config))
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError, RuntimeError, torch.OutOfMemoryError) as e:
        raise CheckpointError(
            f"{folder}: config.json does not describe a valid {class_name} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return model


def load_component(folder: str | Path, *, allow_pickle: bool = False, expect: tuple[str, ...] | None = None):
    """Load one model component folder (config.json + weights) and return the module in eval mode.

    Args:
        folder: directory holding ``config.json`` and ``*.safetensors`` weights.
        allow_pickle: permit ``.bin`` / ``.ckpt`` weights, read with ``torch.load(weights_only=True)``.
        expect: allowed class names for this slot (e.g. the ``vae`` slot takes ``AutoencoderKL``).

    Raises:
        CheckpointError: for any of the problems listed in the module docstring.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"component folder {folder} does not exist")
    config = _read_json(folder / "config.json", "component config")
    class_name = _class_of(config, folder)
    if expect is not None and class_name not in expect:
        raise CheckpointError(f"{folder}: expected {' or '.join(expect)}, found {class_name}")
    files, is_st = _weight_files(folder, SUPPORTED_MODELS[class_name][1], allow_pickle)
    sd = _read_state_dict(files, is_st)
    model = _build(class_name, config, folder)
    if class_name == "UNet2DConditionModel":
        from pocketfusion import pruning

        pruning.apply_file(model, folder)  # units removed beyond what config.json can express
    own = model.state_dict()
    for k, v in own.items():
        if k not in sd:
            continue
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{folder}: weight {k} has shape {tuple(sd[k].shape)} but config.json implies {tuple(v.shape)}")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and not k.endswith("position_ids")]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(f"{folder}: weights do not match config.json: {'; '.join(parts)}")
    model.load_state_dict({k: sd[k] for k in own}, strict=True)
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    if len(dtypes) == 1 and (dtype := next(iter(dtypes))) != model.dtype:
        model.to(dtype)
    return model.eval()


def _load_tokenizer(folder: Path, class_name: str):
    if class_name not in SUPPORTED_TOKENIZERS:
        raise CheckpointError(f"{folder}: tokenizer {class_name!r} is not supported (supported: {', '.join(SUPPORTED_TOKENIZERS)})")
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder {folder} does not exist")
    import transformers

    try:
        tok = getattr(transformers, class_name).from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: cannot load tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if tok.model_max_length > 10_000:
        raise CheckpointError(f"{folder}: tokenizer has no model_max_length; set it in tokenizer_config.json")
    return tok


def _load_scheduler(folder: Path, class_name: str):
    import diffusers

    config = _read_json(folder / "scheduler_config.json", "scheduler config")
    cls = getattr(diffusers, class_name, None)
    if cls is None or not class_name.endswith("Scheduler"):
        raise CheckpointError(f"{folder}: unknown scheduler class {class_name!r}")
    try:
        return cls.from_config(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}: invalid scheduler config ({e})") from None


_SLOT_CLASSES = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL", "AutoencoderTiny"),
    "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
    "text_encoder_2": ("CLIPTextModel", "CLIPTextModelWithProjection"),
}


def load_model(path: str | Path | None = None, *, allow_pickle: bool = False, verify: bool = True,
               config: str | Path | None = None, prediction_type: str | None = None) -> Model:
    """Load a pipeline folder, a bare component folder or a single-file checkpoint (default: the bundled demo model).

    When the folder carries a pocketfusion ``manifest.json`` its checksums are verified first
    (``verify=False`` skips that). A single file (``.safetensors``; ``.ckpt``/``.pt``/``.pth``/``.bin`` only with
    ``allow_pickle``) is read by ``single_file.load_single_file`` with ``config`` (a diffusers config folder; default: the
    bundled full-size configs of the detected family) and ``prediction_type``; both are refused for a folder.

    Example:
        >>> m = load_model()             # the demo model
        >>> m.components["unet"].config.sample_size
        8
    """
    from pocketfusion import artifact, single_file

    root = resolve_model_path(path)
    if root.is_file() or (single_file.is_single_file(root) and not root.exists()):
        if not single_file.is_single_file(root):
            raise CheckpointError(f"{root} is a file but not a checkpoint ({', '.join(single_file.SUFFIXES)}); "
                                  "give a diffusers folder or a single-file checkpoint")
        return single_file.load_single_file(root, allow_pickle=allow_pickle, config=config, prediction_type=prediction_type)
    if config is not None or prediction_type is not None:
        raise CheckpointError(f"{root}: --config and --prediction-type apply to single-file checkpoints; a folder carries "
                              "its own configs")
    if not root.exists():
        raise CheckpointError(f"model folder {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a folder (expected a diffusers model folder)")
    manifest = artifact.load_manifest(root, verify=verify) if (root / artifact.MANIFEST).is_file() else None
    if (root / "model_index.json").is_file():
        index = _read_json(root / "model_index.json", "pipeline index")
        pipe_cls = index.get("_class_name")
        if pipe_cls not in SUPPORTED_PIPELINES:
            raise CheckpointError(f"{root}: pipeline {pipe_cls!r} is not supported (supported: {', '.join(SUPPORTED_PIPELINES)})")
        model = Model(path=root, kind="pipeline", class_name=pipe_cls, manifest=manifest)
        for name, spec in index.items():
            if name.startswith("_") or name in ("requires_safety_checker", "force_zeros_for_empty_prompt"):
                continue
            if not (isinstance(spec, list) and len(spec) == 2):
                raise CheckpointError(f"{root}/model_index.json: entry {name!r} is not [library, class]")
            lib, cls = spec
            if cls is None:
                continue
            if name in _OPTIONAL:
                logger.info("skipping optional component %s (%s)", name, cls)
                continue
            sub = root / name
            if name.startswith("tokenizer"):
                model.components[name] = _load_tokenizer(sub, cls)
            elif name == "scheduler":
                model.components[name] = _load_scheduler(sub, cls)
            elif name in _SLOT_CLASSES:
                if cls not in _SLOT_CLASSES[name]:
                    raise CheckpointError(f"{root}: {name} class {cls!r} is not supported (supported: {', '.join(_SLOT_CLASSES[name])})")
                model.components[name] = load_component(sub, allow_pickle=allow_pickle, expect=_SLOT_CLASSES[name])
            else:
                raise CheckpointError(f"{root}: unknown pipeline component {name!r} ({lib}.{cls})")
        for need in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if need not in model.components:
                raise CheckpointError(f"{root}: pipeline lacks a {need}")
        return model
    if (root / "config.json").is_file():
        comp = load_component(root, allow_pickle=allow_pickle)
        name = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "AutoencoderTiny": "vae"}.get(type(comp).__name__, "text_encoder")
        return Model(path=root, kind="component", class_name=type(comp).__name__, components={name: comp}, manifest=manifest)
    raise CheckpointError(f"{root}: neither model_index.json (pipeline) nor config.json (component) found")


def vae_scale_factor(vae) -> int:
    """How many pixels one latent pixel decodes to, per side: ``AutoencoderKL`` doubles per block after the first,
    ``AutoencoderTiny`` multiplies by its ``upsampling_scaling_factor`` per stage after the first."""
    c = vae.config
    return int(getattr(c, "upsampling_scaling_factor", 2)) ** (len(c.block_out_channels) - 1)


def latent_size(model: Model) -> int:
    """The latent side the decoder sees: the U-Net's ``sample_size`` in a pipeline, else the VAE's image size
    over its scale factor (a bare ``AutoencoderTiny`` records no image size: 64 pixels are assumed)."""
    if "unet" in model.components:
        s = model.unet.config.sample_size
        return s if isinstance(s, int) else s[0]
    vae = model.components["vae"]
    s = getattr(vae.config, "sample_size", 64)
    return (s if isinstance(s, int) else s[0]) // vae_scale_factor(vae)


def build_pipeline(model: Model):
    """A diffusers pipeline object over a loaded ``Model`` (no further disk access)."""
    import diffusers

    model.require_pipeline()
    cls = getattr(diffusers, model.class_name)
    kwargs = dict(model.components)
    if model.class_name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if model.class_name == "StableDiffusionXLPipeline":
        kwargs.update(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt(model))
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampler_of(model: Model, *, default_steps: int | None = None):
    """How a pipeline samples (``artifact.Sampler``): from its manifest when a stage recorded it,
    else from its components (a U-Net with ``time_cond_proj_dim`` takes the guidance scale as an
    input: ``guidance="embedded"``, batch 1; otherwise classifier-free guidance, batch 2)."""
    import dataclasses

    from pocketfusion import artifact

    model.require_pipeline()
    unet, vae = model.components["unet"], model.components["vae"]
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    embedded = getattr(unet.config, "time_cond_proj_dim", None) is not None
    sdxl = {}
    if unet.config.addition_embed_type == "text_time" and "text_encoder_2" in model.components:
        # SDXL at its native size: diffusers' _get_add_time_ids(original=(H, W), crop=(0, 0), target=(H, W))
        f = vae_scale_factor(vae)
        sdxl = dict(tokenizer_2="tokenizer_2" if "tokenizer_2" in model.components else "tokenizer",
                    time_ids=(h * f, w * f, 0, 0, h * f, w * f), zero_negative=force_zeros_for_empty_prompt(model))
    if model.manifest is not None and model.manifest.sampler is not None:
        recorded = model.manifest.sampler
        # a sampler recorded before the SDXL fields existed gets them from the components
        return dataclasses.replace(recorded, **sdxl) if sdxl and recorded.time_ids is None else recorded
    return artifact.Sampler(
        scheduler="scheduler", tokenizer="tokenizer", latent_shape=(1, unet.config.in_channels, h, w),
        scaling_factor=float(vae.config.scaling_factor), max_length=int(model.components["tokenizer"].model_max_length),
        guidance="embedded" if embedded else "cfg", default_steps=default_steps or 50, **sdxl,
    )


def force_zeros_for_empty_prompt(model: Model) -> bool:
    """SDXL's ``force_zeros_for_empty_prompt`` (``model_index.json``; diffusers' default, True, when not recorded):
    without a negative prompt the unconditional embeddings are zeros."""
    index = Path(model.path) / "model_index.json"
    if model.class_name != "StableDiffusionXLPipeline":
        return False
    if index.is_file():
        return bool(_read_json(index, "pipeline index").get("force_zeros_for_empty_prompt", True))
    return True
