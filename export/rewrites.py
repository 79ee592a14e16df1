"""Mathematically equivalent module rewrites that let a diffusers model lower to few XNNPACK blobs.

The XNNPACK partitioner of ExecuTorch 1.5.1 refuses ``native_group_norm``, ``native_layer_norm``,
``upsample_nearest2d``, ``expand_copy``, ``arange`` and the masked "safe softmax" pattern that
``scaled_dot_product_attention`` decomposes into. Every refused node runs on a slow portable kernel
and splits the graph, so a stock U-Net lowers into dozens of delegate blobs (123 for the tiny
SD-1.5 fixture, with 329 portable ops). The rewrites here express
the same functions with ops that XNNPACK does accept (see ``shared/STACK.md``):

=====================  =========================================================================
module                 rewritten as
=====================  =========================================================================
``nn.GroupNorm``       per-channel ``mean.dim([2, 3])``, group average as ``(N, C) @ (C, C)``, centred
                       square likewise, rsqrt, per-channel affine (channels-last friendly)
``nn.LayerNorm``       reshape to ``(-1, 1, 1, C)``, ``mean.dim([2, 3])`` twice, rsqrt, affine
``Upsample2D``         nearest 2x + 3x3 conv as one stride-2 ``conv_transpose2d`` (kernel derived
                       from the conv); without a 3x3 conv (or quantized), nearest 2x as a
                       depthwise ``conv_transpose2d`` with a 2x2 ones kernel
``Attention``          a processor with 3-D ``torch.bmm``: q pre-scaled, softmax on the last dim,
                       no mask (falls back to the stock processor when a mask is given)
``GEGLU``              ``chunk`` replaced by two slices
``Timesteps``          frequencies precomputed as a buffer (no ``arange``/``exp`` in the graph)
``CLIPTextTransformer``  its causal mask a constant buffer added in eager attention (transformers builds
                       it on every call with ``full`` / ``triu`` / ``where`` / ``any``); attention as 3-D
                       ``bmm`` (7 blobs for the demo's text encoder before); the token embedding lookup
                       stays outside the delegate, ahead of the one blob
integer scalars        ``output_scale_factor`` / ``rescale_output_factor`` made floats
=====================  =========================================================================

Two more fragmenters live in the exported graph rather than in a module, so
``apply_graph_rewrites_`` edits a ``torch.export`` program before ``to_edge``: no-op ``expand``
nodes (the U-Net's ``timesteps.expand(batch)``) are dropped, and ``cat([a, a])`` gets a ``clone``
for its repeated input.

Every module rewrite shares the original parameters (no copies), keeps ``state_dict`` keys unchanged and
works on any input shape the original accepted. ``apply_xnnpack_rewrites_`` edits a module in
place: callers that need the original should pass a ``copy.deepcopy``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class GroupNorm4D(nn.Module):
    """``nn.GroupNorm`` in a form XNNPACK runs in its own channels-last layout.

    XNNPACK keeps 4-D activations in NHWC. A group norm written on a ``(N*G, 1, 1, C/G * spatial)`` view
    makes the delegate transpose the whole activation twice per norm; here every op on the full tensor is
    channels-last friendly: per-channel spatial means (``mean.dim([2, 3])``, a global average pool), the
    group average of those means as an ``(N, C) @ (C, C)`` product with a constant block matrix (``1/(C/G)``
    within a group), the centred square's per-channel means averaged the same way (the biased variance,
    as ``native_group_norm``), ``rsqrt``, and one per-channel scale and shift. Inputs of another rank are
    viewed as ``(N, C, L, 1)``.
    """

    def __init__(self, gn: nn.GroupNorm):
        super().__init__()
        self.num_groups = gn.num_groups
        self.num_channels = gn.num_channels
        self.eps = float(gn.eps)
        self.affine = gn.affine
        self.weight = gn.weight
        self.bias = gn.bias
        group = torch.arange(gn.num_channels) // (gn.num_channels // gn.num_groups)
        ref = gn.weight if gn.weight is not None else torch.zeros(())
        average = (group[:, None] == group[None, :]).to(ref.dtype) / (gn.num_channels // gn.num_groups)
        self.register_buffer("group_average", average, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        if x.dim() != 4:
            return self.forward(x.reshape(n, c, -1, 1)).reshape(x.shape)
        avg = self.group_average.to(x.dtype)
        mean = x.mean(dim=(2, 3), keepdim=True).reshape(n, c) @ avg
        d = x - mean.reshape(n, c, 1, 1)
        var = (d * d).mean(dim=(2, 3), keepdim=True).reshape(n, c) @ avg
        scale = torch.rsqrt(var + self.eps)
        if not self.affine:
            return d * scale.reshape(n, c, 1, 1)
        return d * (scale * self.weight).reshape(n, c, 1, 1) + self.bias.reshape(1, c, 1, 1)


class LayerNorm4D(nn.Module):
    """``nn.LayerNorm`` over the last dimension, computed on a ``(-1, 1, 1, C)`` view with ``mean.dim``."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.normalized_shape = tuple(ln.normalized_shape)
        self.eps = float(ln.eps)
        self.weight = ln.weight
        self.bias = ln.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        c = 1
        for s in self.normalized_shape:
            c *= s
        h = x.reshape(-1, 1, 1, c)
        mean = h.mean(dim=(2, 3), keepdim=True)
        d = h - mean
        var = (d * d).mean(dim=(2, 3), keepdim=True)
        y = (d * torch.rsqrt(var + self.eps)).reshape(shape)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


