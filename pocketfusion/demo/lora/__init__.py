"""The demo LoRA (issue 14): teaches the demo model a position word it never saw, ``north`` (the top centre).

    python -m pocketfusion.demo.lora train -o runs/demo-lora                        # trains, writes the LoRA file
    python -m pocketfusion.demo.lora measure pocketfusion/demo/lora/north.safetensors --write

Why a position and not a colour or a shape: the demo VAE decodes only the six colours and three shapes it was trained
on (a magenta or a plus sign comes back yellow or as a blob), and a LoRA in diffusers' format adapts the U-Net and the
text encoder, not the VAE. The VAE is convolutional, so a shape decodes anywhere: a new position is the one new concept
the decoder can show. The tokenizer's vocabulary is fixed with the shipped model, but it is byte-level BPE: ``north``
becomes the pieces ``n o r t h</w>``, which are in the vocabulary but never occurred in training, and the LoRA (on the
text encoder's and the U-Net's attention) learns to read them. The base model places a ``north`` prompt's shape top left.

``train`` (``train.train_lora``) runs the shared training loop (``pocketfusion.training``) and writes diffusers'
``pytorch_lora_weights.safetensors`` (``unet.*`` / ``text_encoder.*`` ``lora_A``/``lora_B`` keys, PEFT configs as
metadata), which ``pocketfusion lora``, ``--lora`` and diffusers' ``load_lora_weights`` read. ``measure``
(``measure.measure_lora``) scores the base model and the model with the LoRA merged: concept accuracy on held-out
``north`` prompts and base prompt accuracy on held-out base prompts.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "north.safetensors"
