"""The layer map: PyTorch module name -> where its weight lies in a written file.

Every exporter records one at export time (``Exported.layer_map``, stored as the manifest's
``Component.layer_map``): keys are module names relative to the component's source module (the
names of a quantization grid's layers, ``"down_blocks.0.resnets.0.conv1"``), values name what holds
that module's weight in the file:

==========  ==========================================================================================
target      value
==========  ==========================================================================================
onnx        the initializer (a grid layer: ``q<i>``, the integers feeding a DequantizeLinear)
tflite      the tensor (a grid layer: ``<layer>.weight.q``; pieces of a weight the converter split)
coreml      the MIL op (a grid layer: the ``constexpr_*`` op ``<const>_quantized``; else the ``const``)
executorch  the key of the weight's bytes in the program's named data (XNNPACK: SHA-256 of the bytes)
==========  ==========================================================================================

A weight held by several tensors (a converter split it along output rows, or duplicated it) maps to
their names joined by ``SEP``, in row order. The quantized exporters read the integers back through
the map (``read_integers`` of each ``quant_<target>`` module): nothing is re-matched after writing.

``match`` is the one way the exporters find a module's weight among a converted graph's constants:
by the name the converter is known to give it where there is one (``expected``), else by value (the
weight, in torch layout, bit for bit). It runs once, while lowering.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable, Mapping

import numpy as np

SEP = "+"


def join(names: Iterable[str]) -> str:
    return SEP.join(names)


def split(value: str) -> list[str]:
    return value.split(SEP)


def value_key(a: np.ndarray) -> str:
    """Shape and content hash of an array (as float32: exact for fp16 and fp32 values)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    return f"{a.shape}:{hashlib.sha1(a.tobytes()).hexdigest()}"


def match(
    weights: Mapping[str, np.ndarray],
    candidates: Mapping[Hashable, np.ndarray],
    *,
    expected: Mapping[str, Hashable] | None = None,
    all_equal: bool = False,
) -> dict[str, list]:
    """Which candidate constants hold each module's weight: ``{module: [candidate, ...]}`` (``[]``: none).

    Args:
        weights: module name -> its weight in torch layout (the values the file must hold).
        candidates: constant of the converted graph -> its value, in torch layout.
        expected: module name -> the candidate the converter names after it (checked by value).
        all_equal: give a module every unclaimed candidate equal to its weight (a converter that
            duplicated a constant), not only the first.

    Modules are served in order; a candidate goes to one module only.
    """
    index: dict[str, list] = {}
    for c, a in candidates.items():
        index.setdefault(value_key(a), []).append(c)
    claimed: set = set()
    found: dict[str, list] = {}
    for name, w in weights.items():
        key = value_key(w)
        want = (expected or {}).get(name)
        if want is not None and want in candidates and want not in claimed and value_key(candidates[want]) == key:
            hits = [want]
        else:
            hits = [c for c in index.get(key, []) if c not in claimed]
            hits = hits if all_equal else hits[:1]
        claimed.update(hits)
        found[name] = hits
    return found