class NearestUpsample2D(nn.Module):
    """diffusers ``Upsample2D`` with its nearest 2x interpolation as a depthwise transposed conv.

    ``conv_transpose2d(x, ones(C, 1, 2, 2), stride=2, groups=C)`` copies each pixel into a 2x2
    block: exactly nearest-neighbour upsampling by 2. The ones kernel is a registered
    (non-persistent) buffer so it is a constant of the exported graph, not an ``aten.full`` op.
    A forced ``output_size`` other than 2x falls back to ``F.interpolate``.
    """

    def __init__(self, up: nn.Module):
        super().__init__()
        self.channels = up.channels
        self.out_channels = up.out_channels
        self.use_conv = up.use_conv
        self.name = up.name
        if up.name == "conv":
            self.conv = up.conv
        else:
            self.Conv2d_0 = up.Conv2d_0
        ref = next(up.parameters(), None)
        dtype = ref.dtype if ref is not None else torch.float32
        self.register_buffer("ones", torch.ones(up.channels, 1, 2, 2, dtype=dtype), persistent=False)

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        h, w = hidden_states.shape[-2:]
        if output_size is None or tuple(output_size) == (2 * h, 2 * w):
            hidden_states = F.conv_transpose2d(hidden_states, self.ones.to(hidden_states.dtype), stride=2, groups=self.channels)
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        if self.use_conv:
            hidden_states = self.conv(hidden_states) if self.name == "conv" else self.Conv2d_0(hidden_states)
        return hidden_states


