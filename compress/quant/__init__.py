"""pocketfusion.compress.quant — the quantize stage: U-Net weights on an integer grid every exporter lowers.

* ``grid``        — the stored format: weights exactly ``q * scale`` plus the grid (scales, bits, groups,
  reasons); ``load_grid(model, name)`` finds a component's grid through the typed manifest.
* ``config``      — ``QuantConfig``, every option of the stage (frozen, validated).
* ``feeds``       — U-Net calls on calibration feeds (batching, forward order).
* ``gptq``        — Hessians, clip search, GPTQ rounding with static scales, ``quantize_weights``.
* ``mixed``       — measured mixed precision (W4): per-layer sensitivity, the size budget.
* ``activations`` — activation ranges, fake quantization, measured 16-bit fallbacks (W8A8).
* ``unet``        — ``quantize_unet``: one U-Net module in place; ``rtn_like`` (the baseline).
* ``stage``       — ``quantize(model, QuantConfig, out)``: calibrate, quantize, measure, write the artifact.

Nothing here imports torch at import time.
"""

from pocketfusion.compress.quant.config import METHODS, WEIGHT_BITS, QuantConfig
from pocketfusion.compress.quant.grid import SCHEMES, LayerGrid, QuantGrid, load_grid, rtn_grid
from pocketfusion.compress.quant.mixed import weight_bytes
from pocketfusion.compress.quant.stage import quantize, summary
from pocketfusion.compress.quant.unet import quantize_unet, rtn_like

__all__ = [
    "METHODS", "SCHEMES", "WEIGHT_BITS", "LayerGrid", "QuantConfig", "QuantGrid", "load_grid", "quantize", "quantize_unet",
    "rtn_grid", "rtn_like", "summary", "weight_bytes",
]
