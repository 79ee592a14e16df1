"""Single-file Stable Diffusion checkpoints (the original / A1111 key layout), loaded offline.

A single file holds every component under the original Stable Diffusion prefixes: the U-Net under
``model.diffusion_model.``, the VAE under ``first_stage_model.``, the text encoder(s) under
``cond_stage_model.transformer.`` (SD 1.x, OpenAI CLIP), ``cond_stage_model.model.`` (SD 2.x, OpenCLIP) or
``conditioner.embedders.0.transformer.`` + ``conditioner.embedders.1.model.`` (SDXL base). The keys are
converted with diffusers' own functions (``diffusers.loaders.single_file_utils``); the architecture comes
from a diffusers config folder, by default the full-size one bundled for the detected family
(``pocketfusion/configs/sd15``, ``sd21``, ``sdxl``: component ``config.json`` files, scheduler, tokenizer),
or from ``config=DIR`` (any diffusers folder: only its JSON files are read) for a file of other sizes.
The CLIP tokenizers are built from the bundled ``pocketfusion/configs/clip/vocab.json`` + ``merges.txt``,
derived from CLIP's BPE file as CLIP's own tokenizer does (``clip_bpe_files``). Nothing is downloaded.

Every weight must be used and every parameter set, shapes as the config says; otherwise ``CheckpointError``
says which and suggests ``--config``.

Prediction type (the scheduler's ``prediction_type``): ``prediction_type=`` when given; else a hint in the
file (a ``v_pred`` key, as ComfyUI marks v-prediction models, or the ``modelspec.prediction_type`` /
``modelspec.architecture`` metadata of Stability's ModelSpec); else the config's (bundled SD 2.x:
``v_prediction`` at 768 px, as diffusers assumes for SD 2.x single files; SD 1.x and SDXL: ``epsilon``).
A bundled SD 2.x config read as ``epsilon`` is the 512-px base model (latent 64).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

from pocketfusion.errors import CheckpointError

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent / "configs"
CLIP_VOCAB, CLIP_MERGES = CONFIGS / "clip" / "vocab.json", CONFIGS / "clip" / "merges.txt"
FAMILIES = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}  # family -> bundled config folder
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL base"}
PREDICTION_TYPES = ("epsilon", "v_prediction")
SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PICKLED = (".ckpt", ".pt", ".pth", ".bin")

_UNET = "model.diffusion_model."
_VAE = "first_stage_model."
_PREFIXES = {  # family -> text encoder slot -> key prefix in the file
    "sd1": {"text_encoder": "cond_stage_model.transformer."},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."},
}


def is_single_file(path: str | Path) -> bool:
    """Whether ``path`` names a weights file (not a folder) that ``load_single_file`` may read."""
    p = Path(path)
    return p.suffix.lower() in SUFFIXES and not p.is_dir()


# ----------------------------------------------------------------------------------------------- reading


def read_file(path: str | Path, *, allow_pickle: bool = False) -> tuple[dict, dict]:
    """(state dict, safetensors metadata) of a single-file checkpoint; pickles only with ``allow_pickle`` and then
    through ``torch.load(weights_only=True)``. A Lightning-style ``{"state_dict": ...}`` is unwrapped."""
    from pocketfusion.checkpoint import _read_state_dict

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    pickled = path.suffix.lower() in PICKLED
    if pickled and not allow_pickle:
        raise CheckpointError(f"{path}: pickled checkpoint refused (pickle can run code when loaded); pass --allow-pickle to read "
                              "it with torch.load(weights_only=True), or convert it to .safetensors")
    metadata: dict = {}
    if not pickled:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                metadata = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None
    sd = _read_state_dict([path], not pickled)
    if isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    import torch

    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, metadata


def detect_family(sd: dict, where: str | Path = "checkpoint") -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` from the file's key prefixes (and the U-Net's input channels)."""
    keys = sd.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if not has(_UNET):
        hint = (" (it looks like one diffusers component's weights: give its diffusers folder)"
                if any(k.startswith(("down_blocks.", "text_model.", "encoder.down_blocks.")) for k in keys) else "")
        raise CheckpointError(f"{where}: not an original Stable Diffusion checkpoint: no {_UNET}* keys{hint}")
    if has("conditioner.embedders.1.model."):
        family = "sdxl"
    elif has("conditioner.embedders.0.model."):
        raise CheckpointError(f"{where}: an SDXL refiner checkpoint; supported single files: SD 1.x, SD 2.x, SDXL base")
    elif has("cond_stage_model.model."):
        family = "sd2"
    elif has("cond_stage_model.transformer."):
        family = "sd1"
    else:
        raise CheckpointError(f"{where}: holds a U-Net but no text encoder (cond_stage_model.* / conditioner.embedders.*); "
                              "supported single files are whole SD 1.x, SD 2.x and SDXL base checkpoints")
    if not has(_VAE):
        raise CheckpointError(f"{where}: holds no VAE ({_VAE}* keys); supported single files are whole checkpoints")
    conv_in = sd.get(_UNET + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] != 4:
        raise CheckpointError(f"{where}: U-Net takes {conv_in.shape[1]} input channels (an inpainting or instruct-pix2pix "
                              "model); only text-to-image checkpoints (4 channels) are supported")
    return family


