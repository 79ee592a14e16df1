"""The runtime pipeline's own account of an image: time per network, calls per network, and the time outside the
networks per step (what ``pocketfusion bench`` reports under an end-to-end entry's ``breakdown``)."""

import numpy as np
import pytest


def test_timings_split_an_image_and_the_negative_prompt_is_encoded_once(tiny_onnx_export):
    from pocketfusion.runtimes.pipeline import RuntimePipeline

    pipe = RuntimePipeline(tiny_onnx_export, "onnxruntime", threads=1)
    a = pipe("a red circle", steps=3, seed=0)
    t = pipe.timings
    assert t["steps"] == 3 and t["calls"] == {"text_encoder": 2, "unet": 3, "vae_decoder": 1}  # prompt + "" (CFG pair)
    assert t["total_ms"] >= sum(t["networks_ms"].values()) > 0
    assert t["outside_ms"] == pytest.approx(t["total_ms"] - sum(t["networks_ms"].values()))
    assert t["outside_per_step_ms"] == pytest.approx(t["outside_ms"] / 3)
    b = pipe("a red circle", steps=3, seed=0)
    assert pipe.timings["calls"]["text_encoder"] == 1  # the empty prompt's conditions are kept
    assert np.array_equal(a, b)
    fresh = RuntimePipeline(tiny_onnx_export, "onnxruntime", threads=1)
    assert np.array_equal(fresh("a red circle", steps=3, seed=0), a)


def test_the_pipelines_tokenizer_gives_the_reference_ids(tiny_onnx_export):
    """The runtime pipeline tokenizes with the Rust CLIP tokenizer: the same ids, padding and truncation as
    transformers' Python ``CLIPTokenizer`` (what diffusers' pipelines use), on the demo's prompts and odd text."""
    from transformers import CLIPTokenizer

    from pocketfusion.checkpoint import BUNDLED
    from pocketfusion.demo.suite import demo_suite
    from pocketfusion.runtimes.pipeline import RuntimePipeline, _tokenizer, token_ids

    pipe = RuntimePipeline(tiny_onnx_export, "onnxruntime", threads=1)
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizerFast"
    folder = BUNDLED["demo"] / "tokenizer"
    fast, ref = _tokenizer(folder), CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    prompts = [p if isinstance(p, str) else p.prompt for p in demo_suite().heldout(None)]
    prompts += ["", "A  Large   RED circle!!", "ünïcode, numbers 123 and a very long prompt " * 4]
    for p in prompts:
        for n in (16, 8):  # the demo's length, and one that truncates
            ids = token_ids(fast, n)(p)
            assert ids.dtype == np.int32 and np.array_equal(ids, token_ids(ref, n)(p)), (p, n)
