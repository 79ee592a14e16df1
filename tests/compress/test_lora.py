"""The LoRA stage on the tiny SD-1.5 fixture: files in each format (PEFT with and without its adapter metadata, the
older diffusers names, kohya with alphas, mixed ranks and 3x3 convolution LoRAs), merged by us and by diffusers'
own ``load_lora_weights`` + ``fuse_lora``: every weight of the U-Net and the text encoder agrees. Then the stage's
folder (plain diffusers loads it), its manifest, the one-line errors, and the CLI (``pocketfusion lora``, ``--lora``
on commands that load MODEL, exit 2 on bad input). No training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pocketfusion.compress.lora import LoraConfig, LoraFile, annotate, merge_in_memory, merge_lora, read_lora
from pocketfusion.errors import UserError

pytest.importorskip("peft")  # diffusers' LoRA loading (the reference) needs it: pip install 'pocketfusion[dev]'

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
                "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# every kind of layer above, in three blocks only (PEFT's adapter injection is most of these tests' time)
UNET_BLOCKS = r"^(down_blocks\.1|mid_block|up_blocks\.1)\..*\.(" + "|".join(t.replace(".", r"\.") for t in UNET_TARGETS) + ")$"
TOL = 1e-6


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _pipe(path):
    from diffusers import DiffusionPipeline

    sdxl = "XL" in json.loads((Path(path) / "model_index.json").read_text())["_class_name"]
    kw = {} if sdxl else dict(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(str(path), **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _random_lora(tiny_sd, seed: int, *, r: int = 4, alpha: float = 8.0, rank_pattern=None, te: bool = True):
    """PEFT adapters with random A and B on the tiny pipeline's U-Net (and text encoders): ``{component: (state dict,
    PEFT config)}``, state dicts as ``get_peft_model_state_dict`` returns them; ``rank_pattern`` per component."""
    import torch
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model_state_dict

    pipe = _pipe(tiny_sd)
    torch.manual_seed(seed)
    out = {}
    comps = [("unet", UNET_BLOCKS)] + [(n, TE_TARGETS) for n in ("text_encoder", "text_encoder_2") if te and hasattr(pipe, n)]
    for name, targets in comps:
        comp = getattr(pipe, name)
        cfg = PeftConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=targets,
                         rank_pattern=(rank_pattern or {}).get(name, {}))
        comp.add_adapter(cfg)
        out[name] = ({k: v.detach().clone() for k, v in get_peft_model_state_dict(comp).items()}, comp.peft_config["default"])
    return out


def _layers(lora):
    """``{(component, module path): (A, B)}`` of ``_random_lora``'s state dicts."""
    layers = {}
    for comp, (sd, _) in lora.items():
        for k, v in sd.items():
            path, _, role = k.rpartition(".lora_")
            layers.setdefault((comp, path), {})[role[0]] = v
    return {k: (v["A"], v["B"]) for k, v in layers.items()}


def write_peft(out: Path, lora, *, metadata: bool) -> Path:
    """The file diffusers' ``save_lora_weights`` writes (``unet.*.lora_A.weight``; the PEFT configs as metadata or not)."""
    from diffusers import StableDiffusionPipeline

    meta = {f"{c}_lora_adapter_metadata": cfg.to_dict() for c, (_, cfg) in lora.items()} if metadata else {}
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=lora["unet"][0],
                                              text_encoder_lora_layers=lora["text_encoder"][0] if "text_encoder" in lora else None,
                                              **meta)
    return out / "pytorch_lora_weights.safetensors"


def write_kohya(out: Path, lora, alpha: float | None, te: str = "lora_te_") -> Path:
    """The same A and B in kohya's names (``lora_unet_<path with _>.lora_down.weight``), each with ``alpha``."""
    import torch
    from safetensors.torch import save_file

    prefix = {"unet": "lora_unet_", "text_encoder": te, "text_encoder_2": "lora_te2_"}
    sd = {}
    for (comp, path), (a, b) in _layers(lora).items():
        name = prefix[comp] + path.replace(".", "_")
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = a.contiguous(), b.contiguous()
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out))
    return out


