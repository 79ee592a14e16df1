"""The shipped demo model: loadable by diffusers unchanged, verified, small, and following prompts."""

import html
import json
import re

import pytest

from pocketfusion import artifact
from pocketfusion.checkpoint import DEMO_MODEL, load_model
from pocketfusion.cli import main

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").is_file(), reason="demo model not trained yet")


def test_diffusers_loads_it_unchanged():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(DEMO_MODEL), safety_checker=None, local_files_only=True)
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 16
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size == 8
    assert any(type(b).__name__ == "CrossAttnDownBlock2D" for b in pipe.unet.down_blocks)


def test_manifest_verifies_and_size_budget():
    m = artifact.load_manifest(DEMO_MODEL)
    assert m.stage == "train-demo" and m.settings["seed"] == 0
    total = sum(f["size"] for f in m.files.values())
    assert total <= 40 * 1024 * 1024
    assert all(name.endswith((".json", ".txt", ".safetensors")) for name in m.files)


@pytest.fixture(scope="module")
def held_out_eval():
    from pocketfusion.generate import GenerateConfig, evaluate

    return evaluate(load_model(), GenerateConfig(steps=50, guidance=4.0, seed=0, batch_size=24), n_prompts=48)


def test_follows_prompts_on_held_out_combinations(held_out_eval):
    acc = held_out_eval["per_attribute"]
    assert held_out_eval["n"] == 48
    assert min(acc.values()) >= 0.8, acc


def test_follows_position_words(held_out_eval):
    # The attribute the min-SNR-weighted model ignored (12 %, chance is 20 %): layout is decided at
    # high noise, which plain v-MSE keeps weighted.
    assert held_out_eval["per_attribute"]["position"] >= 0.9, held_out_eval["per_attribute"]


def test_run_writes_a_complete_artifact(tmp_path, capsys):
    # Every stage the README's main command runs, at small settings: ONNX only, W8 on 2 calibration prompts.
    out = tmp_path / "run"
    argv = ["run", "--prompts", "8", "--steps", "10", "--target", "onnx", "--quant", "w8", "--quant-prompts", "2",
            "--bench-runs", "3", "-o", str(out)]
    assert main(argv) == 0
    m = artifact.load_manifest(out)
    assert m.stage == "run" and set(m.files) >= {"grid.png", "eval.png", "eval.json"}
    assert {"onnx/unet", "onnx/text_encoder", "onnx/vae_decoder"} <= set(m.metrics["export"]["components"])
    c = m.metrics["compress"]
    assert c["scheme"] == "w8" and c["eval_prompts"] == 8 and 0.2 < c["weights_ratio_fp16_scales"] < 0.3
    assert c["image_psnr_db"]["min_db"] > 30 and c["unet_snr_db"] > 25, c
    assert min(c["prompt_accuracy"].values()) >= min(m.metrics["prompt_accuracy"].values()) - 0.25
    q = c["export"]["components"]["onnx/unet"]
    assert q["parity"]["rel_max"] < 1e-4 and q["size_ratio_to_float_export"] < 0.35, q
    v = q["versus_fp32"]  # through onnxruntime, against the fp32 U-Net's recorded outputs
    assert v["heldout_feeds"] >= 1 and abs(v["snr_db"] - c["unet_snr_db"]) < 1.0 and v["latency_ms_median"] > 0, (v, c)
    assert (out / "compressed" / "unet" / "quantization.json").is_file()
    assert artifact.load_manifest(out / "compressed").stage == "compress"
    b = m.metrics["bench"]  # both exports timed through onnxruntime, each in its own process
    assert {"export:onnxruntime/unet", "export:onnxruntime/end_to_end", "export-w8:onnxruntime/unet"} <= set(b["median_ms"]), b
    assert all(v > 0 for v in b["median_ms"].values()) and b["speed_vs_float"]["export-w8"]["onnxruntime/unet"] > 0
    assert json.loads((out / "bench.json").read_text())["schema"] and (out / "report.html").stat().st_size > 1000
    # the run's one page: every path relative to it, valid after the staging folder was renamed into place
    page = (out / "report.html").read_text()
    assert ".partial" not in page and str(tmp_path) not in page and "report.html" in m.files
    refs = [html.unescape(r) for r in re.findall(r"(?:src|href)='([^']*)'", page) if not r.startswith("data:")]
    assert refs and all(not r.startswith("/") and (out / r).exists() for r in refs), refs
    assert "<section id='artifact-model'" in page and "<section id='artifact-compressed'" in page
    sc = m.metrics["showcase"]  # the showcase prompts through every pipeline, PyTorch and onnxruntime, same seeds
    rows = {r["key"]: r for r in sc["rows"]}
    assert set(rows) == {"model", "compressed", "export.onnxruntime", "export-w8.onnxruntime"}, set(rows)
    assert all(len(r["images"]) == len(sc["prompts"]) and all((out / i).is_file() for i in r["images"]) for r in rows.values())
    for key in ("compressed", "export.onnxruntime", "export-w8.onnxruntime"):
        p = rows[key]["psnr_db"]
        assert p["identical_images"] == len(sc["prompts"]) or p["min_db"] > 30, (key, p)
    for prompt in sc["prompts"]:  # under each image: the model's section (model, onnxruntime), the W8's (model, W8, onnxruntime)
        assert page.count(f"<figcaption>{html.escape(prompt)}") == 5, prompt
    assert m.source.sha256 == artifact.content_hash(DEMO_MODEL)
    assert set(m.metrics["prompt_accuracy"]) == {"shape", "color", "background", "size", "position"}
    assert m.metrics["seconds_per_image_batch1"] > 0 and m.metrics["macs_per_call"]["unet"] > 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n"] == 8 and len(ev["predictions"]) == 8
    assert "held-out prompts" in capsys.readouterr().out


