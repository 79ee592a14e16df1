"""Prompt accuracy of the demo model: attributes recovered from pixels.

No learned judge: every attribute is read off the image by plain pixel statistics, so the metric
cannot share a bias with the model it scores.

* background — median colour of the outer border ring, snapped to the palette;
* shape mask — how far each pixel is from the background colour, relative to the shape colour
  (a soft 0..1 coverage, so anti-aliased and blurred edges count fractionally);
* colour — median of the pixels the shape covers fully, snapped to the palette (not the background);
* position — coverage-weighted centroid, nearest canonical centre (with ``lora=True`` also the demo LoRA's
  ``LORA_CENTRES``: the default reading, and every recorded base-model figure, knows only the five base positions);
* size — side of the shape's bounding box (``small`` ≈ 18 px, ``large`` ≈ 32 px at 64 px);
* shape — nearest template: each shape rendered at the measured bounding box, compared with the
  observed coverage (sum of squared differences).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pocketfusion.demo.scenes import _CENTRES, _SIZE_PX, ATTRIBUTES, COLORS, LORA_CENTRES, SHAPES, Scene, shape_mask

_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[n] for n in _NAMES], dtype=np.float32)


def _nearest_colour(rgb: np.ndarray, exclude: str | None = None) -> str:
    d = np.linalg.norm(_PALETTE - rgb[None, :], axis=1)
    if exclude is not None:
        d[_NAMES.index(exclude)] = np.inf
    return _NAMES[int(np.argmin(d))]


def read_attributes(image: np.ndarray, *, lora: bool = False) -> dict[str, str]:
    """Recover (shape, color, background, size, position) from an (H, W, 3) uint8 image.

    ``lora``: positions are read among the base ones and the demo LoRA's (``scenes.LORA_POSITIONS``).
    """
    centres = {**_CENTRES, **LORA_CENTRES} if lora else _CENTRES
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    h, w, _ = img.shape
    ring = max(1, h // 32)
    border = np.concatenate(
        [img[:ring].reshape(-1, 3), img[-ring:].reshape(-1, 3), img[:, :ring].reshape(-1, 3), img[:, -ring:].reshape(-1, 3)]
    )
    background = _nearest_colour(np.median(border, axis=0))
    bg = _PALETTE[_NAMES.index(background)]

    dist = np.linalg.norm(img - bg, axis=2)
    far = dist > 0.5 * dist.max() if dist.max() > 40 else np.zeros_like(dist, dtype=bool)
    if not far.any():  # nothing drawn: fall back to canonical guesses, which will be scored wrong
        return {"shape": "none", "color": "none", "background": background, "size": "none", "position": "none"}
    core = img[far & (dist >= np.percentile(dist[far], 50))]
    color = _nearest_colour(np.median(core, axis=0), exclude=background)
    fg = _PALETTE[_NAMES.index(color)]
    coverage = np.clip(dist / max(float(np.linalg.norm(fg - bg)), 1.0), 0.0, 1.0)
    coverage[coverage < 0.25] = 0.0  # ignore faint noise far from the shape

    # The half-coverage contour is where a symmetric blur leaves a straight edge: measure the box there.
    mask = coverage >= 0.5
    rows = np.nonzero(mask.sum(axis=1) >= 1)[0]
    cols = np.nonzero(mask.sum(axis=0) >= 1)[0]
    if len(rows) == 0 or len(cols) == 0:
        return {"shape": "none", "color": color, "background": background, "size": "none", "position": "none"}
    bh = rows[-1] - rows[0] + 1
    bw = cols[-1] - cols[0] + 1
    side = max(bh, bw) * 64.0 / w
    size = "small" if side < (_SIZE_PX["small"] + _SIZE_PX["large"]) / 2 else "large"

    total = coverage.sum()
    ys, xs = np.mgrid[0:h, 0:w]
    cy = float((coverage * (ys + 0.5)).sum() / total) / h
    cx = float((coverage * (xs + 0.5)).sum() / total) / w
    position = min(centres, key=lambda p: (centres[p][0] - cx) ** 2 + (centres[p][1] - cy) ** 2)

    # Shape: nearest template. Render each shape at the measured box (and ±10 % in size) and keep
    # the one closest to the observed coverage; robust to the rounded corners of a blurry decoder.
    bx = (cols[0] + cols[-1] + 1) / 2.0
    by = (rows[0] + rows[-1] + 1) / 2.0
    best = (np.inf, "none")
    for name in SHAPES:
        for f in (0.9, 1.0, 1.1):
            err = float(np.square(coverage - shape_mask(name, bx, by, max(bh, bw) * f, w)).sum())
            best = min(best, (err, name))
    shape = best[1]
    # A blurred small triangle can look round, but it always keeps most of its mass low in its box.
    box = coverage[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    top, bottom = box[: bh // 2].sum(), box[bh - bh // 2 :].sum()
    if bottom > 1.45 * max(top, 1e-6):
        shape = "triangle"
    return {"shape": shape, "color": color, "background": background, "size": size, "position": position}


def prompt_accuracy(images: Sequence[np.ndarray], scenes: Sequence[Scene], *, lora: bool = False) -> dict:
    """Per-attribute accuracy of ``images`` against the ``scenes`` they were prompted with.

    ``lora``: read positions with the demo LoRA's too (``read_attributes(lora=True)``), for its prompts.

    Returns ``{"per_attribute": {attr: acc}, "all_correct": acc, "n": N, "predictions": [...]}``.
    """
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} prompts")
    if not scenes:
        raise ValueError("no images to score")
    hits = {a: 0 for a in ATTRIBUTES}
    exact = 0
    preds = []
    for img, scene in zip(images, scenes):
        got = read_attributes(img, lora=lora)
        want = scene.as_dict()
        ok = {a: got[a] == want[a] for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            hits[a] += ok[a]
        exact += all(ok.values())
        preds.append({"prompt": scene.prompt, "read": got, "correct": ok})
    n = len(scenes)
    return {
        "n": n,
        "per_attribute": {a: hits[a] / n for a in ATTRIBUTES},
        "all_correct": exact / n,
        "predictions": preds,
    }