def write_old_diffusers(out: Path, lora) -> Path:
    """The older diffusers names: attention processors (``attn1.processor.to_q_lora.down.weight``, the text encoder's
    ``self_attn.to_q_lora``), ``.lora.down.weight`` elsewhere in the U-Net, ``.lora_linear_layer.`` in the text encoder."""
    from safetensors.torch import save_file

    unet_proc = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    te_proc = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
    sd = {}
    for (comp, path), (a, b) in _layers(lora).items():
        proc = unet_proc if comp == "unet" else te_proc
        hit = next((k for k in proc if path.endswith("." + k)), None)
        if hit is not None:
            stem = f"{comp}.{path[:-len(hit) - 1]}{'.processor' if comp == 'unet' else ''}.{proc[hit]}"
        else:
            stem = f"{comp}.{path}.{'lora' if comp == 'unet' else 'lora_linear_layer'}"
        sd[f"{stem}.down.weight"], sd[f"{stem}.up.weight"] = a.contiguous(), b.contiguous()
    save_file(sd, str(out))
    return out


def diffusers_fused(tiny_sd, files: list[tuple[Path, float]]):
    """diffusers' own merge: ``load_lora_weights`` + ``fuse_lora(lora_scale=)`` per file, in order."""
    pipe = _pipe(tiny_sd)
    for f, scale in files:
        pipe.load_lora_weights(str(f.parent), weight_name=f.name)
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()  # the fused weights stay
    return {c: getattr(pipe, c).state_dict() for c in ("unet", "text_encoder", "text_encoder_2") if hasattr(pipe, c)}


def assert_same(model_components, ref, base=None):
    """Every weight of the U-Net and text encoder within TOL of diffusers'; and the LoRA did change them."""
    changed = 0
    for comp in ref:
        ours = model_components[comp].state_dict()
        assert ours.keys() == ref[comp].keys()
        for k, v in ours.items():
            err = (v.float() - ref[comp][k].float()).abs().max().item() if v.numel() else 0.0
            assert err <= TOL, f"{comp}.{k}: max abs error {err:.3g} vs diffusers' fuse_lora"
            if base is not None and v.numel() and not (v == base[comp][k]).all():
                changed += 1
    if base is not None:
        assert changed > 0


@pytest.fixture(scope="module")
def base(tiny_sd):
    from pocketfusion.checkpoint import load_model

    m = load_model(tiny_sd)
    return {c: {k: v.clone() for k, v in m.components[c].state_dict().items()} for c in ("unet", "text_encoder")}


@pytest.fixture(scope="module")
def loras(tiny_sd, tmp_path_factory):
    """One file per format; the kohya one has rank 2 in the first resnet's convolutions and alpha 2."""
    d = tmp_path_factory.mktemp("loras")
    mixed = _random_lora(tiny_sd, 1, r=4, alpha=8.0, rank_pattern={"unet": {"down_blocks.1.resnets.0.conv1": 2},
                                                                      "text_encoder": {"fc1": 2}})
    plain = _random_lora(tiny_sd, 2, r=4, alpha=4.0)
    return {
        "peft_meta": write_peft(d / "peft-meta", mixed, metadata=True),
        "peft": write_peft(d / "peft", plain, metadata=False),
        "kohya": write_kohya(d / "kohya" / "style.safetensors", mixed, alpha=2.0),
        "kohya_noalpha": write_kohya(d / "kohya" / "noalpha.safetensors", plain, alpha=None),
        "old": write_old_diffusers(d / "old.safetensors", plain),
    }


def _ours(tiny_sd, specs, **kw):
    from pocketfusion.checkpoint import load_model

    m = load_model(tiny_sd)
    records = merge_in_memory(m, LoraConfig(loras=specs, **kw))
    return m, records