def test_run_on_a_student_times_it_against_its_teacher(tmp_path, capsys):
    # The README's main command on the shipped 4-step student, at small settings: ONNX only.
    out = tmp_path / "run"
    argv = ["run", "demo-4step", "--prompts", "8", "--target", "onnx", "--quant", "w8", "--quant-prompts", "2", "--bench-runs", "2",
            "-o", str(out)]
    assert main(argv) == 0
    m = artifact.load_manifest(out)
    t = m.metrics["teacher"]
    assert t["teacher_steps"] == 50 and t["student_steps"] == 4 and t["speedup"] > 3, t
    assert m.metrics["compress"]["unet_snr_db"] > 25
    b = json.loads((out / "bench.json").read_text())
    e2e = {r["artifact"]: r for r in b["results"] if r["component"] == "end_to_end"}
    assert (e2e["export"]["steps"], e2e["export"]["guidance_mode"]) == (4, "embedded")
    assert (e2e["teacher-export"]["steps"], e2e["teacher-export"]["guidance_mode"]) == (50, "cfg")
    assert (e2e["export-w8"]["steps"], e2e["export-w8"]["guidance_mode"]) == (4, "embedded")  # the quantized pipeline too
    vs = m.metrics["bench"]["speed_vs_teacher"]
    assert vs["export"]["onnxruntime"] > 3 and vs["export-w8"]["onnxruntime"] > 3, vs
    assert "bench export-w8 end to end vs the teacher" in capsys.readouterr().out
    rows = {r["key"]: r for r in m.metrics["showcase"]["rows"]}  # the teacher is the report's original, its images too
    assert rows["teacher"]["steps"] == 50 and rows["model"]["reference"] == "teacher" and rows["model"]["psnr_db"]["min_db"] > 5
    assert rows["teacher-export.onnxruntime"]["reference"] == "teacher"
    page = (out / "report.html").read_text()
    assert "The original is <b>teacher</b>" in page and "<section id='artifact-teacher'" in page and ".partial" not in page


def test_eval_cli_json(tmp_path):
    out = tmp_path / "e.json"
    assert main(["eval", "--prompts", "4", "--steps", "5", "-o", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["n"] == 4 and rep["settings"]["steps"] == 5


@pytest.mark.parametrize("name", ["demo-pruned", "demo-tiny-decoder", "demo-mobile"])
def test_shipped_compressed_models_load_verify_and_carry_their_figures(name):
    """The shipped pruned U-Net and compact-decoder models: verified files, the command that made them, their
    measured evaluation, and what each removed or replaced against the teacher."""
    from pocketfusion import pruning
    from pocketfusion.checkpoint import BUNDLED

    if not (BUNDLED[name] / "manifest.json").is_file():
        pytest.skip(f"{name} not shipped")
    m = artifact.load_manifest(BUNDLED[name])
    assert "make " + name in m.settings["command"] and m.settings["seed"] == 0 and m.metrics["evaluation"]["prompts"] == 240
    model, teacher = load_model(name), load_model("demo")
    if name == "demo-pruned":
        removed = m.metrics["pruning"]["removed"]
        assert removed and pruning.read(BUNDLED[name] / "unet")["removed"]
        assert sum(p.numel() for p in model.unet.parameters()) < 0.8 * sum(p.numel() for p in teacher.unet.parameters())
        assert m.metrics["pruning"]["latency"]["speedup"] > 1.0 and m.metrics["latency_table"]["runtime"] == "onnxruntime"
    else:  # a compact VAE: the pruned AutoencoderKL (the original's latent scaling) or an AutoencoderTiny (scaling 1)
        vae, original = model.components["vae"], teacher.components["vae"]
        assert sum(p.numel() for p in vae.parameters()) < 0.5 * sum(p.numel() for p in original.parameters())
        assert m.sampler.scaling_factor == vae.config.scaling_factor and m.metrics["decoder"]["psnr_db"]["mean_db"] >= 30.0
    if name == "demo-mobile":  # pruned, 4 steps with the guidance input, distilled from the unpruned teacher
        from pocketfusion.checkpoint import find_teacher

        assert m.sampler.guidance == "embedded" and m.sampler.default_steps == 4 and model.unet.mid_block is None
        # the recorded teacher's files, wherever they are found (another checkout may hold the recorded path)
        assert artifact.content_hash(find_teacher(model)) == artifact.content_hash(BUNDLED["demo"])
