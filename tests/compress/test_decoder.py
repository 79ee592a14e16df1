"""The decoder stage on the tiny fixtures, a few iterations each: the config's validation, the artifact (plain diffusers
loads and samples it; pocketfusion's loader, sampler, info and MACs read it), training beats no training, the
export of a compact decoder with parity, the runtime pipeline over it, resume, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pocketfusion.compress.decoder import DecoderConfig, compress_decoder, tiny_vae, work_dir
from pocketfusion.errors import UserError

# tiny and fast: 16 teacher latents of 4 steps, a width-8 decoder
FAST = dict(channels=8, encoder_channels=8, n_pairs=16, n_heldout=4, teacher_steps=4, teacher_batch=16, batch_size=4,
            checkpoint_every=0)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def compact(tiny_sd, tmp_path_factory):
    """The tiny pipeline with a compact decoder trained for 40 iterations."""
    from pocketfusion.checkpoint import load_model

    out = tmp_path_factory.mktemp("decoder") / "tiny"
    compress_decoder(load_model(tiny_sd), DecoderConfig(iterations=40, **FAST), out, progress=False)
    return out


def test_config_validates_and_round_trips():
    cfg = DecoderConfig(channels=16, decoder_blocks=[1, 1, 1, 1], prompts=None)
    assert cfg.decoder_blocks == (1, 1, 1, 1)
    assert DecoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad, match in [({"kind": "wide"}, "kind='wide'"), ({"keep": 1.0}, "keep=1.0"), ({"keep": 0}, "keep=0"),
                       ({"channels": 0}, "channels=0"), ({"iterations": 0}, "iterations=0"),
                       ({"decoder_blocks": (1,)}, "decoder_blocks"), ({"decoder_blocks": (1, -1, 1, 1)}, "decoder_blocks"),
                       ({"lr": -1.0}, "lr=-1.0"), ({"device": "tpu"}, "device='tpu'"), ({"guidance_range": (5, 2)}, "guidance_range"),
                       ({"train_encoder": 1}, "train_encoder"), ({"batch_size": True}, "batch_size=True"), ({"version": 2}, "version=2"),
                       ({"decoder_blocks": 3}, "sequences of ints"), ({"l1_weight": -0.1}, "l1_weight=-0.1"),
                       ({"edge_weight": float("nan")}, "edge_weight=nan"), ({"ema_decay": 1.0}, "ema_decay=1.0"),
                       ({"ema_decay": 0}, "ema_decay=0")]:
        with pytest.raises(UserError, match=match):
            DecoderConfig(**bad)
    with pytest.raises(UserError, match="unknown keys"):
        DecoderConfig.from_dict({"width": 3})


def test_decoder_loss_terms():
    """MSE alone with both weights 0; the L1 and edge terms add what they say; a blurred edge costs more with the edge term."""
    import torch

    from pocketfusion.compress.decoder.stage import decoder_loss

    x = -torch.ones(2, 3, 8, 8)
    x[..., :, 4:] = 1.0  # a sharp vertical edge
    blurred = x.clone()
    blurred[..., :, 3:5] = 0.0
    off = DecoderConfig(l1_weight=0.0, edge_weight=0.0)
    mse, l1 = torch.nn.functional.mse_loss(blurred, x), torch.nn.functional.l1_loss(blurred, x)
    assert torch.allclose(decoder_loss(blurred, x, off), mse)
    assert torch.allclose(decoder_loss(blurred, x, DecoderConfig(l1_weight=2.0, edge_weight=0.0)), mse + 2 * l1)
    assert decoder_loss(x, x, DecoderConfig(l1_weight=1.0, edge_weight=1.0)) == 0
    edged = decoder_loss(blurred, x, DecoderConfig(l1_weight=0.0, edge_weight=1.0))
    assert edged > mse
    shifted = x + 0.5  # the same error everywhere: no edge error
    assert torch.allclose(decoder_loss(shifted, x, DecoderConfig(l1_weight=0.0, edge_weight=1.0)),
                          torch.nn.functional.mse_loss(shifted, x))


def test_stage_writes_a_pipeline_plain_diffusers_samples(compact, tiny_sd):
    from diffusers import StableDiffusionPipeline

    from pocketfusion import artifact
    from pocketfusion.checkpoint import load_model, sampler_of
    from pocketfusion.generate import GenerateConfig, generate_images
    from pocketfusion.info import describe

    m = artifact.load_manifest(compact)
    assert m.stage == "decoder" and DecoderConfig.from_dict(m.settings) == DecoderConfig(iterations=40, **FAST)
    assert m.source.sha256 == artifact.content_hash(tiny_sd)
    assert {c.name for c in m.components} == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    d, t = m.metrics["decoder"], m.metrics["training"]
    assert d["class"] == "AutoencoderTiny" and d["heldout_latents"] == 4 and np.isfinite(d["psnr_db"]["mean_db"])
    assert d["original"]["macs"] > 0 and d["compact"]["macs"] > 0 and d["compact"]["params"] > 0
    assert t["iterations"] == 40 and t["teacher_pairs"] == 16 and t["wall_s"] > 0 and m.metrics["encoder"]["trained"]
    assert not work_dir(compact, DecoderConfig(**FAST)).exists()  # removed once written
    for name in ("unet", "text_encoder", "tokenizer", "scheduler"):  # the rest of the pipeline is the source's
        assert artifact.content_hash(compact / name) == artifact.content_hash(tiny_sd / name)

    model = load_model(compact)  # pocketfusion's loader: checksums verified, AutoencoderTiny accepted
    assert type(model.components["vae"]).__name__ == "AutoencoderTiny"
    s = sampler_of(model)
    assert s.scaling_factor == 1.0 and s.guidance == "cfg" and m.sampler == s  # the latents are decoded as they are
    assert model.components["vae"].config.scaling_factor == 1.0
    info = describe(model)["components"]["vae_decoder"]
    assert info["class"] == "AutoencoderTiny" and info["macs"]["total"] == d["compact"]["macs"]

    pipe = StableDiffusionPipeline.from_pretrained(str(compact), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.vae).__name__ == "AutoencoderTiny" and pipe.vae_scale_factor == 8
    import torch

    out = pipe(["a large red circle on a blue background, center"], num_inference_steps=3, guidance_scale=4.0,
               generator=[torch.Generator().manual_seed(0)], output_type="np").images
    ours, _ = generate_images(model, ["a large red circle on a blue background, center"], GenerateConfig(steps=3, seed=0))
    assert out.shape == (1, 64, 64, 3)
    assert np.abs((np.clip(out[0], 0, 1) * 255 + 0.5).astype(np.uint8).astype(int) - ours[0].astype(int)).max() <= 1


def test_trained_decoder_beats_an_untrained_one(compact, tiny_sd):
    """PSNR against the original decoder on the same latents: 40 iterations vs none (a test that can fail)."""
    import torch

    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.decoder import stage
    from pocketfusion.metrics import image_psnr

    src = load_model(tiny_sd)
    vae = src.components["vae"]
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(8, 4, 8, 8, generator=g) * 0.8
    ref, _ = stage._targets(vae, latents, torch.device("cpu"))
    ref = stage._to_uint8(ref)
    trained = load_model(compact).components["vae"]
    untrained = tiny_vae(DecoderConfig(**FAST))
    p_trained = image_psnr(ref, stage._decode_uint8(trained, latents, torch.device("cpu")))["mean_db"]
    p_untrained = image_psnr(ref, stage._decode_uint8(untrained, latents, torch.device("cpu")))["mean_db"]
    assert p_trained > p_untrained + 6.0, (p_trained, p_untrained)


def test_pruned_vae_keeps_the_strongest_channels_consistently(tiny_sd):
    """``pruned_vae`` halves every stage (plain diffusers' AutoencoderKL config), keeps one index set per width:
    a channel silenced everywhere in the original (zero weights writing it) is never kept, and with those
    dead channels removed the pruned decoder's output is close to the original's."""
    import torch

    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.decoder import pruned_vae

    vae = load_model(tiny_sd).components["vae"]
    widths = list(vae.config.block_out_channels)
    small = pruned_vae(vae, 0.5)
    assert list(small.config.block_out_channels) == [w // 2 for w in widths] and type(small).__name__ == "AutoencoderKL"
    assert small.config.scaling_factor == vae.config.scaling_factor
    g, g_small = vae.config.norm_num_groups, small.config.norm_num_groups  # a group keeps its channel count
    assert widths[0] // g == (widths[0] // 2) // g_small, (g, g_small)
    # kill the odd channels of every width in a copy of the original: every weight writing them and reading them
    dead = vae.__class__.from_config(vae.config)
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    for k, v in sd.items():
        for d, n in enumerate(v.shape):
            if n in widths and not k.endswith(("norm1.weight", "norm2.weight", "conv_norm_out.weight", "group_norm.weight")):
                idx = torch.arange(1, n, 2)
                v.index_fill_(d, idx, 0.0)
    dead.load_state_dict(sd)
    kept = pruned_vae(dead, 0.5).state_dict()
    for k, v in kept.items():
        if v.ndim >= 2 and v.shape[0] in [w // 2 for w in widths] and sd[k].shape[0] in widths:
            assert v.flatten(1).abs().sum(1).gt(0).all(), f"{k}: a dead channel was kept"


def test_pruned_vae_keeps_whole_groupnorm_groups():
    """``keep`` is rounded to whole GroupNorm groups where every stage's width is a multiple of the group count: the
    demo VAE (16/32/64/64 channels, 8 groups) at 0.4 keeps 3 groups a stage (6/12/24/24), each group as wide as
    before, and the pruned VAE runs."""
    import torch

    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.decoder import pruned_vae

    vae = load_model("demo").components["vae"]
    widths, g = list(vae.config.block_out_channels), vae.config.norm_num_groups
    for keep, groups in ((0.4, 3), (0.5, 4), (0.2, 2)):
        small = pruned_vae(vae, keep)
        assert small.config.norm_num_groups == groups
        assert list(small.config.block_out_channels) == [w // g * groups for w in widths]
    with torch.no_grad():
        assert small.decode(torch.zeros(1, 4, 8, 8)).sample.shape == (1, 3, 64, 64)


def test_pruned_vae_per_stage_widths():
    """``widths`` sets each stage's channels (the high-resolution stages wider, the rest at a runtime's channel block):
    the most GroupNorm groups that divide every width and keep a group at least as wide as the original's narrowest;
    the kept channels are the ones ``keep`` ranks first; widths the original cannot give are refused."""
    import torch

    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.decoder import pruned_vae
    from pocketfusion.compress.decoder.stage import pruned_shape

    vae = load_model("demo").components["vae"]
    small = pruned_vae(vae, 0.4, (6, 12, 16, 16))
    assert list(small.config.block_out_channels) == [6, 12, 16, 16] and small.config.norm_num_groups == 2
    assert pruned_shape(vae.config, 0.4, (6, 12, 24, 24)) == pruned_shape(vae.config, 0.4)  # = keep 0.375's
    # the 64-wide stages keep the same 16 channels whichever way the cut is asked for (one index set per width)
    by_keep = pruned_vae(vae, 0.25).state_dict()
    for k, v in small.state_dict().items():
        if v.shape[0] == 16 and by_keep[k].shape == v.shape:
            assert torch.equal(v, by_keep[k]), k
    with torch.no_grad():
        assert small.decode(torch.zeros(1, 4, 8, 8)).sample.shape == (1, 3, 64, 64)
    for widths, match in [((6, 12, 16), "4 stages"), ((6, 12, 16, 20), "equal widths"), ((20, 12, 16, 16), "cannot grow")]:
        with pytest.raises(UserError, match=match):
            pruned_vae(vae, 0.4, widths)
    with pytest.raises(UserError, match="only for kind='pruned'"):
        DecoderConfig(widths=(6, 12, 16, 16))


def test_pruned_decoder_stage(tiny_sd, tmp_path):
    """``kind="pruned"``: an AutoencoderKL with half the channels, the original's latent scaling, trained to beat its
    own initialisation; plain diffusers loads it; a second decoder stage on it is refused."""
    import torch
    from diffusers import AutoencoderKL

    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.decoder import pruned_vae, stage
    from pocketfusion.metrics import image_psnr

    src = load_model(tiny_sd)
    vae = src.components["vae"]
    out = tmp_path / "pruned"
    fast = {k: v for k, v in FAST.items() if k not in ("channels", "encoder_channels")}
    m = compress_decoder(src, DecoderConfig(kind="pruned", iterations=40, lr=1e-3, **fast), out, progress=False)
    d = m.metrics["decoder"]
    assert d["class"] == "AutoencoderKL" and d["macs_ratio"] > 2.5, d
    assert m.sampler.scaling_factor == vae.config.scaling_factor
    loaded = AutoencoderKL.from_pretrained(out / "vae")  # plain diffusers
    assert list(loaded.config.block_out_channels) == [w // 2 for w in vae.config.block_out_channels]
    latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(7)) * 0.8
    ref = stage._to_uint8(stage._targets(vae, latents, torch.device("cpu"))[0])
    p_trained = image_psnr(ref, stage._decode_uint8(loaded, latents, torch.device("cpu")))["mean_db"]
    p_init = image_psnr(ref, stage._decode_uint8(pruned_vae(vae, 0.5), latents, torch.device("cpu")))["mean_db"]
    assert p_trained > p_init + 1.5, (p_trained, p_init)
    with pytest.raises(UserError, match="already a compact one"):
        compress_decoder(load_model(out), DecoderConfig(kind="pruned", **fast), tmp_path / "again", progress=False)


def test_export_onnx_parity_and_runtime_pipeline(compact, tmp_path):
    pytest.importorskip("onnxruntime")
    from pocketfusion import artifact
    from pocketfusion.checkpoint import load_model
    from pocketfusion.export.api import export
    from pocketfusion.export.base import ExportConfig
    from pocketfusion.generate import GenerateConfig, generate_images
    from pocketfusion.metrics import psnr
    from pocketfusion.runtimes.pipeline import RuntimePipeline

    out = tmp_path / "exp"
    m = export(load_model(compact), ExportConfig(targets=("onnx",)), out, progress=False)
    dec = m.component("vae_decoder", "onnx")
    assert dec.inputs[0].shape == (1, 4, 8, 8) and dec.outputs[0].shape == (1, 3, 64, 64)
    p = m.metrics["components"]["onnx/vae_decoder"]["parity"]
    assert p["status"] == "pass" and p["rel_max"] < 1e-4
    assert m.sampler.scaling_factor == 1.0 and artifact.load_manifest(out).sampler == m.sampler

    prompt = "a small yellow square on a black background, top left"
    img = RuntimePipeline(out, "onnxruntime")(prompt, steps=3, seed=0)
    ref, _ = generate_images(load_model(compact), [prompt], GenerateConfig(steps=3, seed=0))
    assert psnr(img, ref[0]) > 40  # the runtime pipeline decodes what PyTorch decodes (same scaling)


def test_resume_reuses_cached_latents(tiny_sd, tmp_path):
    from pocketfusion import artifact
    from pocketfusion.checkpoint import load_model

    model, out = load_model(tiny_sd), tmp_path / "r"
    first = DecoderConfig(iterations=4, keep_work=True, **{**FAST, "checkpoint_every": 2})
    compress_decoder(model, first, out, progress=False)
    assert (work_dir(out, first) / "checkpoints").is_dir()
    m = compress_decoder(model, DecoderConfig(iterations=6, resume=True, keep_work=True, **{**FAST, "checkpoint_every": 2}), out,
                         progress=False)
    t = m.metrics["training"]
    assert t["resumed_from"] == 4 and t["iterations"] == 6 and t["teacher_pairs_cached"]
    assert artifact.load_manifest(out).stage == "decoder"
    with pytest.raises(UserError, match="settings changed"):
        compress_decoder(model, DecoderConfig(iterations=6, resume=True, **{**FAST, "channels": 4}), out, progress=False)


def test_bad_inputs(tiny_sd, compact, tmp_path):
    from pocketfusion.checkpoint import load_model

    with pytest.raises(UserError, match="already a AutoencoderTiny"):
        compress_decoder(load_model(compact), DecoderConfig(**FAST), tmp_path / "x", progress=False)
    with pytest.raises(UserError, match="3 stages"):
        compress_decoder(load_model(tiny_sd), DecoderConfig(**{**FAST, "decoder_blocks": (1, 1, 1)}), tmp_path / "x", progress=False)
    with pytest.raises(UserError, match="bare"):
        compress_decoder(load_model(tiny_sd / "unet"), DecoderConfig(**FAST), tmp_path / "x", progress=False)
    with pytest.raises(UserError, match="source model folder"):
        compress_decoder(load_model(tiny_sd), DecoderConfig(**FAST), tiny_sd, progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_decoder(tiny_sd, tmp_path, capsys):
    from pocketfusion import artifact
    from pocketfusion.cli import main

    out = tmp_path / "d"
    rc = main(["decoder", str(tiny_sd), "--kind", "tiny", "--channels", "8", "--iterations", "2", "--batch-size", "4",
               "--pairs", "8", "--teacher-steps", "3", "-o", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and f"wrote {out}/" in printed and "PSNR vs the original decoder" in printed
    assert artifact.load_manifest(out).stage == "decoder"
    for argv, err in [(["--iterations", "0"], "iterations=0"), (["--channels", "-3"], "channels=-3"),
                      (["--prompts", str(tmp_path / "nope.txt")], "error: --prompts"), (["--batch-size", "0"], "batch_size=0"),
                      (["--kind", "pruned", "--widths", "6,x"], "--widths '6,x'"),
                      (["--kind", "pruned", "--widths", "1,1"], "give one width per stage")]:
        assert main(["decoder", str(tiny_sd), *argv, "-o", str(tmp_path / "bad")]) == 2
        assert err in capsys.readouterr().err
    assert main(["decoder", str(out), "-o", str(tmp_path / "bad")]) == 2  # already compact
    assert "already a AutoencoderTiny" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["decoder", str(tiny_sd), "--kind", "wide", "-o", str(tmp_path / "bad")])
    assert e.value.code == 2
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # ~2 min: the default 512 teacher latents of 50 steps, then GPTQ
def test_cli_compress_decoder_then_quantize(tiny_sd, tmp_path, capsys):
    from pocketfusion import artifact
    from pocketfusion.cli import main

    out = tmp_path / "c"
    rc = main(["compress", str(tiny_sd), "--decoder", "tiny", "--decoder-iterations", "2", "--quant", "w8", "--num-prompts", "4",
               "-o", str(out)])
    assert rc == 0 and "decoder stage" in capsys.readouterr().out
    dec, quant = artifact.load_manifest(tmp_path / "c-decoder"), artifact.load_manifest(out)
    assert dec.stage == "decoder" and quant.source.sha256 == artifact.content_hash(tmp_path / "c-decoder")
    assert quant.sampler.scaling_factor == 1.0
    assert json.loads((out / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderTiny"]
