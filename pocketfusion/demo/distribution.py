"""Distribution and diversity of generated demo images, read by a small classifier of rendered scenes.

Prompt accuracy (``demo.metrics``) asks whether each attribute is right; it cannot see a model that
draws every prompt at one canonical layout, one size or one blur. This module measures that:

* **Fréchet distance** (``frechet_distance``): the features of a small CNN trained on renders of the
  training scenes (``SceneClassifier``, five heads: shape, colour, background, size, position; the
  features are its penultimate layer) for the generated images, against the features of renders of
  the *same prompts* (``RENDERS_PER_PROMPT`` jittered renders each, seeded per prompt); the distance
  between the two fitted Gaussians, as in FID. ``measure`` also reports ``frechet_renders``: the same
  distance for fresh renders of the same prompts (one each, another seed), i.e. what the data itself
  scores at this sample size, the floor a model is read against.
* **Diversity** (``diversity``): for a fixed prompt drawn with N seeds, the mean pairwise feature
  distance of the generated images divided by that of renders of the prompt (the renderer jitters the
  centre by ±5 % of the side and the size by ±10 %), averaged over prompts: about 1 for the data, 0
  for a model that draws the same image whatever the seed. ``diversity_geometry`` is the same ratio
  for the spread (RMS) of the object's centroid and size measured in pixels (coverage of the prompt's
  shape colour against its background).
* **Sharpness** (``sharpness``): RMS image gradient of the generated images over that of renders of
  the same prompts: 1 for the data, below 1 for blur, above for noise.

The classifier is shipped in ``pocketfusion/demo/classifier/`` and rebuilt, deterministically, by::

    python -m pocketfusion.demo.distribution --train --out pocketfusion/demo/classifier

and a model is measured (teacher: 60 held-out prompts, 50 steps, guidance 4) by::

    python -m pocketfusion.demo.distribution --measure [MODEL] --prompts 60 --steps 50 --guidance 4

(diversity: ``diversity_prompts()``, four held-out prompts spread over the shapes, 16 seeds each).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pocketfusion.demo.scenes import COLORS, POSITIONS, SHAPES, SIZES, Scene, make_dataset, parse_prompt, render, split_scenes
from pocketfusion.errors import UserError

logger = logging.getLogger(__name__)

CLASSIFIER_DIR = Path(__file__).resolve().parent / "classifier"
HEADS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": tuple(COLORS), "background": tuple(COLORS), "size": SIZES,
                                     "position": POSITIONS}
RENDERS_PER_PROMPT = 4  # reference renders of each prompt for the Fréchet distance
REFERENCE_SEED = 1000  # seeds the reference renders (per prompt, so a prompt's renders do not depend on the others)
FLOOR_SEED = 2000  # seeds the fresh renders of ``frechet_renders``
DIVERSITY_RENDERS = 64  # renders of a prompt across seeds that the diversity of generated images is divided by
DIVERSITY_PROMPTS = 4  # held-out prompts (spread over shapes) whose images over seeds the diversity is measured on
DIVERSITY_SEEDS = 16


@dataclass(frozen=True)
class ClassifierConfig:
    """The two-stream CNN; features = [geometry stream (``features``), colour stream (``colour_features``)].

    Geometry stream: a colour-free foreground map (each pixel's RGB distance from the image's border
    colour, over its maximum) through stride-2 3x3 convolutions (64 -> 4 px) and a dense layer; it
    feeds the shape, size and position heads. Colour stream: per-pixel 1x1 convolutions of (RGB, map,
    RGB * map) at half resolution, average- and max-pooled, then a dense layer; it feeds the colour and
    background heads. Neither stream can tie an attribute to another's value, so held-out combinations
    of known words read as well as training ones.
    """

    resolution: int = 64
    channels: tuple[int, ...] = (16, 32, 64, 64)
    features: int = 96
    colour_channels: int = 16
    colour_features: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.resolution < 8 or self.resolution % (2 ** len(self.channels)):
            raise UserError(f"ClassifierConfig: resolution={self.resolution} must be >= 8 and divisible by 2**{len(self.channels)}")
        if not self.channels or min(*self.channels, self.features, self.colour_channels, self.colour_features) < 1:
            raise UserError(f"ClassifierConfig: channels and feature widths must be positive, got {self.to_dict()}")

    @property
    def width(self) -> int:
        """Width of the feature vector."""
        return self.features + self.colour_features

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": list(self.channels)}


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """How the shipped classifier is trained: renders of the training scenes, blur/noise/colour augmentation."""

    seed: int = 0
    iterations: int = 1000
    batch: int = 64
    lr: float = 2e-3
    n_images: int = 12000  # jittered renders of the training scenes, drawn from with replacement
    blur_prob: float = 0.8  # share of a batch blurred, at sigma ~ U(0, blur_max) px (the VAE decoder's softness: ~0.8 px)
    blur_max: float = 2.0
    noise_max: float = 0.05  # Gaussian noise, std ~ U(0, noise_max) in [-1, 1] units (~6/255 at the top)
    color_jitter: float = 0.05  # per-channel offset ~ U(-c, c) in [-1, 1] units
    eval_images: int = 2400  # renders of the held-out scenes for the reported accuracy
    model: ClassifierConfig = field(default_factory=ClassifierConfig)

    def __post_init__(self) -> None:
        checks = [
            (self.seed >= 0, f"seed={self.seed}: >= 0"), (self.iterations >= 1, f"iterations={self.iterations}: >= 1"),
            (self.batch >= 1, f"batch={self.batch}: >= 1"), (self.lr > 0, f"lr={self.lr}: > 0"),
            (self.n_images >= 1, f"n_images={self.n_images}: >= 1"), (0 <= self.blur_prob <= 1, f"blur_prob={self.blur_prob}: in [0, 1]"),
            (0 < self.blur_max <= 2.5, f"blur_max={self.blur_max}: in (0, 2.5]"), (self.noise_max > 0, f"noise_max={self.noise_max}: > 0"),
            (self.color_jitter >= 0, f"color_jitter={self.color_jitter}: >= 0"),
            (self.eval_images >= 1, f"eval_images={self.eval_images}: >= 1"),
        ]
        if problems := [msg for ok, msg in checks if not ok]:
            raise UserError("ClassifierTrainConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return {**asdict(self), "model": self.model.to_dict()}


_GEOMETRY_HEADS = ("shape", "size", "position")
# Auxiliary regression heads, trained on the augmentation's own blur sigma and noise std (both over their
# maximum): the attribute heads learn to ignore blur and noise, these make the features register them, so a
# model whose images are all blurrier or noisier than the data moves the Fréchet distance.
AUX_HEADS = ("blur", "noise")


class SceneClassifier(nn.Module):
    """Five-head classifier of (N, H, W, 3) uint8 scenes (normalised inside); ``features`` is the penultimate layer."""

    def __init__(self, cfg: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c_in = 1
        for c in cfg.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.SiLU()]
            c_in = c
        side = cfg.resolution // 2 ** len(cfg.channels)
        self.geometry = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * side * side, cfg.features), nn.SiLU())
        k = cfg.colour_channels
        self.pixels = nn.Sequential(nn.Conv2d(7, k, 1), nn.SiLU(), nn.Conv2d(k, k, 1), nn.SiLU())
        self.colour = nn.Sequential(nn.Linear(2 * k, cfg.colour_features), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(cfg.features if name in _GEOMETRY_HEADS else cfg.colour_features, len(values))
                                    for name, values in HEADS.items()})
        self.aux = nn.ModuleDict({name: nn.Linear(cfg.width, 1) for name in AUX_HEADS})
        self.aux_scale = {name: 1.0 for name in AUX_HEADS}  # head output 1.0 in px of blur sigma / uint8 noise std

    @staticmethod
    def normalise(images: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0..255 float) NHWC -> float NCHW in [-1, 1]."""
        return images.float().permute(0, 3, 1, 2).div(127.5).sub(1.0)

    @staticmethod
    def foreground(x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) in [0, 1]: RGB distance from the median colour of the 2-px border ring, over its maximum."""
        ring = torch.cat([x[:, :, :2].flatten(2), x[:, :, -2:].flatten(2), x[:, :, :, :2].flatten(2), x[:, :, :, -2:].flatten(2)], 2)
        border = ring.median(dim=2).values[:, :, None, None]
        d = (x - border).square().sum(1, keepdim=True).add(1e-6).sqrt()
        return d / d.amax(dim=(2, 3), keepdim=True).clamp(min=0.1)

    def streams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(geometry features, colour features) of normalised NCHW input."""
        fg = self.foreground(x)
        geo = self.geometry(fg * 2.0 - 1.0)
        half = nn.functional.avg_pool2d(torch.cat([x, fg, x * fg], 1), 2)
        p = self.pixels(half).flatten(2)
        return geo, self.colour(torch.cat([p.mean(2), p.amax(2)], 1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features (N, cfg.width) of normalised NCHW input."""
        return torch.cat(self.streams(x), 1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.normalise(images))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute head, and (N,) predictions of the auxiliary heads, for normalised NCHW input."""
        geo, col = self.streams(x)
        out = {name: head(geo if name in _GEOMETRY_HEADS else col) for name, head in self.heads.items()}
        f = torch.cat([geo, col], 1)
        return {**out, **{name: head(f)[:, 0] for name, head in self.aux.items()}}


def labels_of(prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Class indices per head for demo-grammar prompts."""
    scenes = [parse_prompt(p) for p in prompts]
    return {name: torch.tensor([values.index(getattr(s, name)) for s in scenes]) for name, values in HEADS.items()}


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of NCHW ``x`` with a per-image ``sigma`` (0: unchanged), reflect padding."""
    n, c, h, w = x.shape
    radius = 5
    grid = torch.arange(-radius, radius + 1, dtype=x.dtype)
    s = sigma.clamp(min=1e-3).to(x.dtype)[:, None]
    k = torch.exp(-0.5 * (grid[None, :] / s) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, K)
    y = x.reshape(1, n * c, h, w)
    y = nn.functional.conv2d(nn.functional.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * c)
    y = nn.functional.conv2d(nn.functional.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment(x: torch.Tensor, cfg: ClassifierTrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Blur, noise and colour-shift normalised NCHW images, drawing from ``gen`` only.

    Returns the images and the targets of the auxiliary heads: blur sigma / blur_max, noise std / noise_max.
    """
    n = x.shape[0]
    sigma = torch.rand(n, generator=gen) * cfg.blur_max * (torch.rand(n, generator=gen) < cfg.blur_prob)
    x = _blur(x, sigma)
    x = x + (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1) * cfg.color_jitter
    noise = torch.rand(n, generator=gen) * cfg.noise_max
    x = x + torch.randn(x.shape, generator=gen) * noise[:, None, None, None]
    return x.clamp(-1.0, 1.0), {"blur": sigma / cfg.blur_max, "noise": noise / cfg.noise_max}


def classifier_accuracy(model: SceneClassifier, images: np.ndarray | torch.Tensor, prompts: Sequence[str]) -> dict:
    """Per-head accuracy and all-five accuracy of ``model`` on uint8 NHWC ``images`` against ``prompts``."""
    x = torch.as_tensor(np.asarray(images))
    want = labels_of(prompts)
    model.eval()
    with torch.no_grad():
        logits = [model(model.normalise(x[i : i + 512])) for i in range(0, len(x), 512)]
    hits = {name: torch.cat([lg[name] for lg in logits]).argmax(1) == want[name] for name in HEADS}
    every = torch.stack(list(hits.values())).all(0)
    return {"per_attribute": {k: round(float(v.float().mean()), 4) for k, v in hits.items()},
            "all_correct": round(float(every.float().mean()), 4), "n": len(prompts)}


def read_quality(model: SceneClassifier, images: np.ndarray | Sequence[np.ndarray]) -> dict:
    """Mean blur sigma (px) and noise std (uint8 units) that the auxiliary heads read in uint8 HWC ``images``."""
    x = torch.from_numpy(_as_batch(images, model.cfg.resolution))
    model.eval()
    with torch.no_grad():
        outs = [model(model.normalise(x[i : i + 512])) for i in range(0, len(x), 512)]
    return {k: round(float(torch.cat([o[k] for o in outs]).mean()) * model.aux_scale[k], 3) for k in AUX_HEADS}


def train_classifier(cfg: ClassifierTrainConfig, out: str | Path, *, progress: bool = True) -> dict:
    """Train the classifier on renders of the training scenes (``split_scenes()[0]``) and write it to ``out``.

    Writes ``out/model.safetensors`` and ``out/config.json`` (model config, training config, the command,
    held-out accuracy, training cost). Deterministic for ``cfg.seed`` at a given torch thread count.
    Returns the config.json content.
    """
    from safetensors.torch import save_file

    from pocketfusion.artifact import atomic_write_text
    from pocketfusion.training import TrainConfig, seed_everything, train

    seed_everything(cfg.seed)
    train_scenes, held_scenes = split_scenes()
    images, prompts = make_dataset(train_scenes, cfg.n_images, cfg.model.resolution, seed=cfg.seed)
    x_all = SceneClassifier.normalise(torch.from_numpy(images))
    y_all = labels_of(prompts)
    model = SceneClassifier(cfg.model)
    model.aux_scale = {"blur": cfg.blur_max, "noise": cfg.noise_max * 127.5}

    def data(ctx):
        idx = torch.randint(len(x_all), (cfg.batch,), generator=ctx.rng)
        x, aux = augment(x_all[idx], cfg, ctx.rng)
        return x, {**{k: v[idx] for k, v in y_all.items()}, **aux}

    def loss_fn(batch, ctx):
        x, y = batch
        out = model(x)
        ce = sum(nn.functional.cross_entropy(out[k], y[k]) for k in HEADS)
        return ce + sum(nn.functional.mse_loss(out[k], y[k]) for k in AUX_HEADS)

    tcfg = TrainConfig(iterations=cfg.iterations, lr=cfg.lr, schedule="cosine", warmup=min(100, cfg.iterations // 10),
                       weight_decay=1e-4, seed=cfg.seed, log_every=100)
    result = train({"classifier": model}, loss_fn, tcfg, data=data, progress=progress, desc="classifier")
    model.eval()
    held_images, held_prompts = make_dataset(held_scenes, cfg.eval_images, cfg.model.resolution, seed=cfg.seed + 1)
    blurred = _blurred_uint8(held_images, 1.0)
    report = {
        "format": 1,
        "command": f"python -m pocketfusion.demo.distribution --train --out {out} --seed {cfg.seed}",
        "torch_threads": torch.get_num_threads(),
        "model": cfg.model.to_dict(),
        "train": cfg.to_dict(),
        "train_loop": tcfg.to_dict(),
        "heads": {k: list(v) for k, v in HEADS.items()},
        "accuracy_heldout_renders": classifier_accuracy(model, held_images, held_prompts),
        "accuracy_heldout_renders_blur1": classifier_accuracy(model, blurred, held_prompts),
        "aux_scale": model.aux_scale,
        "read_heldout_renders": read_quality(model, held_images),
        "read_heldout_renders_blur1": read_quality(model, blurred),
        "loss_log": [{"iteration": e["iteration"], "loss": round(e["loss"], 5)} for e in result.log],
        "final_loss": round(result.losses[-1], 5),
        "train_seconds": round(result.elapsed_s, 1),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    atomic_write_text(out / "config.json", json.dumps(report, indent=2) + "\n")
    return report


def _blurred_uint8(images: np.ndarray, sigma: float) -> np.ndarray:
    x = _blur(SceneClassifier.normalise(torch.from_numpy(np.asarray(images))), torch.full((len(images),), float(sigma)))
    return ((x.permute(0, 2, 3, 1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def load_classifier(path: str | Path | None = None) -> SceneClassifier:
    """The trained classifier (default: the shipped one), in eval mode; cached per path."""
    return _load_classifier(str(Path(path or CLASSIFIER_DIR).resolve()))


@functools.lru_cache(maxsize=2)
def _load_classifier(path: str) -> SceneClassifier:
    from safetensors.torch import load_file

    root = Path(path)
    if not (root / "config.json").is_file() or not (root / "model.safetensors").is_file():
        raise UserError(f"{root} holds no scene classifier (config.json + model.safetensors); "
                        "train one: python -m pocketfusion.demo.distribution --train --out DIR")
    meta = json.loads((root / "config.json").read_text())
    model = SceneClassifier(ClassifierConfig(**meta["model"]))
    model.load_state_dict(load_file(str(root / "model.safetensors")))
    model.aux_scale = {k: float(v) for k, v in meta["aux_scale"].items()}
    return model.eval()


def _as_batch(images: Sequence[np.ndarray] | np.ndarray, resolution: int) -> np.ndarray:
    """uint8 NHWC at the classifier's resolution (other sizes resized, bilinear)."""
    from PIL import Image

    if len(images) == 0:
        raise UserError("no images to measure")
    out = []
    for img in images:
        a = np.asarray(img)
        if a.ndim != 3 or a.shape[2] != 3:
            raise UserError(f"expected (H, W, 3) images, got shape {a.shape}")
        if a.dtype != np.uint8:
            a = np.clip(a, 0, 255).astype(np.uint8)
        if a.shape[:2] != (resolution, resolution):
            a = np.asarray(Image.fromarray(a).resize((resolution, resolution), Image.Resampling.BILINEAR))
        out.append(a)
    return np.stack(out)


def features(images: Sequence[np.ndarray] | np.ndarray, classifier: SceneClassifier | None = None) -> np.ndarray:
    """Penultimate-layer features (float64, (N, features)) of uint8 HWC images."""
    model = classifier or load_classifier()
    x = torch.from_numpy(_as_batch(images, model.cfg.resolution))
    with torch.no_grad():
        return torch.cat([model.features(x[i : i + 256]) for i in range(0, len(x), 256)]).double().numpy()


def render_prompts(prompts: Sequence[str], per_prompt: int = 1, seed: int = REFERENCE_SEED) -> tuple[np.ndarray, list[str]]:
    """``per_prompt`` jittered renders of each prompt; render k of prompt p is seeded by (seed, p, k) alone."""
    images, names = [], []
    for p in prompts:
        scene = parse_prompt(p)
        for k in range(per_prompt):
            images.append(render(scene, 64, random.Random(f"{seed}/{scene.prompt}/{k}")))
            names.append(p)
    return np.stack(images), names


def frechet_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature rows ``a`` and ``b`` (numpy only).

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``, both square roots from
    symmetric eigendecompositions (negative round-off eigenvalues clipped to 0).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise UserError(f"Fréchet distance needs two (N >= 2, D) feature sets of one width, got {a.shape} and {b.shape}")
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ sb @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(max(mu @ mu + np.trace(sa) + np.trace(sb) - 2.0 * cross, 0.0))


def frechet_distance(images: Sequence[np.ndarray], prompts: Sequence[str], *, renders_per_prompt: int = RENDERS_PER_PROMPT,
                     seed: int = REFERENCE_SEED, classifier: SceneClassifier | None = None) -> float:
    """Fréchet distance between the features of ``images`` and of renders of their ``prompts``."""
    if len(images) != len(prompts):
        raise UserError(f"{len(images)} images for {len(prompts)} prompts")
    refs, _ = render_prompts(prompts, renders_per_prompt, seed)
    return frechet_from_features(features(images, classifier), features(refs, classifier))


def _mean_pairwise(f: np.ndarray) -> float:
    d = np.sqrt(np.clip(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1), 0, None))
    n = len(f)
    return float(d.sum() / (n * (n - 1)))


def geometry(image: np.ndarray, scene: Scene) -> tuple[float, float, float]:
    """(centroid x, centroid y, sqrt of covered area) in px of ``scene``'s shape, by coverage against its colours."""
    img = np.asarray(image, dtype=np.float64)
    fg, bg = np.array(COLORS[scene.color], dtype=np.float64), np.array(COLORS[scene.background], dtype=np.float64)
    axis = fg - bg
    cov = np.clip(((img - bg) @ axis) / float(axis @ axis), 0.0, 1.0)
    cov[cov < 0.25] = 0.0  # faint noise far from the shape
    total = cov.sum()
    if total <= 0:
        return 0.0, 0.0, 0.0
    ys, xs = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    return float((cov * (xs + 0.5)).sum() / total), float((cov * (ys + 0.5)).sum() / total), float(np.sqrt(total))


def _spread(images: np.ndarray, scene: Scene) -> float:
    g = np.array([geometry(im, scene) for im in images])
    return float(np.sqrt(g.var(0).sum()))


def diversity(images_by_prompt: Mapping[str, Sequence[np.ndarray]], *, renders: int = DIVERSITY_RENDERS, seed: int = REFERENCE_SEED,
              classifier: SceneClassifier | None = None) -> dict:
    """How much a model's images of one prompt vary with the seed, relative to renders of that prompt.

    ``images_by_prompt``: prompt -> its images over N >= 2 seeds. Per prompt, the mean pairwise distance
    of the images' features divided by that of ``renders`` jittered renders of the prompt (``diversity``),
    and the RMS spread of centroid and size in px divided by the renders' (``diversity_geometry``); each
    averaged over prompts. About 1 for the data; 0 for a model that ignores the seed.
    """
    if not images_by_prompt:
        raise UserError("diversity needs at least one prompt's images")
    per_prompt = {}
    for prompt, imgs in images_by_prompt.items():
        if len(imgs) < 2:
            raise UserError(f"diversity needs >= 2 images (seeds) of each prompt, got {len(imgs)} for {prompt!r}")
        scene = parse_prompt(prompt)
        refs, _ = render_prompts([prompt], renders, seed)
        gen = _as_batch(imgs, 64)
        per_prompt[prompt] = {
            "diversity": _mean_pairwise(features(gen, classifier)) / _mean_pairwise(features(refs, classifier)),
            "diversity_geometry": _spread(gen, scene) / _spread(refs, scene),
            "seeds": len(imgs),
        }
    return {
        "diversity": round(float(np.mean([v["diversity"] for v in per_prompt.values()])), 4),
        "diversity_geometry": round(float(np.mean([v["diversity_geometry"] for v in per_prompt.values()])), 4),
        "per_prompt": {p: {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()} for p, d in per_prompt.items()},
    }


def _rms_gradient(images: np.ndarray) -> float:
    a = np.asarray(images, dtype=np.float64)
    return float(np.sqrt((np.diff(a, axis=1) ** 2).mean() + (np.diff(a, axis=2) ** 2).mean()))


def measure(images: Sequence[np.ndarray], prompts: Sequence[str], seeds_images: Mapping[str, Sequence[np.ndarray]] | None = None,
            *, classifier: SceneClassifier | None = None) -> dict:
    """The demo suite's distribution figures for ``images`` generated from ``prompts`` (one image each).

    Returns ``frechet`` (against ``RENDERS_PER_PROMPT`` renders of each prompt), ``frechet_renders`` (fresh
    renders of the same prompts against the same reference: the floor at this sample size), ``sharpness``
    (RMS gradient over the renders'), ``classifier_all_correct`` (the classifier's all-five read of the
    images), ``n``; with ``seeds_images`` (prompt -> its images over several seeds) also ``diversity``,
    ``diversity_geometry`` (see ``diversity``), ``diversity_prompts`` and ``diversity_seeds``.
    """
    if len(images) != len(prompts):
        raise UserError(f"{len(images)} images for {len(prompts)} prompts")
    model = classifier or load_classifier()
    gen = _as_batch(images, model.cfg.resolution)
    refs, _ = render_prompts(prompts, RENDERS_PER_PROMPT, REFERENCE_SEED)
    fresh, _ = render_prompts(prompts, 1, FLOOR_SEED)
    f_ref = features(refs, model)
    out = {
        "frechet": round(frechet_from_features(features(gen, model), f_ref), 4),
        "frechet_renders": round(frechet_from_features(features(fresh, model), f_ref), 4),
        "sharpness": round(_rms_gradient(gen) / _rms_gradient(fresh), 4),
        "classifier_all_correct": classifier_accuracy(model, gen, prompts)["all_correct"],
        **{f"{k}_read": v for k, v in read_quality(model, gen).items()},
        **{f"{k}_read_renders": v for k, v in read_quality(model, fresh).items()},
        "n": len(prompts),
    }
    if seeds_images:
        div = diversity(seeds_images, classifier=model)
        out.update(diversity=div["diversity"], diversity_geometry=div["diversity_geometry"], diversity_prompts=len(seeds_images),
                   diversity_seeds=min(len(v) for v in seeds_images.values()))
    return out


def diversity_prompts(n: int = DIVERSITY_PROMPTS) -> list[str]:
    """``n`` held-out prompts spread evenly over the held-out set (which is in shape-major order): the diversity prompts."""
    from pocketfusion.demo.suite import demo_suite

    held = demo_suite().heldout()
    if not 1 <= n <= len(held):
        raise UserError(f"diversity prompts: n must be in 1..{len(held)}, got {n}")
    return [held[i * len(held) // n] for i in range(n)]


def measure_model(model=None, *, prompts: int = 60, steps: int = 50, guidance: float = 4.0, seed: int = 0,
                  n_diversity: int = DIVERSITY_PROMPTS, diversity_seeds: int = DIVERSITY_SEEDS) -> dict:
    """Generate with ``model`` (default: the demo teacher) on the first ``prompts`` held-out prompts and ``measure``.

    Diversity: ``diversity_prompts(n_diversity)``, each drawn with seeds ``seed .. seed + diversity_seeds - 1``
    (``generate_images`` seeds image i with seed + i); 0 skips it.
    """
    from pocketfusion.checkpoint import load_model
    from pocketfusion.demo.suite import demo_suite
    from pocketfusion.generate import GenerateConfig, generate_images

    model = model if model is not None and not isinstance(model, (str, Path)) else load_model(model)
    held = demo_suite().heldout(prompts)
    cfg = GenerateConfig(steps=steps, guidance=guidance, seed=seed)
    images, _ = generate_images(model, held, cfg)
    chosen = diversity_prompts(n_diversity) if n_diversity else []
    seeds_images = {p: generate_images(model, [p] * diversity_seeds, cfg)[0] for p in chosen} or None
    return {**measure(images, held, seeds_images), "steps": steps, "guidance": guidance, "seed": seed}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pocketfusion.demo.distribution", description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="train the scene classifier on renders of the training scenes")
    mode.add_argument("--measure", nargs="?", const="", metavar="MODEL", help="measure a model (default: the demo teacher)")
    ap.add_argument("--out", default=str(CLASSIFIER_DIR), help="--train: folder to write (default: the shipped classifier)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=ClassifierTrainConfig.iterations)
    ap.add_argument("--prompts", type=int, default=60, help="--measure: held-out prompts")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: deterministic and polite on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.train:
            report = train_classifier(ClassifierTrainConfig(seed=args.seed, iterations=args.iterations), args.out)
            keys = ("accuracy_heldout_renders", "accuracy_heldout_renders_blur1", "train_seconds")
            print(json.dumps({k: report[k] for k in keys}, indent=2))
        else:
            print(json.dumps(measure_model(args.measure or None, prompts=args.prompts, steps=args.steps, guidance=args.guidance,
                                           seed=args.seed), indent=2))
    except UserError as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
