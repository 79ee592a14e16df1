"""Single-file checkpoints (original SD / A1111 layout): written from the tiny SD 1.5 / SD 2.1 / SDXL fixtures with
``single_file.to_original`` and loaded back through ``load_model`` bit for bit; offline (no socket may connect)."""

from __future__ import annotations

import json
import socket
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pocketfusion import single_file
from pocketfusion.checkpoint import load_model
from pocketfusion.errors import CheckpointError
from pocketfusion.testing.fixtures import save_tiny_pipeline

FAMILY = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}
WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access during single-file loading")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", params=["sd15", "sd21", "sdxl"])
def tiny(request, tmp_path_factory):
    """(diffusers folder, single file, family, loaded diffusers Model) for one tiny family."""
    root = tmp_path_factory.mktemp(request.param)
    save_tiny_pipeline(root / "diffusers", request.param)
    ref = load_model(root / "diffusers")
    family = FAMILY[request.param]
    sd = single_file.to_original({n: ref.components[n].state_dict() for n in WEIGHTED if n in ref.components}, family)
    if family == "sd2":  # as in a real SD 2.x file: OpenCLIP's projection and its last layer, both unused by diffusers
        te = ref.components["text_encoder"]
        width, n = te.config.hidden_size, te.config.num_hidden_layers
        sd["cond_stage_model.model.text_projection"] = torch.randn(width, width)
        for k in [k for k in sd if k.startswith(f"cond_stage_model.model.transformer.resblocks.{n - 1}.")]:
            sd[k.replace(f"resblocks.{n - 1}.", f"resblocks.{n}.")] = torch.randn_like(sd[k])
    sd = {k: v.contiguous() for k, v in sd.items()}
    save_file(sd, str(root / "model.safetensors"))
    return root / "diffusers", root / "model.safetensors", family, ref


def _assert_same(model, ref):
    for name in WEIGHTED:
        if name not in ref.components:
            assert name not in model.components
            continue
        a, b = model.components[name].state_dict(), ref.components[name].state_dict()
        assert a.keys() == b.keys(), name
        for k in b:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{name}.{k} differs"
    assert type(model.components["scheduler"]) is type(ref.components["scheduler"])
    assert model.components["tokenizer"]("a red cube").input_ids == ref.components["tokenizer"]("a red cube").input_ids


def test_round_trip_bit_for_bit(tiny):
    diffusers_dir, path, family, ref = tiny
    model = load_model(path, config=diffusers_dir)
    assert model.kind == "pipeline" and model.class_name == ref.class_name and model.path == path
    assert model.origin["family"] == family and model.origin["config"] == str(diffusers_dir)
    _assert_same(model, ref)


def test_tiny_file_without_config_names_the_fix(tiny):
    _, path, _, _ = tiny
    with pytest.raises(CheckpointError, match="--config DIR"):
        load_model(path)


def test_stage_command_writes_a_diffusers_folder(tiny, tmp_path):
    from pocketfusion import artifact
    from pocketfusion.cli_common import _load

    diffusers_dir, path, family, ref = tiny
    args = Namespace(model=str(path), allow_pickle=False, config=str(diffusers_dir), prediction_type="v_prediction",
                     lora=None, command="export", output=str(tmp_path / "out"))
    model = _load(args)
    assert model.path == tmp_path / "out-diffusers" and model.origin is None
    m = artifact.load_manifest(model.path)
    assert m.stage == "convert" and m.source.sha256 == artifact.content_hash(path)
    assert m.settings["family"] == family and m.settings["prediction_type"] == "v_prediction"
    assert model.components["scheduler"].config.prediction_type == "v_prediction"
    _assert_same(model, ref)


def test_ckpt_needs_allow_pickle(tmp_path):
    save_tiny_pipeline(tmp_path / "d", "sd15")
    ref = load_model(tmp_path / "d")
    sd = single_file.to_original({n: ref.components[n].state_dict() for n in ("unet", "vae", "text_encoder")}, "sd1")
    torch.save({"global_step": 1, "state_dict": sd}, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match="pickled checkpoint refused"):
        load_model(tmp_path / "m.ckpt", config=tmp_path / "d")
    _assert_same(load_model(tmp_path / "m.ckpt", allow_pickle=True, config=tmp_path / "d"), ref)


def test_prediction_type_hints(tmp_path):
    t = torch.zeros(1)
    assert single_file.detect_prediction_type({"v_pred": t}, {}) == ("v_prediction", "the file has a v_pred key")
    assert single_file.detect_prediction_type({}, {"modelspec.prediction_type": "v"})[0] == "v_prediction"
    assert single_file.detect_prediction_type({}, {"modelspec.prediction_type": "epsilon"})[0] == "epsilon"
    assert single_file.detect_prediction_type({}, {"modelspec.architecture": "stable-diffusion-v2-768-v"})[0] == "v_prediction"
    assert single_file.detect_prediction_type({}, {})[0] is None