def detect_prediction_type(sd: dict, metadata: dict) -> tuple[str | None, str]:
    """(prediction type or None, why) from hints in the file; None when the weights cannot tell."""
    if "v_pred" in sd:
        return "v_prediction", "the file has a v_pred key"
    pt = str(metadata.get("modelspec.prediction_type", "")).lower()
    if pt in ("v", "v_prediction", "v-prediction"):
        return "v_prediction", f"metadata modelspec.prediction_type={pt!r}"
    if pt in ("epsilon", "eps"):
        return "epsilon", f"metadata modelspec.prediction_type={pt!r}"
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    if arch.endswith("-v") or "768-v" in arch:
        return "v_prediction", f"metadata modelspec.architecture={arch!r}"
    return None, "no hint in the file"


# ----------------------------------------------------------------------------------------------- conversion


def to_diffusers(sd: dict, family: str, configs: dict[str, dict]) -> dict[str, dict]:
    """The file's weights per diffusers component (``unet``, ``vae``, ``text_encoder``[, ``text_encoder_2``]), keys
    converted by diffusers' single-file functions. ``configs`` are the components' config dicts."""
    from diffusers.loaders import single_file_utils as sfu

    out = {
        "unet": sfu.convert_ldm_unet_checkpoint(sd, dict(configs["unet"])),
        "vae": sfu.convert_ldm_vae_checkpoint(sd, dict(configs["vae"])),
    }
    for slot, prefix in _PREFIXES[family].items():
        cfg = configs[slot]
        if prefix.endswith(".transformer."):  # OpenAI CLIP: transformers' own names under a prefix
            te = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if te and not any(k.startswith("text_model.") for k in te):  # files from transformers < 4.x: no text_model.
                te = {"text_model." + k: v for k, v in te.items()}
        else:  # OpenCLIP: fused qkv, resblocks; the split width comes from text_projection or the config's hidden size
            stub = SimpleNamespace(config=SimpleNamespace(hidden_size=cfg["hidden_size"]))
            te = sfu.convert_open_clip_checkpoint(stub, sd, prefix=prefix)
            n = cfg["num_hidden_layers"]
            # SD 2.x's OpenCLIP-H has one layer more than diffusers' text encoder (it conditions on the penultimate
            # layer); diffusers drops layer 23 by name: drop the one extra layer of any width the same way.
            extra = f"text_model.encoder.layers.{n}."
            if family == "sd2" and any(k.startswith(extra) for k in te) and not any(
                    k.startswith(f"text_model.encoder.layers.{n + 1}.") for k in te):
                te = {k: v for k, v in te.items() if not k.startswith(extra)}
            if family == "sd2":
                te.pop("text_projection.weight", None)  # CLIPTextModel has no projection
        out[slot] = te
    return out


