"""onnxruntime's fused attention in the ONNX export: diffusers ``Attention`` as ``com.microsoft`` ``MultiHeadAttention``.

The legacy TorchScript exporter writes ``scaled_dot_product_attention`` as its decomposition (``MatMul``, a scale,
``Softmax``, ``MatMul``), which onnxruntime runs as written: for SD-1.5 at a 64² latent each of the five 4,096-token
self-attentions materializes a 2 × 8 × 4,096 × 4,096 score tensor (1 GiB of fp32) and reads it back through the
softmax. Its transformers optimizer (``onnxruntime.transformers.optimizer``, ``model_type="unet"``) does not
recognise that decomposition (0 attentions fused on the demo U-Net), and the fusions it does make for U-Nets
(``GroupNorm``, ``NhwcConv``, ``BiasSplitGelu``) are CUDA-only kernels.

So the export writes the op directly: while ``fused_attention(module)`` is active, every ``Attention`` of the
plain form (3-D input, no mask, no group / spatial / q-k norm, no residual: every attention of a Stable Diffusion
U-Net's transformer blocks) runs through ``MhaAttnProcessor``, whose ``_MultiHeadAttention`` computes
``scaled_dot_product_attention`` in PyTorch (the traced values are the same) and exports as
``MultiHeadAttention(q, k, v, num_heads)`` on the projected ``(B, S, heads x head_dim)`` tensors: onnxruntime's CPU
kernel (``contrib_ops``; onnxruntime-web's wasm build has it too) computes it without the score tensor round trip.
Other attentions (the VAE's, with a group norm and a residual) keep the stock processor. The projections stay
MatMuls, so quantized weights lower as before.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

DOMAIN = "com.microsoft"


class _MultiHeadAttention(torch.autograd.Function):
    """Attention of projected ``q`` (B, S, H·D), ``k`` and ``v`` (B, L, H·D) over ``heads`` heads, scale 1/√D."""

    @staticmethod
    def forward(ctx, q, k, v, heads: int):  # noqa: D102 - the math is the docstring's
        b, _, d = q.shape
        hd = d // heads

        def split(x):
            return x.view(b, -1, heads, hd).transpose(1, 2)

        return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, -1, d)

    @staticmethod
    def symbolic(g, q, k, v, heads: int):  # noqa: D102
        out = g.op(f"{DOMAIN}::MultiHeadAttention", q, k, v, num_heads_i=heads)
        out.setType(q.type())
        return out


def plain_module(attn) -> bool:
    """Whether ``attn`` (a diffusers ``Attention``) has the plain form, whatever its inputs."""
    return (attn.spatial_norm is None and attn.group_norm is None and not attn.norm_cross and attn.norm_q is None
            and attn.norm_k is None and not attn.residual_connection and attn.to_q.out_features == attn.to_v.out_features)


def plain(attn, hidden_states, attention_mask) -> bool:
    """Whether ``attn`` on these inputs is the plain form ``MultiHeadAttention`` computes."""
    return attention_mask is None and hidden_states.ndim == 3 and plain_module(attn)


def has_candidates(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds a diffusers ``Attention`` of the plain form (else the export needs no custom opset)."""
    from diffusers.models.attention_processor import Attention

    return any(isinstance(m, Attention) and plain_module(m) for m in module.modules())


class MhaAttnProcessor:
    """A diffusers attention processor exporting the plain form as ``MultiHeadAttention``; else the stock one's."""

    def __init__(self, stock) -> None:
        self.stock = stock
        self.used = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if not plain(attn, hidden_states, attention_mask):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        self.used += 1
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = _MultiHeadAttention.apply(attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx), attn.heads)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def fused_attention(module: torch.nn.Module):
    """Within the block, every diffusers ``Attention`` in ``module`` exports its plain form as ``MultiHeadAttention``;
    yields a function that returns how many attention calls took that form. The processors are put back after."""
    from diffusers.models.attention_processor import Attention

    saved = [(m, m.processor) for m in module.modules() if isinstance(m, Attention)]
    procs = []
    try:
        for m, p in saved:
            procs.append(MhaAttnProcessor(p))
            m.processor = procs[-1]
        yield lambda: sum(p.used for p in procs)
    finally:
        for m, p in saved:
            m.processor = p
