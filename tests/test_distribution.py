"""The demo's distribution measure: Fréchet distance and diversity on the shipped scene classifier."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from pocketfusion.demo import distribution as D
from pocketfusion.demo.scenes import Scene, parse_prompt, render
from pocketfusion.errors import UserError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def prompts():
    from pocketfusion.demo.suite import demo_suite

    return demo_suite().heldout(60)


@pytest.fixture(scope="module")
def renders(prompts):
    """One render of each prompt, seeded apart from the reference renders."""
    return D.render_prompts(prompts, 1, seed=7)[0]


@pytest.fixture(scope="module")
def frechet(prompts):
    model = D.load_classifier()
    refs = D.features(D.render_prompts(prompts, D.RENDERS_PER_PROMPT, D.REFERENCE_SEED)[0], model)
    return lambda images: D.frechet_from_features(D.features(images, model), refs)


def test_frechet_from_features_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert D.frechet_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    # Equal covariances: only the mean shift counts.
    assert D.frechet_from_features(a, a + np.array([3.0, 0.0, 4.0])) == pytest.approx(25.0, rel=1e-6)
    # Commuting (diagonal) covariances, no shift: sum over axes of (sd_1 - sd_2)^2.
    z = rng.normal(size=(20000, 3))
    z = (z - z.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # exactly white
    assert D.frechet_from_features(z * [1.0, 2.0, 3.0], z * [2.0, 1.0, 1.0]) == pytest.approx(1 + 1 + 4, rel=1e-6)
    with pytest.raises(UserError):
        D.frechet_from_features(a, a[:, :2])
    # General case: the textbook formula with scipy's sqrtm, where scipy is installed.
    b = rng.normal(size=(200, 3)) @ rng.normal(size=(3, 3))
    c = rng.normal(size=(300, 3)) @ rng.normal(size=(3, 3)) + 1.0
    sb, sc = np.cov(b, rowvar=False), np.cov(c, rowvar=False)
    mu = b.mean(0) - c.mean(0)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    expected = mu @ mu + np.trace(sb) + np.trace(sc) - 2 * np.trace(scipy_linalg.sqrtm(sb @ sc).real)
    assert D.frechet_from_features(b, c) == pytest.approx(expected, rel=1e-6)


def test_classifier_reads_heldout_renders(prompts):
    meta = json.loads((D.CLASSIFIER_DIR / "config.json").read_text())
    assert meta["accuracy_heldout_renders"]["all_correct"] >= 0.99
    assert meta["train"]["seed"] == 0 and "--train" in meta["command"]
    model = D.load_classifier()
    images, names = D.render_prompts(prompts, 2, seed=11)
    assert D.classifier_accuracy(model, images, names)["all_correct"] >= 0.98
    assert D.features(images[:3]).shape == (3, model.cfg.width)


def test_frechet_separates_collapse_from_data(prompts, renders, frechet):
    floor = frechet(renders)
    assert floor == pytest.approx(D.frechet_distance(renders, prompts), rel=1e-9)
    blurred = frechet(D._blurred_uint8(renders, 2.0))
    centred = frechet(np.stack([render(Scene(**{**parse_prompt(p).as_dict(), "position": "center"}), 64, random.Random(i))
                                for i, p in enumerate(prompts)]))
    canonical = frechet(np.stack([render(parse_prompt(p)) for p in prompts]))  # no jitter: one layout and size per prompt
    repeated = frechet(np.stack([renders[0]] * len(prompts)))
    assert floor < 25
    assert blurred > 4 * floor
    assert centred > 20 * floor
    assert repeated > 50 * floor
    assert canonical > 2 * floor


def test_diversity_is_one_for_data_and_zero_for_a_constant(prompts):
    few = prompts[:3]
    constant = D.diversity({p: [render(parse_prompt(p))] * 8 for p in few})
    assert constant["diversity"] == pytest.approx(0.0, abs=1e-6)
    assert constant["diversity_geometry"] == pytest.approx(0.0, abs=1e-6)
    data = D.diversity({p: list(D.render_prompts([p], 16, seed=99)[0]) for p in few})
    assert 0.8 < data["diversity"] < 1.25
    assert 0.7 < data["diversity_geometry"] < 1.4
    assert set(data["per_prompt"]) == set(few)
    with pytest.raises(UserError):
        D.diversity({few[0]: [render(parse_prompt(few[0]))]})


def test_measure_through_the_suite(prompts, renders):
    from pocketfusion.demo.suite import demo_suite
    from pocketfusion.suite import PromptSuite

    few = prompts[:12]
    seeds = {few[0]: list(D.render_prompts([few[0]], 8, seed=5)[0])}
    out = demo_suite().measure_distribution(renders[:12], few, seeds_images=seeds)
    assert {"frechet", "frechet_renders", "sharpness", "diversity", "diversity_geometry", "blur_read", "n"} <= set(out)
    assert out["n"] == 12 and out["diversity_seeds"] == 8
    assert 0.8 < out["sharpness"] < 1.25
    assert "diversity" not in demo_suite().measure_distribution(renders[:12], few)
    spread = D.diversity_prompts()
    assert len(spread) == D.DIVERSITY_PROMPTS and len({parse_prompt(p).shape for p in spread}) == 3
    with pytest.raises(UserError):
        PromptSuite(name="file", train_prompts=("a cat",)).measure_distribution(renders[:1], ["a cat"])
    with pytest.raises(UserError):
        D.measure(renders[:3], few)


def test_training_is_deterministic(tmp_path):
    cfg = D.ClassifierTrainConfig(iterations=2, batch=4, n_images=16, eval_images=4)
    first = D.train_classifier(cfg, tmp_path / "a", progress=False)
    D.train_classifier(cfg, tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert first["train"]["iterations"] == 2
    assert D.load_classifier(tmp_path / "a").cfg == D.ClassifierConfig()
    with pytest.raises(UserError):
        D.ClassifierTrainConfig(blur_prob=2.0)
    with pytest.raises(UserError):
        D.load_classifier(tmp_path)
