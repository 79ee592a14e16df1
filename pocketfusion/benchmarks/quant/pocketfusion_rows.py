"""pocketfusion's own rows: RTN grids, the calibrated (GPTQ, mixed precision) model, and its exports."""

from __future__ import annotations

import copy
import time

from pocketfusion.benchmarks.quant.measure import artifact_bytes, quiet, torch_runner
from pocketfusion.benchmarks.quant.rows import NotAvailable, Planned, Row, planned
from pocketfusion.benchmarks.quant.targets import run_on_target


def pf_rtn(unet, bits: int, group_size: int = 32):
    """pocketfusion RTN on a copy: every Linear / Conv2d at ``bits`` (``compress.quant.grid.rtn_grid``)."""
    from pocketfusion.compress.quant.grid import rtn_grid

    u = copy.deepcopy(unet)
    grid = rtn_grid(u, bits, group_size=group_size)
    return u, grid


def grid_packed_bytes(unet, grid, scale_bytes: int = 2) -> float:
    """Bytes the targets store for a grid: int8 1 B, int4 ½ B per weight, fp16 scales, the rest fp32."""
    from pocketfusion.compress.quant import weight_bytes

    return weight_bytes(unet, grid.weight_bits, {n: g.group_size for n, g in grid.layers.items()}, scale_bytes=scale_bytes)["bytes"]


def grid_bits_detail(grid, bits: int) -> str:
    """``"4 (12 layers at 8, 3 per-channel)"``: the layers off the nominal bits, int4 layers without groups."""
    others: dict[int, int] = {}
    for g in grid.layers.values():
        if g.bits != bits:
            others[g.bits] = others.get(g.bits, 0) + 1
    per_ch = sum(1 for g in grid.layers.values() if g.bits == 4 and g.group_size is None)
    parts = [str(bits)] + [f"{n} layers at {ob}" for ob, n in sorted(others.items())]
    if per_ch:
        parts.append(f"{per_ch} per-channel")
    return parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")


def _on_grid(b, r: Row, unet, grid, bits: int) -> None:
    r.size_bytes, r.size_kind, r.fp32_bytes = grid_packed_bytes(unet, grid), "packed", b.fp32_param_bytes
    r.bits_detail = grid_bits_detail(grid, bits)
    r.run, r.generate = torch_runner(unet), b.torch_generate(unet)


def rtn_row(b, bits: int):
    def make(r: Row):
        gs = b.a.group_size
        u, grid = pf_rtn(b.unet, bits, gs)
        _on_grid(b, r, u, grid, bits)
        r.notes.append(f"compress.quant.grid.rtn_grid: every Linear/Conv2d at {bits} bits"
                       + (f", group {gs}" if bits == 4 else ", per channel"))

    return make


def gptq_row(b, scheme: str, bits: int):
    def make(r: Row):
        _, m, grid, secs = b.compressed_model(scheme, "gptq")
        r.make_seconds = secs
        _on_grid(b, r, m.unet, grid, bits)
        kept = grid.settings.get("mixed_precision", {}).get("kept_8bit", [])
        r.notes.append("quantize(QuantConfig(method='gptq'))"
                       + (f"; {len(kept)} layers kept at 8 bits by measured sensitivity" if kept else ""))

    return make


def rtn_like_row(b, scheme: str, bits: int):
    def make(r: Row):
        from pocketfusion.compress.quant import rtn_like

        _, _, calibrated, _ = b.compressed_model(scheme, "gptq")
        t0 = time.perf_counter()
        u = copy.deepcopy(b.unet)
        grid = rtn_like(u, calibrated)
        r.make_seconds = time.perf_counter() - t0
        _on_grid(b, r, u, grid, bits)
        r.notes.append("compress.quant.rtn_like: RTN onto the calibrated grid's per-layer bits and groups (equal size)")

    return make


def describe_quantization(r: Row, q: dict) -> None:
    """Bits per layer kind, activations, fallbacks and notes of an export's ``quantization`` entry."""
    kinds = (("layers_int4", "int4"), ("layers_int8", "int8"), ("layers_float", "float"))
    counts = [f"{q.get(k, 0)} {lab}" for k, lab in kinds if q.get(k)]
    r.bits_detail = f"{r.bits} ({', '.join(counts)})" if counts else str(r.bits)
    acts = q.get("activations")
    if isinstance(acts, dict):
        kinds = [f"{k} {v}" for k, v in acts.items() if isinstance(v, int) and v]
        r.notes.append("activations: " + (", ".join(kinds) or "float") + (f" ({acts['note']})" if acts.get("note") else ""))
    elif acts:
        r.notes.append(f"activations: {acts}")
    if q.get("fallbacks"):
        r.notes.append(f"{len(q['fallbacks'])} fallbacks (see JSON)")
    r.notes += list(q.get("notes", []))[:3]


def export_row(b, scheme: str, target: str):
    """The calibrated model exported to ``target`` (U-Net only), run in the target's runtime."""

    def make(r: Row):
        from pocketfusion import artifact
        from pocketfusion.export.api import export
        from pocketfusion.export.base import ExportConfig

        _, m, _, _ = b.compressed_model(scheme, "gptq")
        fp32 = b.fp32_file_bytes(target)  # also makes the fp32 export the runtime rows swap into
        out = b.work / f"export-{scheme}-{target}"
        t0 = time.perf_counter()
        cfg = ExportConfig(targets=(target,), components=("unet",), coreml_precision="fp32", seed=b.a.seed)
        with quiet():
            man = export(m, cfg, out, progress=False)
        r.make_seconds = time.perf_counter() - t0
        comp = man.component("unet", target)
        entry = man.metrics["components"][comp.key]
        q = entry.get("quantization")
        path = artifact.resolve_path(out, comp.path)
        size = artifact_bytes(path)
        r.extra["export_entry"] = {k: v for k, v in entry.items() if k not in ("inputs", "outputs")}
        if not q:
            raise NotAvailable(f"the {target} exporter writes no quantized weights yet (no 'quantization' in its manifest entry; "
                               f"the file holds fp32 on-grid weights, {size / fp32:.0%} of fp32)")
        r.size_bytes, r.size_kind, r.fp32_bytes = size, "file", fp32
        describe_quantization(r, q)
        par = entry.get("parity", {})
        if par.get("rel_max") is not None:
            r.extra["parity_vs_on_grid"] = par
        run_on_target(b, r, target, path, b.work / f"swap-{scheme}-{target}", comp.layer_map)

    return make


def pytorch_rows(b, bits: int) -> list[Planned]:
    """RTN, (at 4 bits) RTN onto the calibrated bits, and the calibrated model, all in PyTorch."""
    scheme = f"w{bits}"
    out = [planned(f"pocketfusion RTN w{bits}", "pocketfusion", "pytorch", bits, {"pocketfusion", "rtn", "pytorch"}, rtn_row(b, bits))]
    if bits == 4:
        out.append(planned("pocketfusion RTN w4, GPTQ's bits", "pocketfusion", "pytorch", bits, {"pocketfusion", "rtn", "gptq", "pytorch"},
                           rtn_like_row(b, scheme, bits)))
    out.append(planned(f"pocketfusion GPTQ w{bits}", "pocketfusion", "pytorch", bits, {"pocketfusion", "gptq", "pytorch"},
                       gptq_row(b, scheme, bits)))
    return out


def target_row(b, bits: int, target: str) -> Planned:
    return planned(f"pocketfusion GPTQ w{bits} -> {target}", "pocketfusion", target, bits, {"pocketfusion", "gptq", target},
                   export_row(b, f"w{bits}", target))
