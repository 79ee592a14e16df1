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


# DDPM's linear schedule rather than SD's scaled_linear: at an 8x8 latent scaled_linear leaves
# sqrt(alpha_bar_999) = 0.068 of the image in the starting noise (Lin et al. 2024, "Common diffusion
# noise schedules and sample steps are flawed"); linear leaves 0.006.
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    # v-prediction (as SD 2.x): at high noise the target is the image itself, not the noise.
    prediction_type="v_prediction",
)
