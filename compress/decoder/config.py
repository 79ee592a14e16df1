"""``DecoderConfig``: every option of the compact-decoder stage, named, frozen and validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pocketfusion.errors import UserError
from pocketfusion.validate import DEVICES, config_from_dict, is_int, is_num

KINDS = ("tiny", "pruned")
CONFIG_VERSION = 1


@dataclass(frozen=True)
class DecoderConfig:
    """How ``compress_decoder`` distills a compact VAE decoder (and encoder) from a pipeline's ``AutoencoderKL``.

    Architecture (``kind="tiny"``: diffusers' ``AutoencoderTiny``, TAESD-style: plain 3x3 convolutions, ReLU,
    nearest-neighbour upsampling; no normalization or attention):
        channels: the decoder's width (``decoder_block_out_channels``: diffusers' ``DecoderTiny`` needs one width
            for every stage).
        decoder_blocks: residual blocks per decoder stage, lowest resolution first (``num_decoder_blocks``); one
            stage per 2x upsampling plus one: 4 stages for the usual 8x VAE. The default (2, 2, 1, 0) at width 24 was
            measured 4.4x faster than the demo's decoder in onnxruntime (one thread): see the README.
        encoder_channels, encoder_blocks: the tiny encoder's width and blocks per stage (highest resolution first).
    (``kind="pruned"``: the original ``AutoencoderKL`` with every stage's channels cut to ``keep`` of them, SnapFusion's
    pruned decoder: the same blocks, attention and latent scaling, so plain diffusers loads it as an
    ``AutoencoderKL``; initialised from the original's channels of largest weight norm, then distilled):
        keep: the share of each stage's channels kept (0.5: about a quarter of the MACs).
        widths: instead of ``keep``, each stage's kept channels (``block_out_channels`` order, highest resolution
            first; stages the original gives equal widths keep equal widths). A runtime that pads channels to blocks
            (onnxruntime's NCHWc convolutions: 16 on AVX-512) times 6 or 12 channels as 16 and 24 as 32, so widths
            such as (6, 12, 16, 16) cost less than ``keep`` 0.375's (6, 12, 24, 24) where the low-resolution stages
            are concerned and keep the high-resolution ones that carry the detail; see the README.
        train_encoder: distill the encoder too (onto the original encoder's latent mean times its scaling factor,
            from the original decoder's images); else it keeps random weights (img2img would not work).
        encoder_weight: the encoder's loss weight beside the decoder's.

    Latent scaling: the tiny VAE has ``scaling_factor = 1`` and decodes the diffusion latents as the U-Net makes
    them (TAESD's convention); the pruned one keeps the original's factor. Either way ``latents /
    vae.config.scaling_factor`` in diffusers' pipelines and in the runtime pipeline (``Sampler.scaling_factor``)
    feeds it exactly what it was trained on.

    Data (data-free: the teacher makes every latent, the original decoder every target image):
        n_pairs, teacher_steps, teacher_batch, guidance_range, prompts, n_prompts: the teacher's guided DDIM samples
            (``compress.distill.teacher``, cached in the work directory for ``resume``).
        n_heldout: held-out latents (held-out prompts where the suite has them, other noise) for the PSNR figures.

    Loss (the decoder's, against the original decoder's images in [-1, 1]): pixel MSE, plus
        l1_weight: times the pixel L1 (sharper than MSE alone, and closer to the per-image PSNR the stage reports);
        edge_weight: times the L1 of the images' horizontal and vertical differences (an edge loss: MSE alone blurs
            the shapes' outlines, which the demo metric reads); 0 turns either off.
        ema_decay: the shipped weights are an EMA of the trained ones with this decay (None: the last weights).

    Training (``pocketfusion.training``): iterations, batch_size, lr (AdamW, cosine decay), grad_clip, seed, device,
    checkpoint_every, resume; work_dir (None: ``.<out name>.decoder-work`` beside the output), keep_work.
    """

    kind: str = "tiny"
    channels: int = 24
    decoder_blocks: tuple[int, ...] = (2, 2, 1, 0)
    encoder_channels: int = 16
    encoder_blocks: tuple[int, ...] = (1, 1, 1, 1)
    keep: float = 0.5
    widths: tuple[int, ...] | None = None
    train_encoder: bool = True
    encoder_weight: float = 1.0
    iterations: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    grad_clip: float | None = 1.0
    l1_weight: float = 1.0
    edge_weight: float = 0.5
    ema_decay: float | None = 0.995
    n_pairs: int = 512
    n_heldout: int = 64
    teacher_steps: int = 50
    teacher_batch: int = 64
    guidance_range: tuple[float, float] = (2.0, 6.0)
    prompts: str | None = None
    n_prompts: int | None = None
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 100
    resume: bool = False
    work_dir: str | None = None
    keep_work: bool = False
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        try:
            for name in ("decoder_blocks", "encoder_blocks", "guidance_range"):
                object.__setattr__(self, name, tuple(getattr(self, name)))
            object.__setattr__(self, "guidance_range", tuple(float(g) for g in self.guidance_range))
            if self.widths is not None:
                object.__setattr__(self, "widths", tuple(self.widths))
        except (TypeError, ValueError):
            raise UserError("DecoderConfig: decoder_blocks / encoder_blocks must be sequences of ints and guidance_range "
                            f"two numbers (got {self.decoder_blocks!r}, {self.encoder_blocks!r}, {self.guidance_range!r})") from None
        for name in ("prompts", "work_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(getattr(self, name)))
        if problems := _problems(self):
            raise UserError("DecoderConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists), ``version`` included."""
        return {**asdict(self), "decoder_blocks": list(self.decoder_blocks), "encoder_blocks": list(self.encoder_blocks),
                "guidance_range": list(self.guidance_range), "widths": None if self.widths is None else list(self.widths)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DecoderConfig:
        """Inverse of ``to_dict``; raises UserError on an unknown key or ``version`` or a bad value."""
        return config_from_dict(cls, d)

    def check_prompt_file(self) -> None:
        """Fail early (before loading a model) on a prompts file that does not exist."""
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise UserError(f"--prompts {self.prompts} is not a file (expected a text file, one prompt a line)")


def _problems(c: DecoderConfig) -> list[str]:
    g = c.guidance_range
    checks = [
        (c.version == CONFIG_VERSION, f"version={c.version!r}: only {CONFIG_VERSION}"),
        (c.kind in KINDS, f"kind={c.kind!r}: one of {', '.join(KINDS)}"),
        (is_int(c.channels, 1, 1024), f"channels={c.channels!r}: an int in 1..1024"),
        (len(c.decoder_blocks) >= 2 and all(is_int(b, 0, 16) for b in c.decoder_blocks),
         f"decoder_blocks={c.decoder_blocks!r}: two or more ints in 0..16 (one per stage)"),
        (is_int(c.encoder_channels, 1, 1024), f"encoder_channels={c.encoder_channels!r}: an int in 1..1024"),
        (len(c.encoder_blocks) >= 2 and all(is_int(b, 0, 16) for b in c.encoder_blocks),
         f"encoder_blocks={c.encoder_blocks!r}: two or more ints in 0..16 (one per stage)"),
        (is_num(c.keep, 0, 1, open_low=True, open_high=True), f"keep={c.keep!r}: a float in (0, 1)"),
        (c.widths is None or (len(c.widths) >= 2 and all(is_int(w, 1, 4096) for w in c.widths)),
         f"widths={c.widths!r}: None or two or more ints in 1..4096 (one per stage)"),
        (c.widths is None or c.kind == "pruned", f"widths={c.widths!r}: only for kind='pruned'"),
        (isinstance(c.train_encoder, bool), f"train_encoder={c.train_encoder!r}: a bool"),
        (is_num(c.encoder_weight, 0), f"encoder_weight={c.encoder_weight!r}: a float >= 0"),
        (is_int(c.iterations, 1), f"iterations={c.iterations!r}: an int >= 1"),
        (is_int(c.batch_size, 1), f"batch_size={c.batch_size!r}: an int >= 1"),
        (is_num(c.lr, 0, open_low=True), f"lr={c.lr!r}: a float > 0"),
        (c.grad_clip is None or is_num(c.grad_clip, 0, open_low=True), f"grad_clip={c.grad_clip!r}: None or > 0"),
        (is_num(c.l1_weight, 0), f"l1_weight={c.l1_weight!r}: a float >= 0"),
        (is_num(c.edge_weight, 0), f"edge_weight={c.edge_weight!r}: a float >= 0"),
        (c.ema_decay is None or is_num(c.ema_decay, 0, 1, open_low=True, open_high=True),
         f"ema_decay={c.ema_decay!r}: None or in (0, 1)"),
        (is_int(c.n_pairs, 1), f"n_pairs={c.n_pairs!r}: an int >= 1"),
        (is_int(c.n_heldout, 1), f"n_heldout={c.n_heldout!r}: an int >= 1"),
        (is_int(c.teacher_steps, 2, 1000), f"teacher_steps={c.teacher_steps!r}: an int in 2..1000"),
        (is_int(c.teacher_batch, 1), f"teacher_batch={c.teacher_batch!r}: an int >= 1"),
        (len(g) == 2 and all(is_num(x, 1.0, 100.0) for x in g) and g[0] <= g[1],
         f"guidance_range={g!r}: (min, max) with 1 <= min <= max <= 100 (1: no guidance)"),
        (c.n_prompts is None or is_int(c.n_prompts, 1), f"n_prompts={c.n_prompts!r}: None or an int >= 1"),
        (is_int(c.seed, 0, 2**31 - 1), f"seed={c.seed!r}: an int in [0, 2**31)"),
        (c.device in DEVICES, f"device={c.device!r}: one of {', '.join(DEVICES)}"),
        (is_int(c.checkpoint_every, 0), f"checkpoint_every={c.checkpoint_every!r}: an int >= 0 (0: never)"),
        (isinstance(c.resume, bool), f"resume={c.resume!r}: a bool"),
        (isinstance(c.keep_work, bool), f"keep_work={c.keep_work!r}: a bool"),
    ]
    return [msg for ok, msg in checks if not ok]
