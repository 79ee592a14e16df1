"""pocketfusion.compress.decoder — the compact VAE: ``compress_decoder(model, DecoderConfig, out)`` distills a
TAESD-style ``AutoencoderTiny`` from a pipeline's ``AutoencoderKL`` on the teacher's own latents, through
``pocketfusion.training``, and writes a diffusers folder whose ``vae`` is the compact one.

* ``config`` — ``DecoderConfig``;
* ``stage``  — ``compress_decoder``, ``tiny_vae``, ``pruned_vae`` and ``summary``.

Nothing here imports torch at import time.
"""

from pocketfusion.compress.decoder.config import KINDS, DecoderConfig
from pocketfusion.compress.decoder.stage import compress_decoder, pruned_vae, summary, tiny_vae, work_dir

__all__ = ["KINDS", "DecoderConfig", "compress_decoder", "pruned_vae", "summary", "tiny_vae", "work_dir"]
