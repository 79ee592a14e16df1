import pytest
import torch

from pocketfusion.testing.fixtures import FAMILIES, FULL_CONFIGS, example_inputs, tiny_unet


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_runs_and_is_deterministic(family):
    unet = tiny_unet(family, seed=3)
    args, kwargs = example_inputs(unet, batch=2)
    with torch.no_grad():
        out = unet(*args, **kwargs).sample
    assert out.shape == args[0].shape and torch.isfinite(out).all()
    again = tiny_unet(family, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), again.state_dict().values()))
    assert sum(p.numel() for p in unet.parameters()) < 500_000


def test_family_traits():
    sd21 = tiny_unet("sd21")
    assert sd21.config.use_linear_projection and sd21.config.upcast_attention
    assert isinstance(sd21.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    heads = [blk.attentions[0].transformer_blocks[0].attn1.heads for blk in sd21.down_blocks if hasattr(blk, "attentions")]
    assert heads == [1, 2, 4]  # per-block head counts
    assert isinstance(tiny_unet("sd15").down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)
    small, tiny = tiny_unet("bk-sdm-small"), tiny_unet("bk-sdm-tiny")
    assert small.mid_block is None and tiny.mid_block is None
    assert len(small.down_blocks) == 4 and len(tiny.down_blocks) == 3
    assert all(len(b.resnets) == 1 for b in small.down_blocks)
    xl = tiny_unet("sdxl")
    assert xl.config.addition_embed_type == "text_time" and xl.add_embedding is not None
    assert not hasattr(xl.down_blocks[0], "attentions")
    assert len(xl.down_blocks[2].attentions[0].transformer_blocks) == 2


def test_sdxl_needs_added_conditions():
    xl = tiny_unet("sdxl")
    args, _ = example_inputs(xl)
    with pytest.raises((TypeError, ValueError, KeyError)):
        xl(*args)


@pytest.mark.parametrize(
    "family, params_m",
    [("sd15", 859.52), ("sd21", 865.91), ("bk-sdm-small", 482.35), ("bk-sdm-tiny", 323.38), ("sdxl", 2567.46)],
)
def test_full_configs_match_published_sizes(family, params_m):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**FULL_CONFIGS[family])
    assert sum(p.numel() for p in unet.parameters()) / 1e6 == pytest.approx(params_m, abs=0.01)
