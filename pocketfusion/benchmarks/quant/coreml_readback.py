"""Core ML does not predict on Linux: measure a package by reading its weights back into the PyTorch U-Net."""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import numpy as np

from pocketfusion.benchmarks.quant.measure import quiet, torch_runner
from pocketfusion.benchmarks.quant.rows import Row

SIZE_ONLY_NOTE = "fp32 ML Program; Core ML cannot run on Linux: size only"
_CT_SUFFIXES = ("_palettized", "_quantized", "_dequantized", "_sparsified")


def coreml_weights(mlpackage: Path) -> dict[str, np.ndarray]:
    """Every weight of an ``.mlpackage`` as float32, compressed ones decompressed, by const name."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    with quiet(), contextlib.redirect_stderr(io.StringIO()):
        ml = ct.models.MLModel(str(mlpackage), skip_model_load=True)
        meta = cto.get_weights_metadata(cto.decompress_weights(ml), weight_threshold=1)
    out = {}
    for k, v in meta.items():
        for s in _CT_SUFFIXES:
            if k.endswith(s):
                k = k[: -len(s)]
                break
        out[k] = np.asarray(v.val, dtype=np.float32)
    return out


def unet_with_coreml_weights(unet, weights: dict[str, np.ndarray], prefix: str = "p_unet_"):
    """A copy of ``unet`` whose Linear/Conv2d weights are those read back from a Core ML package.

    Core ML names a parameter ``<prefix><module path with '.' -> '_'>_weight``. Returns
    ``(unet, matched, total)``."""
    import torch

    from pocketfusion.compress.quant.grid import quantizable_layers

    u = copy.deepcopy(unet)
    layers = quantizable_layers(u)
    matched = 0
    with torch.no_grad():
        for name, mod in layers.items():
            w = weights.get(prefix + (name + ".weight").replace(".", "_"))
            if w is None or w.size != mod.weight.numel():
                continue
            mod.weight.copy_(torch.from_numpy(w.reshape(tuple(mod.weight.shape))))
            matched += 1
    return u, matched, len(layers)


def coreml_measure(b, r: Row, pkg: Path) -> None:
    """Fill ``r``'s runner and image generator with the package's weights run in PyTorch (no latency)."""
    u, matched, total = unet_with_coreml_weights(b.unet, coreml_weights(pkg))
    r.notes.append(f"Core ML cannot run on Linux: error and images use the {matched}/{total} Linear/Conv2d weights "
                   "read back from the package, run in PyTorch; no latency")
    r.run, r.generate, r.time_it = torch_runner(u), b.torch_generate(u), False
