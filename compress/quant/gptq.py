"""GPTQ with static clip-searched scales (Frantar et al. 2022), onto the grid of ``grid.py``.

Each layer's scales are fixed first by a clipping search that minimises the input-weighted rounding
error (``diag(H)``-weighted, per channel or group); then the columns are rounded in order and each
column's error is pushed onto the columns not yet rounded through the inverse Hessian of the
layer's inputs (``H = 2 X Xᵀ / n``, convolutions via ``unfold``), collected with hooks on the
calibration feeds. The grid convention (every non-zero channel/group holds ``±qmax``) is kept
*inside* the loop: each group's largest original weight is rounded to ``±qmax`` and its error is
compensated like any other, so ``grid.snap`` is a no-op afterwards. Layers are processed in
forward order, a chunk at a time, with inputs from the already-quantized model ("sequential").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from pocketfusion.compress.quant import grid as G
from pocketfusion.compress.quant.config import BLOCK, CLIP_GRID, DAMP, QuantConfig
from pocketfusion.compress.quant.feeds import unet_call

logger = logging.getLogger(__name__)

# Hessians of layers with more input columns than this are accumulated and factorized in float32 (as GPTQ's reference
# does) instead of float64: SD-1.5's widest convolutions have 23,040 columns, a 4.2 GB float64 Hessian and ~3x that
# while it is factorized. Every layer of the demo model is below it, so its figures are float64's.
FLOAT64_MAX_COLS = 8192


def column_blocks(cols: int, max_cols: int | None) -> list[tuple[int, int]]:
    """GPTQ's column ranges for a layer: one range, or for a layer wider than ``max_cols`` equal contiguous ranges of
    at most ``max_cols`` columns, each factorized and compensated on its own (the Hessian's diagonal blocks)."""
    if max_cols is None or cols <= max_cols:
        return [(0, cols)]
    k = -(-cols // max_cols)
    b = -(-cols // k)
    return [(i, min(i + b, cols)) for i in range(0, cols, b)]


def hessian_dtype(cols: int):
    import torch

    return torch.float64 if cols <= FLOAT64_MAX_COLS else torch.float32


class _Stop(Exception):
    pass


def _conv_columns(module, x):
    """Rows of a convolution's input as the weight sees them: (N * positions, I * kh * kw)."""
    import torch.nn.functional as F

    padding = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    elif isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same", stride 1: total padding dilation * (k - 1), the extra one at the end
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
            padding = 0
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _rows(module, x):
    import torch

    x = x.detach().float()
    if isinstance(module, torch.nn.Conv2d):
        return _conv_columns(module, x)
    return x.reshape(-1, x.shape[-1])


def collect_hessians(unet, batches, names: Sequence[str], order: Sequence[str] | None = None) -> dict[str, tuple[Any, int]]:
    """``{name: (sum of x xᵀ over input rows (float64), n rows)}`` for ``names`` over the calibration batches.

    With ``order`` (forward order), each forward call stops after the last of ``names`` ran."""
    import torch

    mods = dict(unet.named_modules())
    acc: dict[str, list] = {n: [None, 0] for n in names}
    last = max(names, key=order.index) if order else None

    def hook(mod, args, n):
        x = _rows(mod, args[0])
        dt = hessian_dtype(x.shape[1])
        a = acc[n]
        if a[0] is None:
            a[0] = torch.zeros(x.shape[1], x.shape[1], dtype=dt, device=x.device)
        if dt == torch.float64:
            a[0].add_((x.T @ x).double())
        else:  # in place: no second n x n matrix
            a[0].addmm_(x.T, x)
        a[1] += x.shape[0]
        del x
        if n == last:
            raise _Stop

    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    unet_call(unet, b)
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return {n: (a[0], a[1]) for n, a in acc.items()}


# ---------------------------------------------------------------------------------------- rounding


def _flat(w):
    return w.reshape(w.shape[0], -1)


def _anchor(lg: G.LayerGrid, w):
    """Per (row, group): a mask (O, cols) of the entry with the largest |w| in its channel/group."""
    import torch

    o = w.shape[0]
    if lg.group_size is None:
        flat = w.reshape(o, 1, -1)
    else:
        i = w.shape[1]
        flat = w.reshape(o, i // lg.group_size, -1)  # conv: group g covers g * kh * kw consecutive columns
    idx = flat.abs().argmax(dim=2, keepdim=True)
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(2, idx, True)
    nonzero = flat.abs().amax(dim=2, keepdim=True) > 0
    return (mask & nonzero).reshape(o, -1), (~nonzero).expand_as(flat).reshape(o, -1)


def clip_search(lg: G.LayerGrid, w, hdiag, clip_grid: Sequence[float]):
    """Scale per channel/group: abs-max times the clip factor minimising ``sum diag(H) * (w - q s)^2``."""
    import torch

    w = w.detach().float()
    m = G.qmax(lg.bits)
    o = w.shape[0]
    cols = _flat(w).shape[1]
    ng = 1 if lg.group_size is None else w.shape[1] // lg.group_size
    dev = w.device
    hd = hdiag.float().reshape(1, ng, cols // ng).to(dev) if hdiag is not None else torch.ones(1, ng, cols // ng, device=dev)
    wf = _flat(w).reshape(o, ng, cols // ng)
    amax = wf.abs().amax(dim=2)
    best_err = torch.full((o, ng), math.inf, device=dev)
    best = torch.ones(o, ng, device=dev)
    for c in clip_grid:
        s = (amax * c / m).clamp_min(1e-30).unsqueeze(2)
        err = (((wf - torch.clamp(torch.round(wf / s), -m, m) * s) ** 2) * hd).sum(dim=2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, c), best)
    clip = best if lg.group_size is not None else best.squeeze(1)
    return G.absmax_scale(w, lg.bits, lg.group_size, clip), clip


def gptq(w, H, scale_cols, m: int, anchor, zero, *, damp: float = DAMP, block: int = BLOCK, act_order: bool = False,
         overwrite_h: bool = False):
    """GPTQ over the columns of ``w`` (O, cols) with fixed per-column scales ``scale_cols`` (O, cols).

    ``anchor`` entries are rounded to ``±m`` (sign of the original weight), ``zero`` entries to 0.
    ``overwrite_h``: ``H`` may be used as scratch (saves one n x n copy). Returns the integers (O, cols) as float."""
    import torch

    cols = w.shape[1]
    dt = hessian_dtype(cols)
    W = w.detach().to(dt).clone()
    S = scale_cols.to(dt)
    sign = torch.sign(W)
    H = H.to(dt) if overwrite_h else H.to(dt).clone()  # modified in place below; at most two n x n matrices live at once
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, S, sign, anchor, zero, H = W[:, perm], S[:, perm], sign[:, perm], anchor[:, perm], zero[:, perm], H[perm][:, perm]
    d = damp * float(torch.mean(torch.diag(H)))
    added = 0.0
    for attempt in range(6):
        H.diagonal().add_(d - added)
        added = d
        try:
            L = torch.linalg.cholesky(H)
            Hinv = torch.cholesky_inverse(L)
            del L
            Hinv = torch.linalg.cholesky(Hinv, upper=True)
            break
        except RuntimeError:  # not positive definite: more damping
            d = d * 10 if d > 0 else 1e-6
    else:
        raise RuntimeError("Hessian is not positive definite even with heavy damping")
    del H
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        Hi = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            col = W1[:, i]
            q = torch.clamp(torch.round(col / S[:, c]), -m, m)
            q = torch.where(anchor[:, c], sign[:, c] * m, q)
            q = torch.where(zero[:, c], torch.zeros_like(q), q)
            Q1[:, i] = q
            err = (col - q * S[:, c]) / Hi[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hi[i, i:].unsqueeze(0)
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.float()


def quantize_layer(module, name: str, bits: int, group_size: int | None, method: str, hessian=None, *,
                   damp: float = DAMP, clip_grid: Sequence[float] = CLIP_GRID, block: int = BLOCK,
                   act_order: bool = False, max_cols: int | None = None) -> tuple[G.LayerGrid, Any]:
    """One layer onto its grid: returns (LayerGrid, int8 integers) without touching the module.

    ``max_cols``: a wider layer's columns are rounded in ``column_blocks``, each with its own diagonal block of the
    Hessian (error compensated within the block): SD-1.5's 23,040-column convolutions cost 3 factorizations of
    7,680 columns, 1/9 of one of 23,040."""
    import torch

    if method == "rtn" or hessian is None or hessian[1] == 0:
        return G.rtn(module, name, bits, group_size)
    H = hessian[0] / hessian[1]
    H *= 2
    w = module.weight.detach().float()
    kind = "linear" if isinstance(module, torch.nn.Linear) else "conv"
    lg = G.LayerGrid(name, kind, bits, group_size, tuple(w.shape))
    lg.scale, _ = clip_search(lg, w, torch.diag(H), clip_grid)
    anchor, zero = _anchor(lg, w)
    scale_cols = _flat(lg.expand(lg.scale))
    wf = _flat(w)
    parts = column_blocks(wf.shape[1], max_cols)
    if len(parts) == 1:
        q = gptq(wf, H, scale_cols, G.qmax(bits), anchor, zero, damp=damp, block=block, act_order=act_order, overwrite_h=True)
    else:
        q = torch.cat([gptq(wf[:, a:b], H[a:b, a:b].clone(), scale_cols[:, a:b], G.qmax(bits), anchor[:, a:b], zero[:, a:b],
                            damp=damp, block=block, act_order=act_order, overwrite_h=True) for a, b in parts], dim=1)
        lg.reason = f"GPTQ in {len(parts)} column blocks of at most {max(b - a for a, b in parts)} (Hessian's diagonal blocks)"
    del H
    q = q.reshape(w.shape).to(torch.int8)
    snapped = G.snap(lg, q)
    if not bool((snapped == q).all()):  # cannot happen with the anchors; kept as a guard
        logger.warning("layer %s: GPTQ integers needed snapping", name)
    return lg, snapped


def _supported(module) -> str | None:
    """Why GPTQ cannot take this layer (RTN is used), or None."""
    import torch

    if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
        return "grouped convolution"
    return None


def _chunks(names: Sequence[str], mods: dict, k: int, max_bytes: int) -> list[list[str]]:
    """Consecutive layers, at most ``k`` a chunk and their float64 Hessians within ``max_bytes`` together."""
    parts: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for n in names:
        cols = _flat(mods[n].weight).shape[1]
        b = cols * cols * hessian_dtype(cols).itemsize
        if cur and (len(cur) >= k or size + b > max_bytes):
            parts.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += b
    if cur:
        parts.append(cur)
    return parts


def quantize_weights(unet, batches, plan: dict[str, tuple[int, int | None]], cfg: QuantConfig, *, order: Sequence[str],
                     sequential: bool | None = None, apply: bool = True,
                     progress: bool = False) -> tuple[dict[str, G.LayerGrid], dict[str, Any]]:
    """Quantize every layer of ``plan`` (``{name: (bits, group_size)}``) with ``cfg.method``.

    GPTQ collects the Hessians of ``cfg.chunks`` groups of consecutive layers (forward order) in one
    pass each; with ``sequential`` (default ``cfg.sequential``) every chunk is applied before the next
    chunk's pass, so later layers see the inputs the quantized model gives them. Returns (grids,
    integers); with ``apply`` the weights are on the grid afterwards (with ``sequential`` always; with
    neither the model is untouched)."""
    from tqdm import tqdm

    method = cfg.method
    sequential = cfg.sequential if sequential is None else sequential
    mods = dict(unet.named_modules())
    names = [n for n in order if n in plan]
    grids, ints = {}, {}
    if method == "rtn":
        for n in names:
            grids[n], ints[n] = G.rtn(mods[n], n, *plan[n])
    else:
        parts = _chunks(names, mods, max(1, math.ceil(len(names) / max(1, cfg.chunks))), cfg.hessian_bytes)
        bar = tqdm(total=len(names), desc=f"gptq w{'/'.join(str(b) for b in sorted({p[0] for p in plan.values()}))}",
                   unit="layer", disable=not progress)
        for part in parts:
            hs = collect_hessians(unet, batches, part, order)
            for n in part:
                why = _supported(mods[n])
                grids[n], ints[n] = quantize_layer(mods[n], n, *plan[n], "rtn" if why else method, hs.pop(n), damp=cfg.damp,
                                                   clip_grid=cfg.clip_grid, block=cfg.block, act_order=cfg.act_order,
                                                   max_cols=cfg.gptq_max_cols)
                if why:
                    grids[n].reason = f"{why}: round to nearest"
                bar.update(1)
            del hs
            if sequential:  # the next chunk's Hessians see this chunk's quantized outputs
                G.apply(unet, G.QuantGrid("tmp", method, {n: grids[n] for n in part}), ints)
        bar.close()
    if apply:
        G.apply(unet, G.QuantGrid("tmp", method, grids), ints)
    return grids, ints