@pytest.mark.parametrize("name,scale,fmt", [("peft_meta", 0.7, "peft"), ("peft", 1.0, "peft"), ("kohya", 1.3, "kohya"),
                                            ("kohya_noalpha", -0.5, "kohya"), ("old", 1.0, "diffusers")])
def test_merge_equals_diffusers_fuse_lora(tiny_sd, loras, base, name, scale, fmt):
    m, records = _ours(tiny_sd, [(loras[name], scale)])
    assert_same(m.components, diffusers_fused(tiny_sd, [(loras[name], scale)]), base)
    r = records[0]
    assert r["format"] == fmt and r["scale"] == scale and r["unmatched_keys"] == 0
    n_layers = r["layers"]["unet"] + r["layers"]["text_encoder"]
    assert r["matched_keys"] == n_layers * (3 if name == "kohya" else 2)  # down, up (and alpha)
    assert r["layers"]["text_encoder"] == 6 and r["layers"]["unet"] > 20


def test_demo_model_kohya_lora_equals_diffusers(tmp_path):
    """The bundled demo teacher (wider than the fixture, 8x8 latents): a kohya LoRA with alpha != rank."""
    from pocketfusion.checkpoint import DEMO_MODEL

    f = write_kohya(tmp_path / "demo.safetensors", _random_lora(DEMO_MODEL, 3, r=8, alpha=4.0), alpha=4.0)
    m, records = _ours(DEMO_MODEL, [(f, 0.8)])
    assert_same(m.components, diffusers_fused(DEMO_MODEL, [(f, 0.8)]))
    assert records[0]["unmatched_keys"] == 0 and records[0]["layers"]["text_encoder"] > 0


def test_sdxl_two_text_encoders_equal_diffusers(tmp_path_factory):
    """SDXL (the tiny fixture): kohya's lora_te1_ / lora_te2_ and a PEFT file with text_encoder_2 keys."""
    from pocketfusion.testing.fixtures import save_tiny_pipeline

    d = tmp_path_factory.mktemp("sdxl")
    save_tiny_pipeline(d / "sdxl", "sdxl")
    lora = _random_lora(d / "sdxl", 4, r=2, alpha=1.0)
    kohya = write_kohya(d / "k" / "xl.safetensors", lora, alpha=1.0, te="lora_te1_")
    peft = d / "p" / "xl.safetensors"
    (d / "p").mkdir()
    from safetensors.torch import save_file

    save_file({f"{c}.{k}": v.contiguous() for c, (sd, _) in lora.items() for k, v in sd.items()}, str(peft))
    for f, fmt in ((kohya, "kohya"), (peft, "peft")):
        m, records = _ours(d / "sdxl", [(f, 0.6)])
        assert_same(m.components, diffusers_fused(d / "sdxl", [(f, 0.6)]))
        assert records[0]["format"] == fmt and records[0]["layers"]["text_encoder_2"] > 0


def test_kohya_conv_lora_is_3x3_down_1x1_up(loras):
    w = read_lora(loras["kohya"])
    conv = next(x for x in w.layers if x.name == "down_blocks_1_resnets_0_conv2")
    assert tuple(conv.down.shape[2:]) == (3, 3) and tuple(conv.up.shape[2:]) == (1, 1) and conv.alpha == 2.0
    assert next(x for x in w.layers if x.name == "down_blocks_1_resnets_0_conv1").down.shape[0] == 2  # rank 2 there
    assert {x.name.split("_")[-1] for x in w.layers if x.component == "unet"} >= {"q", "k", "v", "0", "in", "out", "conv1", "conv2",
                                                                                  "shortcut", "proj", "2"}


def test_several_loras_merge_in_order(tiny_sd, loras, base):
    files = [(loras["kohya"], 0.5), (loras["peft"], 1.5)]
    m, records = _ours(tiny_sd, files)
    assert_same(m.components, diffusers_fused(tiny_sd, files), base)
    assert [r["path"] for r in records] == [str(loras["kohya"]), str(loras["peft"])]


