import json
import pickle
import shutil

import pytest
import torch

from pocketfusion.checkpoint import SUPPORTED_MODELS, load_component, load_model
from pocketfusion.errors import CheckpointError, ManifestError


@pytest.fixture()
def sd(tiny_sd, tmp_path):
    """A private copy of the tiny pipeline that a test may damage."""
    dst = tmp_path / "sd"
    shutil.copytree(tiny_sd, dst)
    return dst


def test_loads_pipeline_and_matches_weights(tiny_sd):
    from safetensors.torch import load_file

    m = load_model(tiny_sd)
    assert m.kind == "pipeline" and m.class_name == "StableDiffusionPipeline"
    assert set(m.components) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    sd = load_file(str(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors"))
    for k, v in m.unet.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_loads_bare_unet_folder(tiny_sd):
    m = load_model(tiny_sd / "unet")
    assert m.kind == "component" and m.class_name == "UNet2DConditionModel"
    with pytest.raises(CheckpointError, match="needs a full pipeline"):
        m.require_pipeline()


def test_missing_folder():
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model("/nonexistent/model")


def test_folder_without_configs(tmp_path):
    with pytest.raises(CheckpointError, match="neither model_index.json"):
        load_model(tmp_path)


def test_missing_component_config(sd):
    (sd / "unet" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"unet/config.json is missing"):
        load_model(sd)


def test_malformed_config(sd):
    (sd / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL", ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(sd)


def test_invalid_config_values(sd):
    cfg = json.loads((sd / "unet" / "config.json").read_text())
    cfg["down_block_types"] = ["NoSuchBlock2D"] * 4
    (sd / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not describe a valid UNet2DConditionModel"):
        load_model(sd)


def test_truncated_safetensors(sd):
    f = sd / "unet" / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors"):
        load_model(sd)


def test_corrupt_safetensors_header(sd):
    f = sd / "text_encoder" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff" * 8  # garbage inside the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors"):
        load_model(sd)


def test_shapes_that_contradict_config(sd):
    cfg = json.loads((sd / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [16, 16, 16, 16]
    (sd / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"has shape \(8, 4, 3, 3\) but config.json implies \(16, 4, 3, 3\)"):
        load_model(sd)


def test_missing_weights(sd):
    from safetensors.torch import load_file, save_file

    f = sd / "vae" / "diffusion_pytorch_model.safetensors"
    w = load_file(str(f))
    w.pop("decoder.conv_out.bias")
    save_file(w, str(f))
    with pytest.raises(CheckpointError, match="1 missing \\(e.g. decoder.conv_out.bias\\)"):
        load_model(sd)


def test_unsupported_architecture_names_supported(sd):
    cfg = json.loads((sd / "unet" / "config.json").read_text())
    cfg["_class_name"] = "SD3Transformer2DModel"
    (sd / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_model(sd / "unet")
    msg = str(e.value)
    assert "SD3Transformer2DModel" in msg and all(name in msg for name in SUPPORTED_MODELS)


def test_unsupported_pipeline(sd):
    idx = json.loads((sd / "model_index.json").read_text())
    idx["_class_name"] = "FluxPipeline"
    (sd / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="'FluxPipeline' is not supported .*StableDiffusionPipeline"):
        load_model(sd)


def _to_bin(folder, stem):
    from safetensors.torch import load_file

    st = folder / f"{stem}.safetensors"
    torch.save(load_file(str(st)), str(folder / f"{stem}.bin"))
    st.unlink()


def test_pickle_refused_by_default(sd):
    _to_bin(sd / "unet", "diffusion_pytorch_model")
    with pytest.raises(CheckpointError, match="only pickled weights .*--allow-pickle"):
        load_model(sd)


def test_pickle_allowed_loads_same_weights(sd, tiny_sd):
    _to_bin(sd / "unet", "diffusion_pytorch_model")
    m = load_model(sd, allow_pickle=True)
    ref = load_model(tiny_sd)
    for (k, a), (_, b) in zip(m.unet.state_dict().items(), ref.unet.state_dict().items()):
        assert torch.equal(a, b), k


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickle_code_never_runs_even_when_allowed(sd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (sd / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with open(sd / "unet" / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"conv_in.weight": _Evil()}, f)
    with pytest.raises(CheckpointError, match="cannot be read with weights_only=True"):
        load_model(sd, allow_pickle=True)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_ckpt_file_refused(tmp_path):
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"\x80\x04junk")
    with pytest.raises(CheckpointError, match="pickled checkpoint refused"):
        load_model(p)


def test_manifest_checksums_verified_on_load(sd):
    from pocketfusion import artifact

    artifact.write_manifest(sd, stage="source", settings={}, source=None)
    load_model(sd)
    f = sd / "vae" / "config.json"
    f.write_text(f.read_text().replace('"latent_channels": 4', '"latent_channels":  4'))
    with pytest.raises(ManifestError, match=r"sd: vae/config.json (has \d+ bytes|checksum mismatch)"):
        load_model(sd)


def test_load_component_slot_check(tiny_sd):
    with pytest.raises(CheckpointError, match="expected AutoencoderKL, found UNet2DConditionModel"):
        load_component(tiny_sd / "unet", expect=("AutoencoderKL",))
