import pytest
import torch

from pocketfusion.macs import count_macs
from pocketfusion.testing.fixtures import FULL_CONFIGS, example_inputs, tiny_unet


def test_linear_and_conv_by_hand():
    assert count_macs(torch.nn.Linear(4, 3), (torch.zeros(2, 4),))["total"] == 2 * 4 * 3
    conv = torch.nn.Conv2d(3, 5, kernel_size=3, padding=1)
    # every output element: Cin * k * k MACs; 5 x 6 x 6 outputs
    assert count_macs(conv, (torch.zeros(1, 3, 6, 6),)) == {"total": 5 * 36 * 27, "conv": 5 * 36 * 27, "linear": 0, "attention": 0}


def test_attention_matmuls_counted_by_hand():
    from diffusers.models.attention_processor import Attention

    b, s, c, heads = 2, 16, 32, 4
    attn = Attention(query_dim=c, heads=heads, dim_head=c // heads).eval()
    macs = count_macs(attn, (torch.zeros(b, s, c),))
    projections = 4 * b * s * c * c  # q, k, v, out
    scores = b * heads * s * s * (c // heads)  # Q·Kᵀ
    mix = b * heads * s * s * (c // heads)  # P·V
    assert macs["linear"] == projections
    assert macs["attention"] == scores + mix
    assert macs["total"] == projections + scores + mix


def test_meta_device_matches_real_run():
    unet = tiny_unet("sd15")
    args, kwargs = example_inputs(unet)
    real = count_macs(unet, args, kwargs)
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        meta_unet = UNet2DConditionModel(**dict(unet.config))
        margs = tuple(a.to("meta") for a in args)
        meta = count_macs(meta_unet, margs, kwargs)
    assert real == meta
    assert real["attention"] > 0


@pytest.mark.parametrize(
    "family, published_gmac_wo_attention",
    # BK-SDM (Kim et al. 2023, Table 1) counts U-Net MACs without the attention matmuls:
    # SD-v1.x 339 G, BK-SDM-Small 218 G, BK-SDM-Tiny 205 G per call at 64x64 latent.
    [("sd15", 339.0), ("bk-sdm-small", 218.0), ("bk-sdm-tiny", 205.0)],
)
def test_full_size_unet_macs_match_published(family, published_gmac_wo_attention):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**FULL_CONFIGS[family])
        x = torch.zeros(1, 4, 64, 64)
        ctx = torch.zeros(1, 77, 768)
        macs = count_macs(unet, (x, torch.tensor([999]), ctx))
    assert (macs["total"] - macs["attention"]) / 1e9 == pytest.approx(published_gmac_wo_attention, rel=0.005)
    if family == "sd15":
        # METHODS.md: ~402 GMAC per call in all, ~61 of it in the attention matmuls.
        assert macs["total"] / 1e9 == pytest.approx(402, rel=0.005)
        assert macs["attention"] / 1e9 == pytest.approx(61, rel=0.05)