def test_config_parses_and_round_trips(tmp_path):
    cfg = LoraConfig(loras=["a.safetensors", ("b.safetensors", 0.5), {"path": "c.safetensors", "scale": 2}])
    assert cfg.loras == (LoraFile("a.safetensors", 1.0), LoraFile("b.safetensors", 0.5), LoraFile("c.safetensors", 2.0))
    assert LoraConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad, match in [({"loras": []}, "no LoRA files"), ({"loras": [("a", float("nan"))]}, "finite"),
                       ({"loras": ["a"], "version": 2}, "version=2"), ({"loras": ["a"], "allow_unmatched": 1}, "allow_unmatched"),
                       ({"loras": ["a"], "x": 1}, "unknown keys")]:
        with pytest.raises(UserError, match=match):
            LoraConfig.from_dict(bad)


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_pickled_files_are_refused_never_unpickled(tiny_sd, tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "unpickled",))

    for name in ("lora.ckpt", "lora.pt", "lora.bin"):
        (tmp_path / name).write_bytes(pickle.dumps(Boom()))
        with pytest.raises(UserError, match="pickled") as e:
            _ours(tiny_sd, [tmp_path / name])
        _one_line(e)
    (tmp_path / "renamed.safetensors").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(UserError, match="not a readable safetensors file") as e:
        _ours(tiny_sd, [tmp_path / "renamed.safetensors"])
    _one_line(e)
    assert not (tmp_path / "unpickled").exists()


def test_wrong_shapes_name_the_layer_and_both_shapes(tiny_sd, tmp_path):
    import torch
    from safetensors.torch import save_file

    path = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"lora_unet_{path}.lora_down.weight": torch.zeros(4, 320), f"lora_unet_{path}.lora_up.weight": torch.zeros(320, 4)},
              str(tmp_path / "sd15-full.safetensors"))
    with pytest.raises(UserError) as e:
        _ours(tiny_sd, [tmp_path / "sd15-full.safetensors"])
    msg = _one_line(e)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in msg and "(320, 320)" in msg and "(8, 8)" in msg


def test_unmatched_keys_are_named_or_skipped_when_allowed(tiny_sd, tmp_path, loras):
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(str(loras["kohya"]))
    for i in range(7):
        sd[f"lora_unet_input_blocks_{i}_1_proj_in.lora_down.weight"] = torch.zeros(2, 8)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(UserError, match="7 of .* keys name no layer") as e:
        _ours(tiny_sd, [tmp_path / "extra.safetensors"])
    msg = _one_line(e)
    assert "lora_unet_input_blocks_0_1_proj_in.lora_down.weight" in msg and "and 2 more" in msg and "--allow-unmatched" in msg
    _, records = _ours(tiny_sd, [(tmp_path / "extra.safetensors", 1.0)], allow_unmatched=True)
    assert records[0]["unmatched_keys"] == 7 and records[0]["matched_keys"] == len(load_file(str(loras["kohya"])))
    save_file({"model.diffusion_model.foo.weight": torch.zeros(2)}, str(tmp_path / "none.safetensors"))
    with pytest.raises(UserError, match="no LoRA weights found"):
        _ours(tiny_sd, [tmp_path / "none.safetensors"])
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(UserError, match="down matrix but no up matrix"):
        _ours(tiny_sd, [tmp_path / "half.safetensors"])


def test_a_bad_file_leaves_the_model_unchanged(tiny_sd, tmp_path, loras, base):
    from pocketfusion.checkpoint import load_model

    m = load_model(tiny_sd)
    with pytest.raises(UserError):
        merge_in_memory(m, LoraConfig(loras=[loras["kohya"], tmp_path / "missing.safetensors"]))
    assert all((v == base["unet"][k]).all() for k, v in m.unet.state_dict().items())