def upsample_conv_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The stride-2 transposed-conv kernel ``(C_in, C_out, 4, 4)`` equal to a 3x3 conv ``weight`` (``(C_out, C_in,
    3, 3)``, padding 1) applied after nearest 2x upsampling. Along each axis the input pixel ``i`` covers
    outputs ``2i-1 .. 2i+2``, which see it through the taps ``w2``, ``w1+w2``, ``w0+w1``, ``w0``."""
    def axis(t: torch.Tensor, dim: int) -> torch.Tensor:
        w0, w1, w2 = t.unbind(dim)
        return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)

    return axis(axis(weight, 2), 3).transpose(0, 1).contiguous()


class UpsampleConv2D(nn.Module):
    """diffusers ``Upsample2D`` (nearest 2x, then a 3x3 conv) as one stride-2 ``conv_transpose2d``.

    The same function with 16 instead of 36 multiply-adds per input pixel and channel pair, and no
    upsampled intermediate; XNNPACK runs it as one dense deconvolution (its depthwise deconvolution, which
    ``NearestUpsample2D`` lowers to, was a quarter of the demo VAE decoder's time). The kernel is derived
    from ``conv.weight`` once, when the rewrite is applied (a non-persistent buffer, so ``state_dict`` keys
    stay those of the original); the conv stays registered for them. A forced ``output_size`` other than 2x
    falls back to interpolation and the conv.
    """

    def __init__(self, up: nn.Module):
        super().__init__()
        self.channels = up.channels
        self.out_channels = up.out_channels
        self.conv = up.conv
        self.register_buffer("kernel", upsample_conv_kernel(up.conv.weight.detach()), persistent=False)

    @staticmethod
    def applies(up: nn.Module) -> bool:
        conv = getattr(up, "conv", None)
        return (up.interpolate and up.use_conv and not up.use_conv_transpose and up.norm is None and up.name == "conv"
                and isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
                and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1)

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        h, w = hidden_states.shape[-2:]
        if output_size is None or tuple(output_size) == (2 * h, 2 * w):
            return F.conv_transpose2d(hidden_states, self.kernel.to(hidden_states.dtype), self.conv.bias, stride=2, padding=1)
        return self.conv(F.interpolate(hidden_states, size=output_size, mode="nearest"))


class SlicedGEGLU(nn.Module):
    """diffusers ``GEGLU`` with ``chunk(2, dim=-1)`` replaced by two slices (no ``split_with_sizes``)."""

    def __init__(self, geglu: nn.Module):
        super().__init__()
        self.proj = geglu.proj

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        hidden_states = self.proj(hidden_states)
        half = hidden_states.shape[-1] // 2
        return hidden_states[..., :half] * F.gelu(hidden_states[..., half:])


class PrecomputedTimesteps(nn.Module):
    """diffusers ``Timesteps`` with its sinusoid frequencies (``arange``/``exp``/``scale``) in a buffer.

    Computes ``sin/cos(t[:, None] * freqs[None])`` in the same order (``flip_sin_to_cos``) and
    with the same zero pad for odd widths as ``get_timestep_embedding``.
    """

    def __init__(self, ts: nn.Module, max_period: int = 10000):
        super().__init__()
        self.num_channels = ts.num_channels
        self.flip_sin_to_cos = ts.flip_sin_to_cos
        self.downscale_freq_shift = ts.downscale_freq_shift
        self.scale = float(ts.scale)
        half = ts.num_channels // 2
        exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / (half - ts.downscale_freq_shift)
        self.register_buffer("freqs", torch.exp(exponent)[None, :], persistent=False)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        emb = timesteps.to(torch.float32).unsqueeze(-1) * self.freqs
        if self.scale != 1.0:
            emb = emb * self.scale
        if self.flip_sin_to_cos:
            emb = torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1)
        else:
            emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
        if self.num_channels % 2 == 1:
            emb = F.pad(emb, (0, 1, 0, 0))
        return emb


class BmmAttnProcessor:
    """Attention processor using 3-D ``torch.bmm`` only: q·scale, bmm, softmax(-1), bmm.

    ``scaled_dot_product_attention`` always decomposes (in ``torch.export``) into a masked safe
    softmax, per-operand scaling and 4-D matmuls via ``expand_copy``, none of which XNNPACK
    accepts. This processor folds heads into the batch dimension instead. With an attention mask,
    ``norm_q``/``norm_k`` or a spatial norm it defers to the stock ``AttnProcessor2_0``. It
    computes in the input dtype: ``upcast_attention``/``upcast_softmax`` are no-ops for the fp32
    exports here, but an fp16 model would lose SDPA's fp32 softmax accumulation.
    """

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self._fallback = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if attention_mask is not None or attn.norm_q is not None or attn.norm_k is not None or attn.spatial_norm is not None:
            return self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = attn.to_q(hidden_states) * attn.scale
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        batch, q_len, inner = query.shape
        kv_len = key.shape[1]
        heads = attn.heads
        head_dim = inner // heads
        q = query.view(batch, q_len, heads, head_dim).permute(0, 2, 1, 3).reshape(batch * heads, q_len, head_dim)
        k_t = key.view(batch, kv_len, heads, head_dim).permute(0, 2, 3, 1).reshape(batch * heads, head_dim, kv_len)
        v = value.view(batch, kv_len, heads, value.shape[-1] // heads).permute(0, 2, 1, 3)
        v = v.reshape(batch * heads, kv_len, value.shape[-1] // heads)
        probs = torch.softmax(torch.bmm(q, k_t), dim=-1)
        out = torch.bmm(probs, v)
        out = out.view(batch, heads, q_len, -1).permute(0, 2, 1, 3).reshape(batch, q_len, value.shape[-1])
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        if attn.rescale_output_factor != 1.0:
            out = out / float(attn.rescale_output_factor)
        return out


class BmmCLIPAttention(nn.Module):
    """transformers' ``CLIPAttention`` as 3-D ``bmm``s over (batch x heads): q pre-scaled, the additive mask(s)
    broadcast over batch and heads, softmax on the last dim. Called and returning as the original (``(out, None)``)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, float(attn.scale)

    @staticmethod
    def applies(attn: nn.Module) -> bool:
        return all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim", "scale"))

    def forward(self, hidden_states, attention_mask=None, causal_attention_mask=None, output_attentions=False, **kwargs):
        b, n, _ = hidden_states.shape
        h, d = self.num_heads, self.head_dim

        def heads(x):
            return x.reshape(b, n, h, d).transpose(1, 2).reshape(b * h, n, d)

        q = heads(self.q_proj(hidden_states) * self.scale)
        k, v = heads(self.k_proj(hidden_states)), heads(self.v_proj(hidden_states))
        scores = torch.bmm(q, k.transpose(1, 2))
        for mask in (attention_mask, causal_attention_mask):
            if mask is not None:  # (b or 1, 1, n, n) additive
                scores = (scores.reshape(b, h, n, n) + mask).reshape(b * h, n, n) if mask.shape[0] != 1 else scores + mask.reshape(1, n, n)
        out = torch.bmm(scores.softmax(dim=-1), v)
        return self.out_proj(out.reshape(b, h, n, d).transpose(1, 2).reshape(b, n, h * d)), None


class ConstantMaskCLIPText(nn.Module):
    """transformers' ``CLIPTextTransformer`` with its causal mask precomputed: the same embeddings, encoder layers
    (attention as ``BmmCLIPAttention``) and final LayerNorm, called as the original is (``input_ids``,
    ``output_hidden_states``, ``return_dict``). Returns ``BaseModelOutputWithPooling``; the pooled output (the EOS
    token's state) is computed as transformers does, and pruned from the exported graph when unused."""

    def __init__(self, tm: nn.Module):
        super().__init__()
        self.config = tm.config
        self.embeddings, self.encoder, self.final_layer_norm = tm.embeddings, tm.encoder, tm.final_layer_norm
        self.eos_token_id = tm.eos_token_id
        n = tm.config.max_position_embeddings
        mask = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)
        self.register_buffer("causal_mask", mask[None, None], persistent=False)
        for layer in self.encoder.layers:  # 3-D bmm attention (a 4-D matmul decomposes to expand_copy + bmm)
            layer.self_attn = BmmCLIPAttention(layer.self_attn)

    @staticmethod
    def applies(sub: nn.Module) -> bool:
        if type(sub).__name__ != "CLIPTextTransformer":
            return False
        layers = getattr(getattr(sub, "encoder", None), "layers", None)
        return layers is not None and all(BmmCLIPAttention.applies(la.self_attn) for la in layers)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if attention_mask is not None:
            raise ValueError("ConstantMaskCLIPText: a padding attention_mask is not supported (the export passes none)")
        h = self.embeddings(input_ids=input_ids, position_ids=position_ids)
        n = h.shape[1]
        mask = self.causal_mask if n == self.causal_mask.shape[-1] else self.causal_mask[:, :, :n, :n]
        states = (h,)
        for layer in self.encoder.layers:
            h = layer(h, None, mask)[0]
            states += (h,)
        last = self.final_layer_norm(h)
        ids = input_ids.to(torch.int)
        rows = torch.arange(last.shape[0], device=last.device)
        eos = ids.argmax(dim=-1) if self.eos_token_id == 2 else (ids == self.eos_token_id).int().argmax(dim=-1)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=last[rows, eos],
                                          hidden_states=states if output_hidden_states else None)


