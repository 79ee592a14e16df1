"""Pipeline components as exportable modules with static, named tensor interfaces.

Every exporter sees the same three wrappers, so input/output names and dtypes agree across
targets and with ``pocketfusion.pipeline``:

=============  ===========================================================  ===================
component      inputs (static shapes, batch B)                              output
=============  ===========================================================  ===================
text_encoder   input_ids int32 (B, L)                                       last_hidden_state
unet           sample (B, C, h, w), timestep float32 (B,),                  noise_pred
               encoder_hidden_states (B, L, D)
               [+ text_embeds (B, T), time_ids (B, 6) for SDXL]
vae_decoder    latent (B, C, h, w) — already divided by the scaling factor  image in [-1, 1]
=============  ===========================================================  ===================

The U-Net is exported at batch 2 (the two halves of a classifier-free-guidance step); the text
encoder and decoder at batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

COMPONENTS = ("text_encoder", "unet", "vae_decoder")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


@dataclass
class ComponentSpec:
    """One exportable component: the wrapper module, its I/O specs and golden input sets."""

    name: str
    module: object  # torch.nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    golden: list[dict[str, np.ndarray]] = field(default_factory=list)  # feeds, first one is the example
    quant: object = None  # compress.grid.QuantGrid of the U-Net (names relative to module.unet), or None
    calibration: list[dict[str, np.ndarray]] = field(default_factory=list)  # U-Net feeds for static activation quantization
    heldout: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = field(default_factory=list)  # (feed, fp32 output): calibration's held-out part

    def example_args(self):
        import torch

        return tuple(torch.from_numpy(self.golden[0][s.name]) for s in self.inputs)


def _wrappers():
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, text_encoder):
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids):
            return self.text_encoder(input_ids.to(torch.long), return_dict=False)[0]

    class UNet(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet
            self.sdxl = unet.config.addition_embed_type == "text_time"

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
            kwargs = {}
            if self.sdxl:
                kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent):
            return self.vae.decode(latent, return_dict=False)[0]

    return TextEncoder, UNet, VaeDecoder


def unet_spec(unet, *, batch: int = 2, seq_len: int, golden: list[dict[str, np.ndarray]] | None = None, seed: int = 0) -> ComponentSpec:
    """Spec of a U-Net component; without ``golden`` inputs, seeded random ones are made."""
    _, UNet, _ = _wrappers()
    cfg = unet.config
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
    if golden is None:
        rng = np.random.default_rng(seed)
        golden = []
        for t in (999.0, 500.0, 20.0):
            feed = {sp.name: rng.standard_normal(sp.shape).astype(np.float32) for sp in inputs}
            feed["timestep"] = np.full((batch,), t, dtype=np.float32)
            if "time_ids" in feed:
                feed["time_ids"] = np.tile(np.array([[64, 64, 0, 0, 64, 64]], dtype=np.float32), (batch, 1))
            golden.append(feed)
    out = (TensorSpec("noise_pred", (batch, cfg.out_channels, s, s), "float32"),)
    return ComponentSpec("unet", UNet(unet).eval(), tuple(inputs), out, golden)


def text_encoder_spec(text_encoder, tokenizer, prompts: list[str]) -> ComponentSpec:
    TextEncoder, _, _ = _wrappers()
    L = tokenizer.model_max_length
    golden = []
    for p in prompts:
        ids = tokenizer([p], padding="max_length", max_length=L, truncation=True, return_tensors="np").input_ids
        golden.append({"input_ids": ids.astype(np.int32)})
    hidden = text_encoder.config.hidden_size
    return ComponentSpec(
        "text_encoder", TextEncoder(text_encoder).eval(), (TensorSpec("input_ids", (1, L), "int32"),),
        (TensorSpec("last_hidden_state", (1, L, hidden), "float32"),), golden,
    )


def vae_decoder_spec(vae, latents: list[np.ndarray]) -> ComponentSpec:
    _, _, VaeDecoder = _wrappers()
    shape = tuple(latents[0].shape)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    out_shape = (shape[0], vae.config.out_channels, shape[2] * f, shape[3] * f)
    return ComponentSpec(
        "vae_decoder", VaeDecoder(vae).eval(), (TensorSpec("latent", shape, "float32"),),
        (TensorSpec("image", out_shape, "float32"),), [{"latent": z.astype(np.float32)} for z in latents],
    )


def capture_golden(model, prompts: list[str], *, steps: int = 8, guidance: float = 4.0, seed: int = 0, n_unet: int = 4) -> dict:
    """Real component inputs from a sampling run of the PyTorch pipeline (``calibration.capture``).

    Returns ``{"unet": [...], "vae_decoder": [...]}`` lists: the first prompt's U-Net feeds
    (latent, timestep, CFG context pair) at ``n_unet`` timesteps spread over the trajectory, and
    every prompt's final latents (divided by the scaling factor) for the decoder.
    """
    from pocketfusion.calibration.capture import capture

    cset = capture(model, prompts, steps=steps, n_timesteps=n_unet, guidance=guidance, seed=seed, progress=False)
    first = cset.tensors["unet.prompt_index"] == 0
    feeds = [f for f, keep in zip(cset.unet_feeds(), first) if keep]
    return {"unet": feeds, "vae_decoder": [f["latent"] for f in cset.vae_decoder_feeds()]}


def _attach_quant(spec: ComponentSpec, model) -> None:
    """The grid of a `compress --quant` U-Net, and its calibration feeds when activations are quantized."""
    spec.quant = model.quant
    calib = model.path / "calibration"
    if model.quant is not None and calib.is_dir():
        from pocketfusion.calibration import load

        cset = load(calib)
        if model.quant.activations:
            spec.calibration = cset.unet_feeds("calib")
        spec.heldout = list(zip(cset.unet_feeds("heldout"), cset.unet_outputs("heldout")))


def pipeline_specs(model, prompts: list[str], *, seed: int = 0) -> list[ComponentSpec]:
    """Specs for every exportable component of a loaded pipeline or bare U-Net."""
    if model.kind != "pipeline":
        unet = model.components["unet"]
        spec = unet_spec(unet, seq_len=77 if unet.config.cross_attention_dim >= 256 else 8, seed=seed)
        _attach_quant(spec, model)
        return [spec]
    golden = capture_golden(model, prompts, seed=seed)
    comps = model.components
    unet = unet_spec(comps["unet"], seq_len=comps["tokenizer"].model_max_length, golden=golden["unet"])
    _attach_quant(unet, model)
    return [
        text_encoder_spec(comps["text_encoder"], comps["tokenizer"], prompts),
        unet,
        vae_decoder_spec(comps["vae"], golden["vae_decoder"]),
    ]
