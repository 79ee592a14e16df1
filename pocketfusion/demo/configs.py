"""Architecture of the demo model: Stable Diffusion's structure at a size a CPU can train."""

from __future__ import annotations

from pocketfusion.demo.tokenizer import MAX_LENGTH

RESOLUTION = 64
LATENT_CHANNELS = 4
VAE_SCALE = 8  # like SD: 3 downsamplings
HIDDEN = 128

VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 64, 64),
    layers_per_block=1,
    latent_channels=LATENT_CHANNELS,
    norm_num_groups=8,
    sample_size=RESOLUTION,
)

UNET = dict(
    sample_size=RESOLUTION // VAE_SCALE,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(48, 96, 96),
    layers_per_block=1,
    attention_head_dim=4,  # diffusers' legacy name: the number of heads
    cross_attention_dim=HIDDEN,
    norm_num_groups=16,
)


def text_encoder_config(vocab_size: int, bos: int, eos: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=HIDDEN,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


# DDPM's linear schedule, not SD's scaled_linear: at an 8x8 latent, scaled_linear leaves so much
# signal at t=999 (sqrt(alpha_bar) = 0.068) that the model learns to read the object's position
# from the noise instead of the prompt, and ignores position words when sampling from pure noise
# (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed"). The linear
# schedule leaves sqrt(alpha_bar_999) = 0.006.
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
