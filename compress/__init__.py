"""pocketfusion.compress — quantization of the U-Net onto an integer grid every exporter lowers.

* ``grid``  — the stored format: weights exactly ``q * scale`` plus the grid (scales, bits, groups, reasons).
* ``quant`` — the algorithms: RTN, GPTQ with static clip-searched scales, measured mixed precision
  (W4) and activation fallbacks (W8A8): ``quantize_unet``.
* ``api``   — ``compress``: calibrate, quantize, measure (held-out U-Net error, image PSNR vs fp32,
  RTN at the same bits), write the folder; ``quant_metrics``.

Nothing here imports torch at import time.
"""

from pocketfusion.compress.api import compress, quant_metrics
from pocketfusion.compress.quant._old_quant import METHODS, SCHEMES, quantize_unet

__all__ = ["METHODS", "SCHEMES", "compress", "quant_metrics", "quantize_unet"]
