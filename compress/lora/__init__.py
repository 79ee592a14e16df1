"""pocketfusion.compress.lora — LoRAs merged before compression: ``merge_lora(model, LoraConfig, out)`` reads LoRA files
(safetensors; diffusers/PEFT or kohya/A1111 format; U-Net and text encoder; linear and convolution layers), merges
them at chosen scales exactly as diffusers' ``load_lora_weights`` + ``fuse_lora`` does, and writes a diffusers folder.

* ``config`` — ``LoraConfig``, ``LoraFile``;
* ``read``   — ``read_lora`` (the file formats; pickles refused);
* ``merge``  — ``merge_in_memory`` (the arithmetic; checks names and shapes first); ``merge_into_quantized`` (the
  LoRA re-quantized onto a quantized model's formats, as stable-diffusion.cpp applies it: for comparison);
* ``stage``  — ``merge_lora``, ``annotate`` and ``summary``.

Nothing here imports torch at import time.
"""

from pocketfusion.compress.lora.config import LoraConfig, LoraFile
from pocketfusion.compress.lora.merge import merge_in_memory, merge_into_quantized
from pocketfusion.compress.lora.read import read_lora
from pocketfusion.compress.lora.stage import annotate, merge_lora, summary

__all__ = ["LoraConfig", "LoraFile", "annotate", "merge_in_memory", "merge_into_quantized", "merge_lora", "read_lora", "summary"]