def test_stage_writes_a_folder_plain_diffusers_loads(tiny_sd, loras, base, tmp_path):
    from pocketfusion import artifact
    from pocketfusion.checkpoint import load_model

    files = [(loras["peft_meta"], 0.7), (loras["kohya"], 1.0)]
    out = tmp_path / "merged"
    manifest = merge_lora(load_model(tiny_sd), LoraConfig(loras=files), out)
    ref = diffusers_fused(tiny_sd, files)
    assert_same(_pipe(out).components, ref, base)  # plain diffusers
    assert_same(load_model(out).components, ref)  # pocketfusion's loader (checksums verified)
    m = artifact.load_manifest(out)
    assert m.stage == "lora" and m.source.sha256 == artifact.content_hash(tiny_sd)
    assert LoraConfig.from_dict(m.settings) == LoraConfig(loras=files)
    recs = m.metrics["lora"]["loras"]
    assert [(r["format"], r["scale"], r["sha256"]) for r in recs] == [
        ("peft", 0.7, artifact.sha256_file(loras["peft_meta"])), ("kohya", 1.0, artifact.sha256_file(loras["kohya"]))]
    assert all(r["matched_keys"] > 0 and r["unmatched_keys"] == 0 for r in recs) and len(m.notes) == 2
    assert m.sampler is not None and {c.name for c in m.components} >= {"unet", "text_encoder", "vae"}
    assert (out / "vae").is_dir() and manifest.stage == "lora"


def test_stage_on_a_bare_unet_folder(tiny_sd, loras, base, tmp_path):
    """A bare U-Net folder: the LoRA's text-encoder keys name nothing there (an error, or skipped when allowed)."""
    from diffusers import UNet2DConditionModel

    from pocketfusion import artifact
    from pocketfusion.checkpoint import load_model

    with pytest.raises(UserError, match="18 of .* keys name no layer .*UNet2DConditionModel.*it has no text_encoder.*--allow-unmatched"):
        merge_lora(load_model(tiny_sd / "unet"), LoraConfig(loras=[loras["kohya"]]), tmp_path / "u")
    merge_lora(load_model(tiny_sd / "unet"), LoraConfig(loras=[loras["kohya"]], allow_unmatched=True), tmp_path / "u")
    ref = diffusers_fused(tiny_sd, [(loras["kohya"], 1.0)])["unet"]
    assert_same({"unet": UNet2DConditionModel.from_pretrained(str(tmp_path / "u"))}, {"unet": ref}, {"unet": base["unet"]})
    m = artifact.load_manifest(tmp_path / "u")
    assert m.metrics["lora"]["loras"][0]["unmatched_keys"] == 18 and "unmatched keys skipped" in m.notes[0]


def test_annotate_records_in_memory_loras(tmp_path):
    from pocketfusion import artifact

    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "sub" / "f.txt").write_text("x")
    artifact.write_manifest(tmp_path / "a", stage="export", settings={}, source=None)
    artifact.write_manifest(tmp_path / "a" / "sub", stage="compress", settings={}, source=None)
    rec = [{"path": "/x/style.safetensors", "sha256": "0" * 64, "format": "kohya", "scale": 0.5, "matched_keys": 3,
            "unmatched_keys": 0, "layers": {"unet": 1}, "unmatched": []}]
    assert len(annotate(tmp_path / "a", rec)) == 2
    m = artifact.load_manifest(tmp_path / "a")  # still verifies
    assert m.metrics["lora"] == {"merged_into": None, "loras": rec} and "style.safetensors (scale 0.5): merged in memory" in m.notes[-1]


# --- CLI ---------------------------------------------------------------------------------------------------------


def _cli(argv, capsys):
    from pocketfusion.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    return rc, capsys.readouterr()


def test_cli_lora_stage(tiny_sd, loras, base, tmp_path, capsys):
    out = tmp_path / "cli-merged"
    rc, cap = _cli(["lora", tiny_sd, "--lora", f"{loras['kohya']}:0.5", "--lora", loras["peft"], "-o", out], capsys)
    assert rc == 0, cap.err
    assert "style.safetensors: kohya, scale 0.5" in cap.out
    assert_same(_pipe(out).components, diffusers_fused(tiny_sd, [(loras["kohya"], 0.5), (loras["peft"], 1.0)]), base)


