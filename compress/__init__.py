"""pocketfusion.compress — stages that rewrite a model's weights, each a function of (model, frozen config, out)
writing one artifact directory whose typed manifest the next stage reads (see ARCHITECTURE.md).

* ``quant/``      — ``quantize(model, QuantConfig, out)``: the U-Net's weights on an integer grid (RTN, GPTQ,
  measured mixed precision, activation fallbacks) every exporter lowers.
* ``evaluate``    — a compressed pipeline against its float source (image PSNR, prompt accuracy through the
  model's prompt suite); shared by every compress stage.
* ``measure``     — ``python -m pocketfusion.compress.measure``: every scheme and method side by side.

Room is left for the stages that train or rewrite models (their own issues), each a subpackage with one
stage function and its config, using ``pocketfusion.training`` for its loop:

* ``prune/``   — ``prune(model, PruneConfig, out)``: U-Net pruning with knowledge-distillation recovery;
* ``distill/`` — ``distill(model, DistillConfig, out)``: step distillation of the sampler;
* ``decoder/`` — ``compress_decoder(model, DecoderConfig, out)``: a smaller VAE decoder;
* ``lora/``    — ``merge_lora(model, LoraConfig, out)``: LoRA weights merged into the U-Net.

compress may import the core and ``pocketfusion.calibration``, never export or runtimes.
Nothing here imports torch at import time.
"""

from pocketfusion.compress.evaluate import quant_metrics, with_unet
from pocketfusion.compress.quant import METHODS, SCHEMES, QuantConfig, load_grid, quantize, quantize_unet, summary

__all__ = ["METHODS", "SCHEMES", "QuantConfig", "load_grid", "quant_metrics", "quantize", "quantize_unet", "summary", "with_unet"]