def to_original(components: dict[str, dict], family: str) -> dict:
    """The reverse of ``to_diffusers``: diffusers component state dicts -> one original-layout state dict.

    Args:
        components: ``{"unet": sd, "vae": sd, "text_encoder": sd[, "text_encoder_2": sd]}`` (diffusers key names).
        family: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
    Returns:
        The state dict a single-file checkpoint of that family holds (tensors shared, not copied, where the layout
        is the same; the VAE's attention projections become 1x1 convolutions, OpenCLIP's q/k/v are fused).
    """
    out = {_UNET + k: v for k, v in _unet_to_original(components["unet"]).items()}
    out.update({_VAE + k: v for k, v in _vae_to_original(components["vae"]).items()})
    for slot, prefix in _PREFIXES[family].items():
        te = components[slot]
        if prefix.endswith(".transformer."):
            out.update({prefix + k: v for k, v in te.items() if not k.endswith("position_ids")})
        else:
            out.update({prefix + k: v for k, v in _openclip_to_original(te).items()})
    return out


def _unet_blocks(sd: dict, kind: str) -> int:
    return len({int(k.split(".")[1]) for k in sd if k.startswith(kind + ".")})


def _unet_to_original(sd: dict) -> dict:
    resnet = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
              ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
           "conv_norm_out": "out.0", "conv_out": "out.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "class_embedding.linear_1": "label_emb.0.0",
           "class_embedding.linear_2": "label_emb.0.2"}
    n_layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("down_blocks.") and ".resnets." in k)
    prefixes: dict[str, str] = {}  # diffusers prefix -> original prefix
    for i in range(_unet_blocks(sd, "down_blocks")):
        for j in range(n_layers):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(n_layers + 1) * i + j + 1}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(n_layers + 1) * i + j + 1}.1."
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(n_layers + 1) * (i + 1)}.0.op."
    for i in range(_unet_blocks(sd, "up_blocks")):
        has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd)
        for j in range(n_layers + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(n_layers + 1) * i + j}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(n_layers + 1) * i + j}.1."
        prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(n_layers + 1) * i + n_layers}.{2 if has_attn else 1}."
    prefixes["mid_block.resnets.0."] = "middle_block.0."
    prefixes["mid_block.attentions.0."] = "middle_block.1."
    prefixes["mid_block.resnets.1."] = "middle_block.2."
    out = {}
    for k, v in sd.items():
        stem, _, leaf = k.rpartition(".")
        if stem in top:
            out[f"{top[stem]}.{leaf}"] = v
            continue
        pre = next((p for p in prefixes if k.startswith(p)), None)
        if pre is None:
            raise CheckpointError(f"U-Net weight {k} has no place in the original layout")
        rest = k[len(pre):]
        if ".resnets." in pre:
            for a, b in resnet:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
                    break
        out[prefixes[pre] + rest] = v
    return out


def _vae_to_original(sd: dict) -> dict:
    n = _unet_blocks({k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}, "down_blocks")
    prefixes = {"encoder.mid_block.attentions.0.": "encoder.mid.attn_1.", "decoder.mid_block.attentions.0.": "decoder.mid.attn_1."}
    for part in ("encoder", "decoder"):
        for i in range(2):
            prefixes[f"{part}.mid_block.resnets.{i}."] = f"{part}.mid.block_{i + 1}."
    for i in range(n):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{n - 1 - i}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    attn = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))
    out = {}
    for k, v in sd.items():
        pre = next((p for p in prefixes if k.startswith(p)), None)
        if pre is None:
            out[k.replace("conv_norm_out.", "norm_out.")] = v  # conv_in, conv_out, quant_conv, post_quant_conv
            continue
        rest = k[len(pre):].replace("conv_shortcut.", "nin_shortcut.")
        if "attentions" in pre:
            for a, b in attn:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            if v.ndim == 2:  # the original's attention projections are 1x1 convolutions
                v = v[:, :, None, None]
        out[prefixes[pre] + rest] = v
    return out