def test_prediction_type_from_file_and_override(tmp_path):
    save_tiny_pipeline(tmp_path / "d", "sd21")
    ref = load_model(tmp_path / "d")
    sd = single_file.to_original({n: ref.components[n].state_dict() for n in ("unet", "vae", "text_encoder")}, "sd2")
    save_file({**sd, "v_pred": torch.zeros(0)}, str(tmp_path / "v.safetensors"))
    m = load_model(tmp_path / "v.safetensors", config=tmp_path / "d")
    assert m.components["scheduler"].config.prediction_type == "v_prediction"
    assert m.origin["prediction_type_from"] == "the file has a v_pred key"
    m = load_model(tmp_path / "v.safetensors", config=tmp_path / "d", prediction_type="epsilon")
    assert m.components["scheduler"].config.prediction_type == "epsilon"
    with pytest.raises(CheckpointError, match="apply to single-file"):
        load_model(tmp_path / "d", prediction_type="epsilon")


def test_unsupported_files_say_what(tmp_path):
    t = torch.zeros(1)
    cases = {
        "unet_only": ({"model.diffusion_model.out.2.bias": t}, "no text encoder"),
        "diffusers": ({"down_blocks.0.resnets.0.conv1.bias": t}, "give its diffusers folder"),
        "refiner": ({"model.diffusion_model.out.2.bias": t, "conditioner.embedders.0.model.ln_final.bias": t}, "refiner"),
        "inpaint": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3),
                     "cond_stage_model.transformer.text_model.final_layer_norm.bias": t, "first_stage_model.conv_in.bias": t},
                    "9 input channels"),
    }
    for name, (sd, msg) in cases.items():
        save_file({k: v.clone() for k, v in sd.items()}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(CheckpointError, match=msg):
            load_model(tmp_path / f"{name}.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path / "bad.safetensors")


# Known CLIP token ids (OpenAI CLIP / open_clip's SimpleTokenizer, context not padded).
KNOWN = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "An astronaut riding a horse, 4k photo! It's über-detailed.":
        [49406, 550, 18376, 6765, 320, 4558, 267, 275, 330, 1125, 256, 585, 568, 6522, 1516, 268, 12609, 269, 49407],
}


def _bundled_tokenizer(name: str, folder: str = "tokenizer"):
    return single_file.clip_tokenizer(json.loads((single_file.CONFIGS / name / folder / "tokenizer_config.json").read_text()))


def test_bundled_clip_tokenizer_tokenizes_like_clip():
    tok = _bundled_tokenizer("sd15")
    assert len(tok) == 49408 and tok.pad_token_id == 49407 and tok.model_max_length == 77
    for text, ids in KNOWN.items():
        assert tok(text).input_ids == ids, text
    assert tok("a photo of a cat", padding="max_length").input_ids[-1] == 49407
    # SD 2.x's (and SDXL's second) tokenizer pads with "!" (id 0), and so, as in diffusers, a "!" in a prompt is id 0 too
    sd2 = _bundled_tokenizer("sd21")
    assert sd2.pad_token_id == 0 and sd2("a photo of a cat", padding="max_length").input_ids[-1] == 0
    assert sd2("a photo of a cat").input_ids == KNOWN["a photo of a cat"]
    assert _bundled_tokenizer("sdxl", "tokenizer_2").pad_token_id == 0


def test_bundled_vocabulary_is_derived_from_clip_bpe(tmp_path):
    """When open_clip_torch is installed: its BPE file gives the bundled files, and its SimpleTokenizer the same ids."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch is not installed (the known ids above still hold)")
    root = Path(spec.submodule_search_locations[0])
    single_file.clip_bpe_files(root / "bpe_simple_vocab_16e6.txt.gz", tmp_path)
    assert (tmp_path / "vocab.json").read_bytes() == single_file.CLIP_VOCAB.read_bytes()
    assert (tmp_path / "merges.txt").read_bytes() == single_file.CLIP_MERGES.read_bytes()
    # open_clip/__init__ imports torchvision: load its tokenizer module alone (ftfy stubbed for plain text if absent)
    import types

    if importlib.util.find_spec("ftfy") is None:
        sys.modules.setdefault("ftfy", types.SimpleNamespace(fix_text=lambda s: s))
    mspec = importlib.util.spec_from_file_location("_open_clip_tokenizer", root / "tokenizer.py")
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    ref = mod.SimpleTokenizer()
    tok = _bundled_tokenizer("sd15")
    for text in [*KNOWN, "a painting of a fox in the snow, trending on artstation", "Two dogs & 3 cats (oil on canvas)"]:
        assert tok(text).input_ids == [ref.sot_token_id, *ref.encode(text), ref.eot_token_id], text


@pytest.mark.parametrize("name,params", [
    ("sd15", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
    ("sd21", {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}),
    ("sdxl", {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}),
])
def test_bundled_configs_are_the_published_architectures(name, params):
    from pocketfusion.checkpoint import _build

    folder = single_file.CONFIGS / name
    for comp, n in params.items():
        cfg = json.loads((folder / comp / "config.json").read_text())
        with torch.device("meta"):
            module = _build(cfg.get("_class_name") or cfg["architectures"][0], cfg, folder / comp)
        assert sum(p.numel() for p in module.parameters()) == n, comp


def test_cli_info_on_a_single_file_offline(tiny, capsys):
    from pocketfusion.cli import main

    diffusers_dir, path, family, _ = tiny
    assert main(["info", str(path), "--config", str(diffusers_dir), "--json"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    info = json.loads(out[out.index("{"):])
    assert info["single_file"]["family"] == family and info["path"] == str(path)
