import random

import numpy as np
import pytest

from pocketfusion.demo.metrics import prompt_accuracy, read_attributes
from pocketfusion.demo.scenes import ATTRIBUTES, Scene, all_scenes, make_dataset, parse_prompt, render, split_scenes
from pocketfusion.demo.tokenizer import learn_merges


def test_split_is_deterministic_disjoint_and_large_enough():
    train, held = split_scenes()
    assert len(held) >= 200 and len(train) + len(held) == len(all_scenes())
    assert not {s.prompt for s in train} & {s.prompt for s in held}
    assert split_scenes() == (train, held)


def test_prompt_round_trip():
    for s in all_scenes()[::37]:
        assert parse_prompt(s.prompt) == s
    with pytest.raises(ValueError, match="not in the demo grammar"):
        parse_prompt("a photo of a cat")
    with pytest.raises(ValueError):
        Scene("circle", "red", "red", "small", "center")


def test_metric_reads_every_clean_rendering():
    images, prompts = make_dataset(all_scenes(), 600, seed=5)
    result = prompt_accuracy(images, [parse_prompt(p) for p in prompts])
    assert result["per_attribute"] == {a: 1.0 for a in ATTRIBUTES}


def test_metric_tolerates_blur_and_noise():
    import torch
    import torch.nn.functional as F

    images, prompts = make_dataset(all_scenes(), 300, seed=6)
    x = torch.tensor(images).permute(0, 3, 1, 2).float()
    x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), torch.ones(3, 1, 3, 3) / 9, groups=3)
    x = (x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * 8).clamp(0, 255)
    blurred = x.byte().permute(0, 2, 3, 1).numpy()
    acc = prompt_accuracy(blurred, [parse_prompt(p) for p in prompts])["per_attribute"]
    assert min(acc.values()) >= 0.97


def test_metric_scores_wrong_images_wrong():
    s = Scene("circle", "red", "blue", "small", "top left")
    wrong = render(Scene("square", "green", "white", "large", "bottom right"))
    acc = prompt_accuracy([wrong], [s])["per_attribute"]
    assert acc == {a: 0.0 for a in ATTRIBUTES}
    blank = np.full((64, 64, 3), 245, dtype=np.uint8)
    got = read_attributes(blank)
    assert got["background"] == "white" and got["shape"] == "none"


def test_render_jitter_is_seeded():
    s = Scene("triangle", "yellow", "black", "large", "center")
    assert np.array_equal(render(s, rng=random.Random(1)), render(s, rng=random.Random(1)))
    assert not np.array_equal(render(s, rng=random.Random(1)), render(s, rng=random.Random(2)))


def test_bpe_merges_make_every_word_one_token():
    from transformers import CLIPTokenizer

    words = ["background", "bottom", "blue", "black", "a"]
    assert learn_merges(words)  # non-trivial
    import tempfile

    from pocketfusion.demo.tokenizer import write_tokenizer

    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(d)
        tok = CLIPTokenizer.from_pretrained(d)
    s = all_scenes()[123]
    ids = tok(s.prompt).input_ids
    assert len(ids) == len(s.prompt.replace(",", " ,").split()) + 2  # one token per word, plus BOS/EOS
    assert tok.model_max_length == 16
