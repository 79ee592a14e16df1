"""Core ML does not predict on Linux: measure a package by reading its weights back into the PyTorch U-Net.

Which constant holds a layer's weight comes from the export's layer map (``Component.layer_map``:
module name -> the weight's ``const`` op, or the ``<const>_quantized`` op pocketfusion's lowering
writes); a peer tool's package made from the fp32 export keeps those constants, renamed with a
suffix (``_palettized``, ``_quantized``, ...) that is stripped on both sides."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Mapping
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
    return {_const(k): np.asarray(v.val, dtype=np.float32) for k, v in meta.items()}


def _const(name: str) -> str:
    """The ``const`` a (compressed) op was made from: ``<const>_palettized`` -> ``<const>``."""
    for s in _CT_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def unet_with_coreml_weights(unet, weights: dict[str, np.ndarray], layer_map: Mapping[str, str]):
    """A copy of ``unet`` whose Linear/Conv2d weights are those read back from a Core ML package,
    found through the export's layer map. Returns ``(unet, matched, total)``."""
    import torch

    from pocketfusion.compress.quant.grid import quantizable_layers
    from pocketfusion.export.layer_map import split

    u = copy.deepcopy(unet)
    layers = quantizable_layers(u)
    matched = 0
    with torch.no_grad():
        for name, mod in layers.items():
            held = split(layer_map[name]) if name in layer_map else []
            w = weights.get(_const(held[0])) if len(held) == 1 else None
            if w is None or w.size != mod.weight.numel():
                continue
            mod.weight.copy_(torch.from_numpy(w.reshape(tuple(mod.weight.shape))))
            matched += 1
    return u, matched, len(layers)


def coreml_measure(b, r: Row, pkg: Path, layer_map: Mapping[str, str]) -> None:
    """Fill ``r``'s runner and image generator with the package's weights run in PyTorch (no latency)."""
    u, matched, total = unet_with_coreml_weights(b.unet, coreml_weights(pkg), layer_map)
    r.notes.append(f"Core ML cannot run on Linux: error and images use the {matched}/{total} Linear/Conv2d weights "
                   "read back from the package, run in PyTorch; no latency")
    r.run, r.generate, r.time_it = torch_runner(u), b.torch_generate(u), False
