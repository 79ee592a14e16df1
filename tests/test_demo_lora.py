"""The demo LoRA (issue 14): the new position ``north`` in the renderer and the metric, the base prompt sets left
bit-identical, the shipped LoRA file (our reader, our merge = diffusers' fuse), and the training command."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest

from pocketfusion.demo import scenes
from pocketfusion.demo.metrics import prompt_accuracy, read_attributes

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _sha(lines) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def test_base_prompt_sets_and_renders_unchanged():
    # Pinned before the LoRA concept was added: the shipped models' recorded accuracies were measured on these.
    train, held = scenes.split_scenes()
    assert (len(scenes.all_scenes()), len(train), len(held)) == (900, 660, 240)
    assert _sha(s.prompt for s in train) == "06ecbaed201d2af227a3d4ab2d421d32bc5fc0ce1ae69e502248759efb650d73"
    assert _sha(s.prompt for s in held) == "cf4b6697a407d7201dc2e36cb8afacf498b0292248ced66835adea53bed864a1"
    from pocketfusion.demo.tokenizer import corpus_words

    assert "north" not in corpus_words()
    assert _sha(corpus_words()) == "d6a234c7fcc9d268dcf934c9483d069e1df5d7de6452999e99a092674135a3ec"
    h = hashlib.sha256()
    for s in held[:40] + train[:40]:
        h.update(scenes.render(s).tobytes())
    images, prompts = scenes.make_dataset(train, 32, seed=3)
    h.update(images.tobytes())
    h.update("\n".join(prompts).encode())
    assert h.hexdigest() == "b9ebf113d301b90ae9b205bebb5e2796be11e7b926bc8de1369ef20b45edecd2"


def test_lora_split():
    train, held = scenes.split_lora_scenes()
    assert (len(scenes.lora_scenes()), len(train), len(held)) == (180, 144, 36)
    assert not {s.prompt for s in train} & {s.prompt for s in held}
    assert {s.position for s in train + held} == {"north"}
    assert not {s.prompt for s in train + held} & {s.prompt for s in scenes.all_scenes()}
    assert scenes.parse_prompt(held[0].prompt) == held[0]
    # the prompt fits the 16-token text encoder untruncated (north is five byte pieces)
    from transformers import CLIPTokenizer

    from pocketfusion.demo.suite import MODEL_DIR

    tok = CLIPTokenizer.from_pretrained(str(MODEL_DIR / "tokenizer"))
    assert max(len(tok(s.prompt).input_ids) for s in train + held) <= tok.model_max_length


def test_metric_reads_north_on_renders():
    train, held = scenes.split_lora_scenes()
    rng = random.Random(0)
    lora_imgs = [scenes.render(s) for s in held] + [scenes.render(s, rng=rng) for s in train[:36]]
    acc = prompt_accuracy(lora_imgs, held + train[:36], lora=True)
    assert acc["all_correct"] == 1.0, [p for p in acc["predictions"] if not all(p["correct"].values())][:3]
    # The base reading knows no "north" (it says top left or center): concept accuracy of a non-LoRA reading is 0.
    assert prompt_accuracy(lora_imgs, held + train[:36])["per_attribute"]["position"] == 0.0
    # The LoRA reading changes nothing on base renders.
    _, base_held = scenes.split_scenes()
    base_imgs = [scenes.render(s, rng=rng) for s in base_held[::4]]
    assert [read_attributes(i, lora=True) for i in base_imgs] == [read_attributes(i) for i in base_imgs]
    assert prompt_accuracy(base_imgs, base_held[::4], lora=True)["all_correct"] == 1.0


def test_vae_decodes_north():
    # The concept is one the demo VAE can show (new colours and shapes it cannot): renders survive a round trip.
    import torch

    from pocketfusion.checkpoint import DEMO_MODEL, load_model

    vae = load_model(DEMO_MODEL).components["vae"]
    _, held = scenes.split_lora_scenes()
    x = torch.from_numpy(np.stack([scenes.render(s) for s in held])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    imgs = list(((rec.clamp(-1, 1) + 1) * 127.5 + 0.5).byte().permute(0, 2, 3, 1).numpy())
    assert prompt_accuracy(imgs, held, lora=True)["per_attribute"]["position"] == 1.0


def test_shipped_lora_reads_and_merges_like_diffusers():
    pytest.importorskip("peft")
    import torch

    from pocketfusion.checkpoint import DEMO_MODEL, load_model
    from pocketfusion.compress.lora import LoraConfig, merge_in_memory
    from pocketfusion.compress.lora.read import read_lora
    from pocketfusion.demo.lora import SHIPPED
    from pocketfusion.demo.lora.measure import merged_model

    assert SHIPPED.is_file() and SHIPPED.stat().st_size < 1_000_000
    weights = read_lora(SHIPPED)
    assert weights.format == "peft" and not weights.unparsed
    assert {layer.component for layer in weights.layers} == {"unet", "text_encoder"}
    ours = load_model(DEMO_MODEL)
    rec = merge_in_memory(ours, LoraConfig(loras=[(str(SHIPPED), 1.0)]))[0]
    assert rec["unmatched_keys"] == 0 and rec["matched_keys"] == len(weights.layers) * 2
    theirs = merged_model(SHIPPED)
    base = load_model(DEMO_MODEL)
    changed = 0
    for comp in ("unet", "text_encoder"):
        a, b, c = (m.components[comp].state_dict() for m in (ours, theirs, base))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=f"{comp}.{k}")
            changed += not torch.equal(a[k], c[k])
    assert changed == len(weights.layers)
    record = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert record["settings"]["seed"] == 0 and "pocketfusion.demo.lora train" in record["command"]
    assert record["measured"]["settings"]["lora_sha256"] == hashlib.sha256(SHIPPED.read_bytes()).hexdigest()


def test_train_two_iterations(tmp_path):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    from pocketfusion.compress.lora.read import read_lora
    from pocketfusion.demo.lora.__main__ import main
    from pocketfusion.demo.suite import MODEL_DIR

    out = tmp_path / "lora"
    main(["train", "-o", str(out), "--iterations", "2", "--batch", "4", "--images", "4", "--checkpoint-every", "1"])
    weights = read_lora(out / "pytorch_lora_weights.safetensors")
    assert {layer.component for layer in weights.layers} == {"unet", "text_encoder"}
    assert all(layer.down.shape[0] == 4 for layer in weights.layers)
    record = json.loads((out / "lora.json").read_text())
    assert record["iterations"] == 2 and record["command"].startswith("python -m pocketfusion.demo.lora train")
    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL_DIR), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    assert pipe.get_active_adapters() == ["default_0"]


def test_measure_runs(tmp_path):
    pytest.importorskip("peft")
    import shutil

    from pocketfusion.demo.lora import SHIPPED
    from pocketfusion.demo.lora.measure import measure_lora

    lora = shutil.copy(SHIPPED, tmp_path / "x.safetensors")
    res = measure_lora(lora, n_base=2, steps=2, write=True)
    assert res["with_lora"]["concept"]["n"] == 36 and res["base_model"]["base"]["n"] == 2
    assert 0.0 <= res["with_lora"]["concept"]["accuracy"] <= 1.0
    assert json.loads((tmp_path / "x.json").read_text())["measured"]["settings"]["steps"] == 2
