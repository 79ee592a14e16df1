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