def _openclip_to_original(sd: dict) -> dict:
    import torch

    top = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    names = (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
             ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))
    out, qkv = {}, {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if k in top:
            out[top[k]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif k.startswith("text_model.encoder.layers."):
            i, rest = k.split(".")[3], ".".join(k.split(".")[4:])
            base = f"transformer.resblocks.{i}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                which, leaf = rest.split(".")[1][0], rest.split(".")[2]
                qkv.setdefault((base, leaf), {})[which] = v
                continue
            for a, b in names:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            out[base + rest] = v
        else:
            raise CheckpointError(f"text encoder weight {k} has no place in the OpenCLIP layout")
    for (base, leaf), parts in qkv.items():
        out[f"{base}attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ----------------------------------------------------------------------------------------------- loading


def clip_tokenizer(config: dict):
    """A ``CLIPTokenizer`` over the bundled CLIP vocabulary with a tokenizer_config's special tokens and length."""
    from transformers import CLIPTokenizer

    keys = ("bos_token", "eos_token", "unk_token", "pad_token", "model_max_length", "errors")
    return CLIPTokenizer(str(CLIP_VOCAB), str(CLIP_MERGES), **{k: config[k] for k in keys if k in config})


def clip_bpe_files(bpe_gz: str | Path, out_dir: str | Path) -> None:
    """Write ``vocab.json`` + ``merges.txt`` (transformers' ``CLIPTokenizer`` files) from CLIP's BPE merge list
    (``bpe_simple_vocab_16e6.txt.gz``, shipped by open_clip_torch and OpenAI's CLIP), building the vocabulary as CLIP's
    ``SimpleTokenizer`` does: 256 byte symbols, the same with ``</w>``, one token per merge, then the two special
    tokens. This is how the bundled ``pocketfusion/configs/clip/`` files were made."""
    import gzip

    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def _read_configs(folder: Path, family: str) -> tuple[str, dict[str, dict]]:
    """(pipeline class, {component: config dict}) of a diffusers config folder; tokenizers as their tokenizer_config."""
    from pocketfusion.checkpoint import _read_json

    index = _read_json(folder / "model_index.json", "pipeline index of the config folder")
    want = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    if index.get("_class_name") != want:
        raise CheckpointError(f"{folder}: config folder describes a {index.get('_class_name')}; this {FAMILY_NAMES[family]} "
                              f"checkpoint needs a {want} config folder")
    names = ["unet", "vae", *_PREFIXES[family], "scheduler", "tokenizer"] + (["tokenizer_2"] if family == "sdxl" else [])
    configs = {}
    for name in names:
        if name == "scheduler":
            configs[name] = _read_json(folder / name / "scheduler_config.json", "scheduler config")
        elif name.startswith("tokenizer"):
            configs[name] = _read_json(folder / name / "tokenizer_config.json", "tokenizer config")
        else:
            configs[name] = _read_json(folder / name / "config.json", f"{name} config")
    return want, configs


def _tokenizer(folder: Path, config: dict):
    """The folder's own tokenizer when it ships vocabulary files (a diffusers model's), else the bundled CLIP one."""
    from pocketfusion.checkpoint import _load_tokenizer

    if (folder / "vocab.json").is_file():
        return _load_tokenizer(folder, config.get("tokenizer_class", "CLIPTokenizer"))
    return clip_tokenizer(config)


def _check(own: dict, sd: dict, where: str, name: str, config_dir: Path, bundled: bool) -> None:
    """Every parameter of ``own`` (a state dict, meta tensors will do) set by ``sd``, every weight used, shapes equal."""
    fix = ("; pass --config DIR, a diffusers folder whose config.json files describe this checkpoint's architecture"
           if bundled else f"; {config_dir} does not describe this checkpoint")
    for k, v in own.items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: {name} weight {k} has shape {tuple(sd[k].shape)} but the config "
                                  f"({config_dir / name}) implies {tuple(v.shape)}{fix}")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and not k.endswith("position_ids")]
    if missing or unexpected:
        parts = ([f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []) + (
            [f"{len(unexpected)} unused (e.g. {unexpected[0]})"] if unexpected else [])
        raise CheckpointError(f"{where}: {name} weights do not match the config ({config_dir / name}): {'; '.join(parts)}{fix}")


def _component(class_name: str, cfg: dict, sd: dict, where: str, name: str, config_dir: Path, bundled: bool):
    """Build the module (on the meta device first, to check the weights against it cheaply; then for real without
    random initialisation, which every weight overwrites) and load ``sd`` into it strictly."""
    import torch
    from transformers.modeling_utils import no_init_weights

    from pocketfusion.checkpoint import _build

    with torch.device("meta"):
        meta = _build(class_name, cfg, config_dir / name)
    _check(meta.state_dict(), sd, where, name, config_dir, bundled)
    del meta
    with no_init_weights():
        module = _build(class_name, cfg, config_dir / name)
    own = module.state_dict()
    module.load_state_dict({k: sd[k] for k in own}, strict=True)
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    if len(dtypes) == 1 and (dtype := next(iter(dtypes))) != module.dtype:
        module.to(dtype)
    return module.eval()


def load_single_file(path: str | Path, *, allow_pickle: bool = False, config: str | Path | None = None,
                     prediction_type: str | None = None):
    """Load an original-layout SD 1.x / SD 2.x / SDXL base checkpoint file into a ``checkpoint.Model``.

    Args:
        path: a ``.safetensors`` file (``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` with ``allow_pickle``).
        allow_pickle: read pickled files with ``torch.load(weights_only=True)``.
        config: a diffusers folder whose JSON files (model_index, component config.json, scheduler, tokenizer) describe
            the checkpoint's architecture; default: the bundled full-size configs of the detected family.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``: overrides what the file and config say.

    Returns:
        A pipeline ``Model`` whose ``path`` is the file and whose ``origin`` records family, prediction type and why.

    Raises:
        CheckpointError: unreadable or refused file, an unsupported kind of checkpoint, weights the config does not fit.

    Example:
        >>> m = load_single_file("v1-5-pruned-emaonly.safetensors")
        >>> m.origin["family"], m.components["scheduler"].config.prediction_type
        ('sd1', 'epsilon')
    """
    import diffusers

    from pocketfusion.checkpoint import _SLOT_CLASSES, Model

    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise CheckpointError(f"prediction type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    sd, metadata = read_file(path, allow_pickle=allow_pickle)
    family = detect_family(sd, path)
    bundled = config is None
    config_dir = CONFIGS / FAMILIES[family] if bundled else Path(config)
    if not config_dir.is_dir():
        raise CheckpointError(f"config folder {config_dir} does not exist")
    pipe_cls, configs = _read_configs(config_dir, family)
    hinted, why = detect_prediction_type(sd, metadata)
    if prediction_type is not None:
        ptype, why = prediction_type, "--prediction-type"
    elif hinted is not None:
        ptype = hinted
    else:
        ptype = configs["scheduler"].get("prediction_type", "epsilon")
        why = f"the config's default ({why})"
    configs["scheduler"]["prediction_type"] = ptype
    if bundled and family == "sd2" and ptype == "epsilon":  # SD 2.x base: 512 px
        configs["unet"]["sample_size"], configs["vae"]["sample_size"] = 64, 512
    weights = to_diffusers(sd, family, configs)
    del sd
    components = {}
    for name, comp_sd in weights.items():
        cfg = configs[name]
        class_name = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
        if class_name not in _SLOT_CLASSES[name]:
            raise CheckpointError(f"{config_dir / name}: expected {' or '.join(_SLOT_CLASSES[name])}, found {class_name}")
        components[name] = _component(class_name, cfg, comp_sd, str(path), name, config_dir, bundled)
    sched_cls = configs["scheduler"].get("_class_name", "")
    cls = getattr(diffusers, sched_cls, None)
    if cls is None or not sched_cls.endswith("Scheduler"):
        raise CheckpointError(f"{config_dir / 'scheduler'}: unknown scheduler class {sched_cls!r}")
    components["scheduler"] = cls.from_config(configs["scheduler"])
    for name in ("tokenizer", "tokenizer_2"):
        if name in configs:
            components[name] = _tokenizer(config_dir / name, configs[name])
    origin = {"file": str(path), "family": family, "prediction_type": ptype, "prediction_type_from": why,
              "config": "bundled:" + FAMILIES[family] if bundled else str(config_dir)}
    logger.info("loaded %s as %s (%s, %s)", path, FAMILY_NAMES[family], ptype, why)
    return Model(path=path, kind="pipeline", class_name=pipe_cls, components=components, origin=origin)


def write_diffusers(model, out: str | Path):
    """Write a single-file ``model`` (``load_single_file``) as a diffusers folder with a manifest (stage ``convert``,
    the file as source; settings: family, prediction type and the config used) and return its manifest."""
    from pocketfusion import artifact
    from pocketfusion.checkpoint import build_pipeline

    out = Path(out)
    with artifact.staged_dir(out) as tmp:
        build_pipeline(model).save_pretrained(str(tmp), safe_serialization=True)
        manifest = artifact.write_manifest(tmp, stage="convert", settings=dict(model.origin or {}),
                                           source=artifact.source_ref(model.path))
    return manifest
