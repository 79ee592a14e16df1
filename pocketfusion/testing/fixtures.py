"""Architecture fixtures: the real U-Net families, scaled down, with random weights.

Each family keeps the structural traits that break exporters and compressors, with widths cut so
that a forward pass takes milliseconds:

* ``sd15``        — SD 1.5: 4 stages, conv in/out projections, 8 heads, 768-d context.
* ``sd21``        — SD 2.1: linear projections, per-block head counts, 1024-d context, upcast attention.
* ``bk-sdm-small``— BK-SDM-Small: one block per stage (up blocks keep two), no mid-block.
* ``bk-sdm-tiny`` — BK-SDM-Tiny: as small, and the innermost stage removed.
* ``sdxl``        — SDXL: 3 stages, first without attention, deeper transformers, added
                     text/time embeddings (``added_cond_kwargs``), 2048-d context.

``FULL_CONFIGS`` holds the published full-size configurations (for MAC checks and scale runs).
Helpers that export or quantize these fixtures live with their stage (``pocketfusion.export.testing``).
"""

from __future__ import annotations

from typing import Any

FAMILIES = ("sd15", "sd21", "bk-sdm-small", "bk-sdm-tiny", "sdxl")

_SD15 = dict(
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
)

FULL_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(_SD15, sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768),
    "sd21": dict(
        _SD15, sample_size=96, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True,
    ),
    "bk-sdm-small": dict(
        _SD15, sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
        layers_per_block=1, mid_block_type=None,
    ),
    "bk-sdm-tiny": dict(
        sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280), layers_per_block=1, attention_head_dim=8, cross_attention_dim=768,
        mid_block_type=None,
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ),
}

# Scaled down: widths 8-32, 8x8 latents, short contexts. Head counts keep each family's pattern.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(FULL_CONFIGS["sd15"], sample_size=8, block_out_channels=(8, 16, 16, 16), attention_head_dim=2,
                 cross_attention_dim=16, norm_num_groups=4, layers_per_block=1),
    "sd21": dict(FULL_CONFIGS["sd21"], sample_size=8, block_out_channels=(8, 16, 32, 32), attention_head_dim=(1, 2, 4, 4),
                 cross_attention_dim=24, norm_num_groups=4, layers_per_block=1),
    "bk-sdm-small": dict(FULL_CONFIGS["bk-sdm-small"], sample_size=8, block_out_channels=(8, 16, 16, 16), attention_head_dim=2,
                         cross_attention_dim=16, norm_num_groups=4),
    "bk-sdm-tiny": dict(FULL_CONFIGS["bk-sdm-tiny"], sample_size=8, block_out_channels=(8, 16, 16), attention_head_dim=2,
                        cross_attention_dim=16, norm_num_groups=4),
    "sdxl": dict(FULL_CONFIGS["sdxl"], sample_size=8, block_out_channels=(8, 16, 32), transformer_layers_per_block=(1, 1, 2),
                 attention_head_dim=(1, 2, 4), cross_attention_dim=32, norm_num_groups=4, layers_per_block=1,
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8),
}
TINY_SEQ_LEN = 8


def tiny_unet(family: str = "sd15", seed: int = 0):
    """A scaled-down ``UNet2DConditionModel`` of ``family`` with seeded random weights (eval mode)."""
    import torch
    from diffusers import UNet2DConditionModel

    if family not in TINY_CONFIGS:
        raise ValueError(f"unknown family {family!r}; available: {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_CONFIGS[family]).eval()


def example_inputs(unet, batch: int = 1, seq_len: int = TINY_SEQ_LEN, seed: int = 0) -> tuple[tuple, dict]:
    """(args, kwargs) for one U-Net call: latents of std 1, a mid-schedule timestep, a context."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    s = cfg.sample_size
    sample = torch.randn(batch, cfg.in_channels, s, s, generator=g)
    ctx = torch.randn(batch, seq_len, cfg.cross_attention_dim, generator=g)
    t = torch.full((batch,), 500, dtype=torch.long)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1),
        }
    return (sample, t, ctx), kwargs


def save_tiny_pipeline(out_dir, family: str = "sd15", seed: int = 0) -> None:
    """Write a complete tiny diffusers Stable Diffusion folder (random weights) to ``out_dir``.

    Uses the demo grammar's tokenizer, so prompts of the demo grammar tokenize sensibly. ``sdxl``
    writes a ``StableDiffusionXLPipeline`` (two text encoders, the second with a projection giving
    the pooled embedding; 16 + 16-d context, 16-d pooled).
    """
    import shutil
    from pathlib import Path

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pocketfusion.demo import configs
    from pocketfusion.demo.tokenizer import write_tokenizer

    out = Path(out_dir)
    write_tokenizer(out / "_tok")
    tok = CLIPTokenizer.from_pretrained(str(out / "_tok"))
    unet = tiny_unet(family, seed)
    if family == "sdxl":
        _save_tiny_sdxl(out, tok, unet, seed)
        shutil.rmtree(out / "_tok")
        return
    torch.manual_seed(seed + 1)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=unet.config.cross_attention_dim, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
    )).eval()
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=unet.config.sample_size * 8,
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=DDIMScheduler(**configs.SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    shutil.rmtree(out / "_tok")


def _save_tiny_sdxl(out, tok, unet, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pocketfusion.demo import configs

    common = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.eos_token_id)
    torch.manual_seed(seed + 1)
    te, te2 = CLIPTextModel(CLIPTextConfig(**common)), CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=16, **common))
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4, layers_per_block=1)
    StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet,
                              scheduler=DDIMScheduler(**configs.SCHEDULER)).save_pretrained(str(out), safe_serialization=True)
