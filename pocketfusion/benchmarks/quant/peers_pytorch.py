"""Peers at the PyTorch level: optimum-quanto and torchao weight-only quantization of a U-Net copy."""

from __future__ import annotations

import copy

from pocketfusion.benchmarks.quant.measure import quiet, state_dict_bytes, torch_runner
from pocketfusion.benchmarks.quant.rows import NotAvailable, Planned, Row, planned

TORCHAO_VARIANTS = {8: ("int8", "intx8"), 4: ("intx4",)}
TORCHAO_LABELS = {"int8": "torchao Int8WeightOnly (Linear)", "intx8": "torchao IntxWeightOnly int8",
                  "intx4": "torchao IntxWeightOnly int4 g32"}


def peer_quanto(unet, bits: int):
    """optimum-quanto weight-only ``qint8`` / ``qint4`` (its defaults) on a copy, frozen."""
    try:
        from optimum.quanto import freeze, qint4, qint8, quantize
    except ImportError as e:
        raise NotAvailable(f"optimum-quanto is not installed ({e}); pip install 'pocketfusion[peers]'") from None
    u = copy.deepcopy(unet)
    with quiet():
        quantize(u, weights={8: qint8, 4: qint4}[bits])
        freeze(u)
    qmods = [m for m in u.modules() if hasattr(m, "weight_qtype") and m.weight_qtype is not None]
    note = f"{len(qmods)} Linear/Conv2d quantized with quanto's defaults"
    if bits == 4:  # quanto picks 128 (or 96, 64) inputs a group where it divides, else one scale per output channel
        sizes: dict[str, int] = {}
        for m in qmods:
            k = f"g{m.weight_group_size}" if m.weight_group_size else "per-channel"
            sizes[k] = sizes.get(k, 0) + 1
        note += " (affine int4; " + ", ".join(f"{v} {k}" for k, v in sorted(sizes.items())) + ")"
    else:
        note += " (symmetric int8 per output channel)"
    return u, [note]


def _divisible(group: int):
    import torch

    def ok(m, fqn=""):
        if isinstance(m, torch.nn.Linear):
            return m.in_features % group == 0
        if isinstance(m, torch.nn.Conv2d):
            return m.weight[0].numel() % group == 0
        return False

    return ok


def peer_torchao(unet, variant: str):
    """torchao weight-only on a copy. ``variant``: ``int8`` (``Int8WeightOnlyConfig``, stock filter:
    Linear only), ``intx8`` (``IntxWeightOnlyConfig`` int8 per channel, Linear + Conv2d), ``intx4``
    (``IntxWeightOnlyConfig`` int4 ``PerGroup(32)``, Linear + Conv2d whose input size divides by 32)."""
    import torch

    try:
        with quiet():
            from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
            from torchao.quantization.granularity import PerAxis, PerGroup
    except ImportError as e:
        raise NotAvailable(f"torchao is not installed ({e}); pip install 'pocketfusion[executorch]'") from None
    u = copy.deepcopy(unet)
    lin_conv = (torch.nn.Linear, torch.nn.Conv2d)
    n_all = sum(1 for m in u.modules() if isinstance(m, lin_conv))
    with quiet():
        if variant == "int8":
            quantize_(u, Int8WeightOnlyConfig())
            note = "Int8WeightOnlyConfig with quantize_'s default filter: Linear only, Conv2d stay fp32 (it fails on convs)"
        elif variant == "intx8":
            quantize_(u, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
                      filter_fn=lambda m, f: isinstance(m, lin_conv))
            note = "IntxWeightOnlyConfig int8 PerAxis(0) with a Linear+Conv2d filter"
        elif variant == "intx4":
            quantize_(u, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)), filter_fn=_divisible(32))
            note = ("IntxWeightOnlyConfig int4 PerGroup(32), Linear+Conv2d whose input size divides by 32 (torchao refuses the rest); "
                    "int4 values stored unpacked in int8 (its default UNPACKED_TO_INT8 format)")
        else:
            raise ValueError(variant)
    n_q = sum(1 for m in u.modules() if isinstance(m, lin_conv) and type(m.weight).__name__ not in ("Parameter", "Tensor"))
    return u, [f"{note}; {n_q} of {n_all} Linear/Conv2d quantized"]


def torch_peer(b, fn, *args):
    """``make(row)`` of a PyTorch-level peer ``fn(unet, *args) -> (quantized copy, notes)``."""

    def make(r: Row):
        u, notes = fn(b.unet, *args)
        r.size_bytes, r.size_kind, r.fp32_bytes = state_dict_bytes(u), "torch.save", b.fp32_state_bytes
        r.run, r.generate = torch_runner(u), b.torch_generate(u)
        r.notes += notes

    return make


def rows(b, bits: int) -> list[Planned]:
    """quanto and torchao rows at ``bits``."""
    out = [planned(f"optimum-quanto qint{bits}", "optimum-quanto", "pytorch", bits, {"peers", "quanto", "pytorch"},
                   torch_peer(b, peer_quanto, bits))]
    for v in TORCHAO_VARIANTS[bits]:
        out.append(planned(TORCHAO_LABELS[v], "torchao", "pytorch", bits, {"peers", "torchao", "pytorch"}, torch_peer(b, peer_torchao, v)))
    return out
