"""Pipeline components as exportable modules with static, named tensor interfaces.

Every exporter sees the same three wrappers, so input/output names and dtypes agree across
targets and with the runtime pipeline (``pocketfusion.runtimes.pipeline``):

==============  ==========================================================  ===================
component       inputs (static shapes, batch B)                             output
==============  ==========================================================  ===================
text_encoder    input_ids int32 (B, L)                                      last_hidden_state
                                                                            (SDXL: penultimate_hidden_state)
text_encoder_2  input_ids int32 (B, L) — SDXL's CLIPTextModelWithProjection  penultimate_hidden_state,
                                                                            text_embeds (pooled)
unet            sample (B, C, h, w), timestep float32 (B,),                 noise_pred
               encoder_hidden_states (B, L, D)
               [+ text_embeds (B, T), time_ids (B, 6) for SDXL]
               [+ guidance float32 (B,) for a guidance-embedded U-Net]
vae_decoder     latent (B, C, h, w) — already divided by the scaling factor image in [-1, 1]
==============  ==========================================================  ===================

SDXL conditions its U-Net on the penultimate hidden states of both text encoders, concatenated on the
last axis (``encoder_hidden_states``), and on the second encoder's projected pooled output
(``text_embeds``), as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` makes them; so an SDXL
pipeline's text encoders output ``penultimate_hidden_state`` (``hidden_states[-2]``: the last layer
and final norm of the first encoder are unused).

The U-Net's batch comes from the model: 2 for classifier-free guidance (the two halves of a CFG
step), 1 for a U-Net that takes the guidance scale as an input (``time_cond_proj_dim``: its
embedding of ``guidance - 1`` is its ``timestep_cond``, as diffusers' pipelines compute it).
The text encoders and decoder are exported at batch 1.

Each spec names its ``source``: the model component its wrapper holds (``unet``, ``vae``,
``text_encoder``, an attribute of the wrapper of that name), whose module names are the keys of
its quantization grid and of the export's layer map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pocketfusion.artifact import TensorSpec
from pocketfusion.errors import UserError
from pocketfusion.export.base import SOURCES

GOLDEN_GUIDANCE = 4.0  # the guidance scale of the golden sampling run (and of random golden feeds)


@dataclass
class ComponentSpec:
    """One exportable component: the wrapper module, its I/O specs, golden inputs and quantization."""

    name: str
    module: Any  # torch.nn.Module wrapping the source component as attribute ``source``
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    golden: list[dict[str, np.ndarray]] = field(default_factory=list)  # feeds, first one is the example
    source: str = ""  # the model component wrapped (``SOURCES[name]``)
    grid: Any = None  # compress.quant.grid.QuantGrid of the source module (names relative to it), or None
    calibration: list[dict[str, np.ndarray]] = field(default_factory=list)  # feeds for static activation quantization
    heldout: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = field(default_factory=list)  # (feed, fp32 output)

    def __post_init__(self) -> None:
        self.source = self.source or SOURCES.get(self.name, self.name)

    @property
    def source_module(self):
        """The wrapped model component (``module.<source>``): what a grid and a layer map name layers of."""
        return getattr(self.module, self.source)

    def example_args(self):
        import torch

        return tuple(torch.from_numpy(self.golden[0][s.name]) for s in self.inputs)


def _wrappers():
    import torch

    from pocketfusion.guidance import guidance_embedding  # the one the student was trained with

    class TextEncoder(torch.nn.Module):
        def __init__(self, text_encoder):
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids):
            return self.text_encoder(input_ids.to(torch.long), return_dict=False)[0]

    class PenultimateTextEncoder(torch.nn.Module):
        """SDXL's first text encoder: its penultimate hidden states."""

        def __init__(self, text_encoder):
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids):
            return self.text_encoder(input_ids.to(torch.long), output_hidden_states=True).hidden_states[-2]

    class TextEncoder2(torch.nn.Module):
        """SDXL's second text encoder (with projection): penultimate hidden states and pooled ``text_embeds``."""

        def __init__(self, text_encoder_2):
            super().__init__()
            self.text_encoder_2 = text_encoder_2

        def forward(self, input_ids):
            out = self.text_encoder_2(input_ids.to(torch.long), output_hidden_states=True)
            return out.hidden_states[-2], out.text_embeds

    TextEncoder.penultimate, TextEncoder.second = PenultimateTextEncoder, TextEncoder2

    class UNet(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet
            self.sdxl = unet.config.addition_embed_type == "text_time"
            self.embedded = getattr(unet.config, "time_cond_proj_dim", None) is not None

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, guidance=None):
            kwargs = {}
            if self.sdxl:
                kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
            if self.embedded:
                kwargs["timestep_cond"] = guidance_embedding(guidance, self.unet.config.time_cond_proj_dim)
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]

    class GuidedUNet(UNet):
        """A guidance-embedded SD-1.x/2.x U-Net: the guidance scale is its fourth input."""

        def forward(self, sample, timestep, encoder_hidden_states, guidance):
            return super().forward(sample, timestep, encoder_hidden_states, guidance=guidance)

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent):
            return self.vae.decode(latent, return_dict=False)[0]

    return TextEncoder, (UNet, GuidedUNet), VaeDecoder