def _swap(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, child = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _classes():
    """The diffusers classes the rewrites recognise (imported lazily; empty names if absent)."""
    try:
        from diffusers.models.activations import GEGLU
        from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
        from diffusers.models.embeddings import Timesteps
        from diffusers.models.upsampling import Upsample2D
    except ImportError:  # pragma: no cover - diffusers is a core dependency
        return None
    return dict(GEGLU=GEGLU, Attention=Attention, stock_procs=(AttnProcessor, AttnProcessor2_0), Timesteps=Timesteps,
                Upsample2D=Upsample2D)


def apply_xnnpack_rewrites_(module: nn.Module, *, fuse_upsample_conv: bool = True) -> list[str]:
    """Rewrite ``module`` in place into XNNPACK-delegable, mathematically equivalent form.

    ``fuse_upsample_conv`` turns nearest-upsample + 3x3 conv into one transposed conv (``UpsampleConv2D``);
    a quantized lowering turns it off, since its grid quantizes the conv itself.

    Returns one human-readable line per kind of rewrite applied (with counts and the reason), for
    the export manifest. Modules whose configuration a rewrite does not cover are left alone and
    logged. The root module itself is never replaced (only its descendants).
    """
    cls = _classes()
    counts: Counter[str] = Counter()
    for name, sub in list(module.named_modules()):
        if not name:
            continue
        if type(sub) is nn.GroupNorm:
            _swap(module, name, GroupNorm4D(sub))
            counts["groupnorm"] += 1
        elif type(sub) is nn.LayerNorm:
            if len(sub.normalized_shape) == 1:
                _swap(module, name, LayerNorm4D(sub))
                counts["layernorm"] += 1
        elif cls and type(sub) is cls["Upsample2D"]:
            if fuse_upsample_conv and UpsampleConv2D.applies(sub):
                _swap(module, name, UpsampleConv2D(sub))
                counts["upsample_conv"] += 1
            elif sub.interpolate and not sub.use_conv_transpose and sub.norm is None:
                _swap(module, name, NearestUpsample2D(sub))
                counts["upsample"] += 1
            else:
                logger.info("rewrites: %s (Upsample2D with transpose conv/norm/no interpolation) left as is", name)
        elif cls and type(sub) is cls["GEGLU"]:
            _swap(module, name, SlicedGEGLU(sub))
            counts["geglu"] += 1
        elif cls and type(sub) is cls["Timesteps"]:
            _swap(module, name, PrecomputedTimesteps(sub))
            counts["timesteps"] += 1
        elif ConstantMaskCLIPText.applies(sub):
            _swap(module, name, ConstantMaskCLIPText(sub))
            counts["clip_text"] += 1
    for name, sub in module.named_modules():
        if cls and isinstance(sub, cls["Attention"]):
            if isinstance(sub.processor, cls["stock_procs"]):
                sub.set_processor(BmmAttnProcessor())
                counts["attention"] += 1
            else:
                logger.info("rewrites: %s has custom processor %s; left as is", name, type(sub.processor).__name__)
        for attr in ("output_scale_factor", "rescale_output_factor"):
            v = getattr(sub, attr, None)
            if isinstance(v, int) and not isinstance(v, bool):
                setattr(sub, attr, float(v))
                counts["int_scalar"] += 1
    text = {
        "groupnorm": "GroupNorm x{n} -> per-channel mean.dim([2,3]) + group average as a matmul + rsqrt + affine "
                     "(no native_group_norm on XNNPACK; channels-last friendly)",
        "layernorm": "LayerNorm x{n} -> (-1,1,1,C) view + mean.dim([2,3]) + rsqrt + affine (no native_layer_norm on XNNPACK)",
        "upsample": "Upsample2D nearest 2x x{n} -> depthwise conv_transpose2d with a ones buffer (no upsample_nearest2d)",
        "upsample_conv": "Upsample2D nearest 2x + 3x3 conv x{n} -> one stride-2 conv_transpose2d (4x4 kernel derived from the conv)",
        "attention": "Attention x{n} -> 3-D bmm processor, q pre-scaled, softmax(-1), no mask "
                     "(SDPA decomposes to expand_copy + masked softmax)",
        "geglu": "GEGLU x{n} -> slices instead of chunk (no split_with_sizes_copy)",
        "timesteps": "Timesteps x{n} -> precomputed frequency buffer (no arange/exp in the graph)",
        "int_scalar": "integer output scale factors x{n} -> floats (no integer scalar tensors)",
        "clip_text": "CLIP text transformer x{n} -> constant causal-mask buffer + 3-D bmm attention (transformers builds the "
                     "mask per call with full/triu/where/any, and a 4-D matmul adds expand_copy: those ops split the graph)",
    }
    out = [text[k].format(n=counts[k]) for k in text if counts[k]]
    logger.info("xnnpack rewrites: %s", "; ".join(out) or "none")
    return out


def dedupe_cat_inputs_(exported_program) -> list[str]:
    """Give every repeated input of an ``aten.cat`` its own ``clone`` node, in place.

    The XNNPACK partitioner counts a node's distinct inputs, so ``cat([a, a])`` (a U-Net without
    a mid-block concatenates the innermost feature map with itself as its first skip connection)
    is refused as a "concatenation of 1 tensor" and runs on a portable kernel between two blobs.
    ``cat([a, clone(a)])`` is the same value and is delegated (the clone is a delegated copy).
    Works on a ``torch.export`` program before ``to_edge``; returns descriptions for the manifest.
    """
    import torch

    gm = exported_program.graph_module
    graph = gm.graph
    n = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.cat.default:
            continue
        tensors = list(node.args[0])
        seen: set = set()
        changed = False
        for i, t in enumerate(tensors):
            if t in seen:
                with graph.inserting_before(node):
                    dup = graph.call_function(torch.ops.aten.clone.default, (t,))
                dup.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
                if "val" in t.meta:
                    dup.meta["val"] = t.meta["val"]
                if "tensor_meta" in t.meta:
                    dup.meta["tensor_meta"] = t.meta["tensor_meta"]
                tensors[i] = dup
                changed = True
            seen.add(t)
        if changed:
            node.args = (tensors,) + tuple(node.args[1:])
            n += 1
    if n:
        graph.lint()
        gm.recompile()
    return [f"cat with a repeated input x{n} -> cat([a, clone(a)]) (the partitioner refuses cat([a, a]))"] if n else []


def drop_noop_expands_(exported_program) -> list[str]:
    """Remove ``aten.expand`` nodes whose output shape equals their input shape, in place.

    ``UNet2DConditionModel.get_time_embed`` broadcasts the timesteps with
    ``timesteps.expand(batch)`` even when they already have that shape; the node survives
    ``torch.export`` and becomes a portable ``expand_copy`` (XNNPACK has no expand config).
    Works on a ``torch.export`` program before ``to_edge``; returns descriptions for the manifest.
    """
    import torch

    gm = exported_program.graph_module
    graph = gm.graph
    n = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.expand.default:
            continue
        src = node.args[0]
        a, b = getattr(src, "meta", {}).get("val"), node.meta.get("val")
        if a is None or b is None or tuple(a.shape) != tuple(b.shape) or any(u.op == "output" for u in node.users):
            continue
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        n += 1
    if n:
        graph.lint()
        gm.recompile()
    return [f"no-op expand x{n} dropped (e.g. the U-Net's timesteps.expand(batch); no expand_copy on XNNPACK)"] if n else []


def apply_graph_rewrites_(exported_program) -> list[str]:
    """Apply every graph-level rewrite (``drop_noop_expands_``, ``dedupe_cat_inputs_``) in place."""
    return drop_noop_expands_(exported_program) + dedupe_cat_inputs_(exported_program)