@pytest.mark.parametrize("argv,match", [
    (["lora", "{sd}", "--lora", "{kohya}:abc", "-o", "{out}"], "SCALE 'abc' is not a number"),
    (["lora", "{sd}", "--lora", "{kohya}:inf", "-o", "{out}"], "finite"),
    (["lora", "{sd}", "-o", "{out}"], "at least one --lora"),
    (["lora", "{sd}", "--lora", "{tmp}/x.ckpt", "-o", "{out}"], "pickled .ckpt files are refused"),
    (["lora", "{sd}", "--lora", "{tmp}/missing.safetensors", "-o", "{out}"], "does not exist"),
    (["generate", "{sd}", "--prompt", "a", "--lora", "{tmp}/missing.safetensors", "-o", "{tmp}/a.png"], "does not exist"),
    (["generate", "{tmp}", "--runtime", "onnxruntime", "--prompt", "a", "--lora", "{kohya}", "-o", "{tmp}/a.png"],
     "merge first"),
    (["eval", "{tmp}", "--runtime", "onnxruntime", "--lora", "{kohya}"], "merge first"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, match, tiny_sd, loras, tmp_path, capsys):
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x04N.")
    argv = [a.format(sd=tiny_sd, kohya=loras["kohya"], tmp=tmp_path, out=tmp_path / "o") for a in argv]
    rc, cap = _cli(argv, capsys)
    assert rc == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], cap.err
    assert not (tmp_path / "o").exists()


def test_cli_generate_and_eval_merge_in_memory(tiny_sd, loras, tmp_path, capsys):
    rc, cap = _cli(["generate", tiny_sd, "--prompt", "a large red circle on a blue background, center", "--steps", 2,
                    "--lora", f"{loras['kohya']}:0.8", "-o", tmp_path / "a.png"], capsys)
    assert rc == 0, cap.err
    assert (tmp_path / "a.png").is_file() and not any(p.is_dir() for p in tmp_path.iterdir())
    rc, cap = _cli(["eval", tiny_sd, "--steps", 2, "--prompts", 2, "--lora", f"{loras['kohya']}:0.8", "-o", tmp_path / "e.json"],
                   capsys)
    assert rc == 0, cap.err
    report = json.loads((tmp_path / "e.json").read_text())
    assert [(r["format"], r["scale"]) for r in report["loras"]] == [("kohya", 0.8)]


def test_cli_a_stage_command_reads_a_merged_folder_and_records_the_loras(tiny_sd, loras, tmp_path, capsys):
    """A command that writes a stage artifact merges into ``<OUT>-lora/`` first and reads the model from there (the stages
    copy untouched components from, and name as their source, the folder they read)."""
    from pocketfusion import artifact

    (tmp_path / "p.txt").write_text("a large red circle on a blue background, center\n")
    rc, cap = _cli(["calibrate", tiny_sd, "--prompts", tmp_path / "p.txt", "--num-prompts", 1, "--steps", 2, "--timesteps", 1,
                    "--lora", f"{loras['kohya']}:0.5", "-o", tmp_path / "cal"], capsys)
    assert rc == 0, cap.err
    merged = artifact.load_manifest(tmp_path / "cal-lora")
    assert merged.stage == "lora" and merged.source.sha256 == artifact.content_hash(tiny_sd)
    m = artifact.load_manifest(tmp_path / "cal")  # checksums still hold
    assert Path(m.source.path) == (tmp_path / "cal-lora").resolve()
    lora = m.metrics["lora"]
    assert lora["merged_into"] == str(tmp_path / "cal-lora") and [(r["sha256"], r["scale"]) for r in lora["loras"]] == [
        (artifact.sha256_file(loras["kohya"]), 0.5)]
    assert "style.safetensors (scale 0.5)" in m.notes[-1]


def test_cli_compress_with_a_lora_says_when_calibration_prompts_do_not_use_it(tiny_sd, loras, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a large red circle on a blue background, center\na small blue square\n")
    base = ["compress", tiny_sd, "--lora", loras["kohya"], "--quant", "w8", "--method", "rtn", "--num-prompts", 2]
    rc, cap = _cli([*base, "-o", tmp_path / "q"], capsys)
    assert rc == 0 and "note: the model has a LoRA merged but --calib is not given" in cap.err, cap.err
    rc, cap = _cli([*base, "--calib", tmp_path / "p.txt", "-o", tmp_path / "q2"], capsys)
    assert rc == 0 and "note: the model has a LoRA merged" not in cap.err, cap.err


def test_cli_commands_that_load_model_take_lora():
    from pocketfusion.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in ("generate", "eval", "export", "compress", "calibrate", "run", "info", "distill", "prune", "decoder", "lora"):
        assert any("--lora" in a.option_strings for a in sub.choices[name]._actions), name


def test_merge_into_quantized_requantizes_each_layer_as_stable_diffusion_cpp(tiny_sd, loras, tmp_path):
    """The comparison path (benchmarks/lora_quant.py): a quantized model refuses a merge, ``merge_into_quantized`` adds
    the LoRA to the dequantized weights and re-quantizes each layer at its own bits and groups. At W4 a LoRA scaled
    below half a step is rounded away; the float merge keeps it."""
    import torch

    from pocketfusion import calibration as C
    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.lora import merge_into_quantized
    from pocketfusion.compress.quant import QuantConfig, load_grid, quantize

    model = load_model(tiny_sd)
    C.save(C.capture(model, ["a red circle", "a blue square"], steps=2, n_timesteps=2, progress=False), tmp_path / "cal")
    cfg = QuantConfig(scheme="w4", method="rtn", calib=str(tmp_path / "cal"), group_size=8, mixed_threshold=None,
                      image_prompts=1, image_steps=2, sensitivity_feeds=2)
    quantize(model, cfg, tmp_path / "q", progress=False)
    q = load_model(tmp_path / "q")
    before = {k: v.clone() for k, v in q.unet.state_dict().items()}
    with pytest.raises(UserError, match="quantized"):
        merge_in_memory(q, LoraConfig(loras=[(loras["peft"], 1.0)]))
    assert all(torch.equal(v, before[k]) for k, v in q.unet.state_dict().items())

    grid0 = load_grid(q)
    records, grid = merge_into_quantized(q, LoraConfig(loras=[(loras["peft"], 1.0)]))
    assert records[0]["matched_keys"] > 0 and set(grid.layers) == set(grid0.layers)
    assert all(grid.layers[n].bits == g.bits and grid.layers[n].group_size == g.group_size for n, g in grid0.layers.items())
    grid.integers(q.unet)  # every weight on the new grid (raises otherwise)
    adapted = [n for n in grid.layers if not torch.equal(q.unet.get_submodule(n).weight, before[n + ".weight"])]
    assert len(adapted) >= records[0]["layers"]["unet"] // 2  # at full scale most adapted layers move

    faint = load_model(tmp_path / "q")  # a delta far below half a 4-bit step: rounded away, as in stable-diffusion.cpp
    ints0 = load_grid(faint).integers(faint.unet)
    _, grid_f = merge_into_quantized(faint, LoraConfig(loras=[(loras["peft"], 1e-4)]))
    ints_f = grid_f.integers(faint.unet)
    assert all(torch.equal(ints_f[n], ints0[n]) for n in grid.layers)  # same integers: the LoRA is gone
    fp = load_model(tiny_sd)
    merge_in_memory(fp, LoraConfig(loras=[(loras["peft"], 1e-4)]))
    assert any(not torch.equal(fp.unet.get_submodule(n).weight, model.unet.get_submodule(n).weight) for n in adapted)