def unet_batch(unet) -> int:
    """The U-Net's batch per sampling step: 1 when it embeds the guidance scale, else 2 (a CFG pair)."""
    return 1 if getattr(unet.config, "time_cond_proj_dim", None) is not None else 2


def fit_feed(feed: dict[str, np.ndarray], specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """A recorded feed (or output) fitted to a spec: a CFG pair keeps its conditional (last) rows when
    the spec's batch is smaller; a missing ``guidance`` input gets the golden guidance scale."""
    out = {}
    for s in specs:
        if s.name not in feed and s.name == "guidance":
            out[s.name] = np.full(s.shape, GOLDEN_GUIDANCE, dtype=np.float32)
            continue
        a = feed[s.name]
        if a.ndim and s.shape and a.shape[0] > s.shape[0]:
            a = a[a.shape[0] - s.shape[0]:]
        out[s.name] = a
    return out


def _unet_inputs(cfg, batch: int, seq_len: int) -> list[TensorSpec]:
    s = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    ctx_dim = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
    inputs = [
        TensorSpec("sample", (batch, cfg.in_channels, s, s), "float32"),
        TensorSpec("timestep", (batch,), "float32"),
        TensorSpec("encoder_hidden_states", (batch, seq_len, ctx_dim), "float32"),
    ]
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs += [TensorSpec("text_embeds", (batch, text_dim), "float32"), TensorSpec("time_ids", (batch, 6), "float32")]
    if getattr(cfg, "time_cond_proj_dim", None) is not None:
        inputs.append(TensorSpec("guidance", (batch,), "float32"))
    return inputs


def heldout_pairs(spec: ComponentSpec, max_feeds: int = 64) -> list:
    """At most ``max_feeds`` of the spec's held-out (feed, fp32 outputs) pairs, evenly strided."""
    return spec.heldout[:: max(1, -(-len(spec.heldout) // max_feeds))]


def session_output_error(session, pairs) -> dict[str, float]:
    """``metrics.output_error`` of ``session``'s outputs on each pair's feed against the pair's reference outputs."""
    from pocketfusion.metrics import output_error

    refs, outs = [], []
    for feed, ref in pairs:
        got = session.run(feed)
        for name, r in ref.items():
            refs.append(np.asarray(r, dtype=np.float32))
            outs.append(np.asarray(got[name], dtype=np.float32).reshape(np.shape(r)))
    return output_error(refs, outs)


def unet_spec(unet, *, batch: int | None = None, seq_len: int, golden: list[dict[str, np.ndarray]] | None = None,
              seed: int = 0) -> ComponentSpec:
    """Spec of a U-Net component at ``batch`` (default: ``unet_batch``); without ``golden`` inputs,
    seeded random ones are made (recorded ones are fitted to the spec: ``fit_feed``)."""
    _, (UNet, GuidedUNet), _ = _wrappers()
    cfg = unet.config
    batch = batch or unet_batch(unet)
    inputs = tuple(_unet_inputs(cfg, batch, seq_len))
    if golden is None:
        rng = np.random.default_rng(seed)
        golden = []
        for t in (999.0, 500.0, 20.0):
            feed = {sp.name: rng.standard_normal(sp.shape).astype(np.float32) for sp in inputs}
            feed["timestep"] = np.full((batch,), t, dtype=np.float32)
            if "time_ids" in feed:
                feed["time_ids"] = np.tile(np.array([[64, 64, 0, 0, 64, 64]], dtype=np.float32), (batch, 1))
            if "guidance" in feed:
                feed["guidance"] = np.full((batch,), GOLDEN_GUIDANCE, dtype=np.float32)
            golden.append(feed)
    else:
        golden = [fit_feed(f, inputs) for f in golden]
    s = inputs[0].shape[2]
    out = (TensorSpec("noise_pred", (batch, cfg.out_channels, s, s), "float32"),)
    wrapper = GuidedUNet if inputs[3:] and inputs[3].name == "guidance" else UNet
    return ComponentSpec("unet", wrapper(unet).eval(), inputs, out, golden, source="unet")


def _token_feeds(tokenizer, prompts: list[str]) -> list[dict[str, np.ndarray]]:
    L = tokenizer.model_max_length
    return [{"input_ids": tokenizer([p], padding="max_length", max_length=L, truncation=True,
                                    return_tensors="np").input_ids.astype(np.int32)} for p in prompts]


def text_encoder_spec(text_encoder, tokenizer, prompts: list[str], *, penultimate: bool = False) -> ComponentSpec:
    """The (first) text encoder: ``last_hidden_state``, or with ``penultimate`` (SDXL) ``penultimate_hidden_state``."""
    TextEncoder, _, _ = _wrappers()
    L = tokenizer.model_max_length
    hidden = text_encoder.config.hidden_size
    wrapper, out = (TextEncoder.penultimate, "penultimate_hidden_state") if penultimate else (TextEncoder, "last_hidden_state")
    return ComponentSpec(
        "text_encoder", wrapper(text_encoder).eval(), (TensorSpec("input_ids", (1, L), "int32"),),
        (TensorSpec(out, (1, L, hidden), "float32"),), _token_feeds(tokenizer, prompts), source="text_encoder",
    )


def text_encoder_2_spec(text_encoder_2, tokenizer_2, prompts: list[str]) -> ComponentSpec:
    """SDXL's second text encoder (a ``CLIPTextModelWithProjection``): ``penultimate_hidden_state`` (1, L, D) and the
    pooled, projected ``text_embeds`` (1, P).

    Raises:
        UserError: the encoder has no projection (a plain ``CLIPTextModel`` gives no ``text_embeds``).
    """
    TextEncoder, _, _ = _wrappers()
    cfg = text_encoder_2.config
    if not hasattr(text_encoder_2, "text_projection"):
        raise UserError(f"text_encoder_2 is a {type(text_encoder_2).__name__}; SDXL's second encoder must be a "
                        "CLIPTextModelWithProjection (its projected pooled output is the U-Net's text_embeds)")
    L = tokenizer_2.model_max_length
    outputs = (TensorSpec("penultimate_hidden_state", (1, L, cfg.hidden_size), "float32"),
               TensorSpec("text_embeds", (1, cfg.projection_dim), "float32"))
    return ComponentSpec("text_encoder_2", TextEncoder.second(text_encoder_2).eval(), (TensorSpec("input_ids", (1, L), "int32"),),
                         outputs, _token_feeds(tokenizer_2, prompts), source="text_encoder_2")


def vae_decoder_spec(vae, latents: list[np.ndarray]) -> ComponentSpec:
    _, _, VaeDecoder = _wrappers()
    from pocketfusion.checkpoint import vae_scale_factor

    shape = tuple(latents[0].shape)
    f = vae_scale_factor(vae)  # AutoencoderKL or AutoencoderTiny
    out_shape = (shape[0], vae.config.out_channels, shape[2] * f, shape[3] * f)
    return ComponentSpec(
        "vae_decoder", VaeDecoder(vae).eval(), (TensorSpec("latent", shape, "float32"),),
        (TensorSpec("image", out_shape, "float32"),), [{"latent": z.astype(np.float32)} for z in latents], source="vae",
    )


def capture_golden(model, prompts: list[str], *, steps: int = 8, guidance: float = GOLDEN_GUIDANCE, seed: int = 0,
                   n_unet: int = 4) -> dict:
    """Real component inputs from a sampling run of the PyTorch pipeline (``calibration.capture``).

    Returns ``{"unet": [...], "vae_decoder": [...]}`` lists: the first prompt's U-Net feeds
    (latent, timestep, context: a CFG pair) at ``n_unet`` timesteps spread over the trajectory, and
    every prompt's final latents (divided by the scaling factor) for the decoder.
    """
    from pocketfusion.calibration.capture import capture

    cset = capture(model, prompts, steps=steps, n_timesteps=n_unet, guidance=guidance, seed=seed, progress=False)
    first = cset.tensors["unet.prompt_index"] == 0
    feeds = [f for f, keep in zip(cset.unet_feeds(), first) if keep]
    return {"unet": feeds, "vae_decoder": [f["latent"] for f in cset.vae_decoder_feeds()]}


def calibration_set(model):
    """The calibration set a model's manifest names (``manifest.calibration``), its content hash
    checked; None when it names none.

    Raises:
        UserError: the set is missing or its content differs from the recorded hash.
    """
    from pocketfusion import artifact
    from pocketfusion.calibration import load

    ref = model.manifest.calibration if model.manifest is not None else None
    if ref is None:
        return None
    path = artifact.resolve_path(model.path, ref.path)
    if not path.is_dir():
        raise UserError(f"{model.path}: the manifest names the calibration set {ref.path}, but {path} does not exist")
    if artifact.content_hash(path) != ref.sha256:
        raise UserError(f"{path}: the calibration set differs from the one {model.path}'s manifest names (content hash mismatch)")
    return load(path)


def _attach_quant(spec: ComponentSpec, model, cset) -> None:
    """The grid of the spec's source component (``compress``), and the calibration feeds of that
    component: its calibration part for static activation quantization, its held-out part with
    the fp32 outputs where the set recorded them (the U-Net)."""
    from pocketfusion.compress.quant.grid import load_grid

    spec.grid = load_grid(model, spec.source)
    if spec.grid is None or cset is None:
        return
    feeds = {"unet": cset.unet_feeds, "text_encoder": cset.text_encoder_feeds, "vae_decoder": cset.vae_decoder_feeds}.get(spec.name)
    if spec.grid.activations and feeds is not None:  # a calibration set records no text_encoder_2 feeds
        spec.calibration = [fit_feed(f, spec.inputs) for f in feeds("calib")]
    if spec.name == "unet":
        spec.heldout = [(fit_feed(f, spec.inputs), fit_feed(o, spec.outputs))
                        for f, o in zip(cset.unet_feeds("heldout"), cset.unet_outputs("heldout"))]


def _bare_specs(model, seed: int) -> list[ComponentSpec]:
    if "unet" in model.components:
        unet = model.components["unet"]
        return [unet_spec(unet, seq_len=77 if unet.config.cross_attention_dim >= 256 else 8, seed=seed)]
    if "vae" in model.components:
        from pocketfusion.checkpoint import latent_size

        vae, h = model.components["vae"], latent_size(model)
        rng = np.random.default_rng(seed)
        return [vae_decoder_spec(vae, [rng.standard_normal((1, vae.config.latent_channels, h, h)) for _ in range(2)])]
    raise UserError(f"{model.path}: a bare {model.class_name} cannot be exported on its own (give a pipeline folder)")


def pipeline_specs(model, prompts: list[str], *, seed: int = 0, names=None) -> list[ComponentSpec]:
    """Specs for every exportable component of a loaded pipeline or bare U-Net / VAE folder (those in
    ``names``, when given), with the quantization grid of each component that has one.

    A pipeline's U-Net batch is its sampler's (``checkpoint.sampler_of(model).unet_batch``); a bare
    U-Net's is ``unet_batch`` (2 unless it embeds the guidance scale).
    """
    from pocketfusion.checkpoint import sampler_of

    if model.kind != "pipeline":
        specs = _bare_specs(model, seed)
    else:
        golden = capture_golden(model, prompts, seed=seed)
        comps = model.components
        sampler = sampler_of(model)
        specs = [text_encoder_spec(comps["text_encoder"], comps["tokenizer"], prompts, penultimate=sampler.sdxl)]
        if sampler.sdxl:
            specs.append(text_encoder_2_spec(comps["text_encoder_2"], comps[sampler.tokenizer_2], prompts))
        specs += [
            unet_spec(comps["unet"], batch=sampler.unet_batch, seq_len=comps["tokenizer"].model_max_length, golden=golden["unet"]),
            vae_decoder_spec(comps["vae"], golden["vae_decoder"]),
        ]
    if names is not None:
        specs = [s for s in specs if s.name in names]
    cset = calibration_set(model) if any(c.grid is not None for c in (model.manifest.components if model.manifest else ())) else None
    for spec in specs:
        _attach_quant(spec, model, cset)
    return specs
