"""``pocketfusion decoder MODEL --from DONOR``: a model gets the compact VAE its original already has (no training),
only when that VAE was distilled from the model's own VAE; a pruned model keeps its pruning through it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from pocketfusion.errors import UserError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pocketfusion import pruning
    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.decoder import DecoderConfig, compress_decoder
    from pocketfusion.testing.fixtures import save_tiny_pipeline

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("adopt")
    save_tiny_pipeline(root / "sd", "sd15")
    fast = dict(channels=8, encoder_channels=8, n_pairs=8, n_heldout=4, teacher_steps=4, teacher_batch=8, batch_size=4,
                iterations=2, checkpoint_every=0)
    compress_decoder(load_model(root / "sd"), DecoderConfig(**fast), root / "donor", progress=False)
    shutil.copytree(root / "sd", root / "pruned")  # the same pipeline with a pruned U-Net
    unet = load_model(root / "sd").unet
    shutil.rmtree(root / "pruned" / "unet")
    pruning.remove(unet, ["mid_block", "up_blocks.1.resnets.0"])
    pruning.save(unet, root / "pruned" / "unet", removed=["mid_block", "up_blocks.1.resnets.0"],
                 source_config=dict(load_model(root / "sd").unet.config))
    return root


def test_adopted_vae_is_the_donors_and_the_unet_is_the_models(setup, tmp_path):
    from pocketfusion import artifact
    from pocketfusion.checkpoint import load_model

    out = tmp_path / "mobile"
    p = subprocess.run([sys.executable, "-m", "pocketfusion", "decoder", str(setup / "pruned"), "--from", str(setup / "donor"),
                        "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    m, donor, pruned = load_model(out), load_model(setup / "donor"), load_model(setup / "pruned")
    assert type(m.components["vae"]).__name__ == "AutoencoderTiny"
    for k, v in donor.components["vae"].state_dict().items():
        assert torch.equal(v, m.components["vae"].state_dict()[k])
    assert m.unet.mid_block is None and sum(x.numel() for x in m.unet.parameters()) == sum(x.numel() for x in pruned.unet.parameters())
    man = artifact.load_manifest(out)
    assert man.stage == "decoder" and man.sampler.scaling_factor == 1.0 and "adopted_from" in man.metrics


def test_adoption_refused_for_another_vae(setup, tmp_path):
    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.decoder.adopt import adopt_decoder

    other = tmp_path / "other"
    shutil.copytree(setup / "sd", other)
    vae = load_model(other).components["vae"]
    with torch.no_grad():
        next(vae.parameters()).add_(1.0)
    vae.save_pretrained(str(other / "vae"), safe_serialization=True)
    with pytest.raises(UserError, match="another VAE"):
        adopt_decoder(load_model(other), load_model(setup / "donor"), tmp_path / "x")
    with pytest.raises(UserError, match="not a compact-VAE artifact"):
        adopt_decoder(load_model(setup / "sd"), load_model(setup / "pruned"), tmp_path / "x")
    assert not (tmp_path / "x").exists()
