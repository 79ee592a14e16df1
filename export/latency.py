"""U-Net latency measured on a target runtime, per removable unit: the lookup table pruning searches with.

Each variant (the U-Net with some units removed, ``pocketfusion.pruning``) is exported to the runtime's
target at the model's real shapes (the sampler's batch, latent and context size) and timed through the
runtime's own session (``pocketfusion.runtimes``), all variants round robin so that a drifting host
speed falls on every variant alike. Never MACs: removing a block of few MACs can save much time
(many small ops) and one of many MACs little (BK-SDM's issue #67).

    table = unit_table(unet, "onnxruntime", seq_len=77)        # {unit: saving when removed}
    ms = measure_variants(unet, {"full": [], "pruned": names}, "onnxruntime", seq_len=77)
"""

from __future__ import annotations

import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pocketfusion import backends, pruning
from pocketfusion.errors import UserError

_SESSIONS_IN_MEMORY_BYTES = 2 << 30  # above this, variants are loaded one at a time per round


def _variant(unet, removed: list[str]):
    """A copy of ``unet`` without units ``removed`` (weights shared with ``unet`` where they are kept)."""
    # a structural copy: the removal replaces modules inside blocks, so copy the module tree, not the tensors
    memo = {id(p): p for p in unet.parameters()}
    memo.update({id(b): b for b in unet.buffers()})
    v = copy.deepcopy(unet, memo)
    pruning.remove(v, removed)
    return v.eval()


def export_variant(unet, removed: list[str], runtime: str, path: Path, *, seq_len: int) -> Path:
    """Export ``unet`` without ``removed`` for ``runtime`` to ``path`` (parity is not checked here: the
    removal is exact by construction and the final model's export checks parity)."""
    from pocketfusion.export.base import ExportConfig
    from pocketfusion.export.components import unet_spec

    target = backends.for_runtime(runtime).target
    spec = unet_spec(_variant(unet, removed), seq_len=seq_len)
    cfg = ExportConfig(targets=(target,), components=("unet",), check_parity=False, executorch_profile_runs=0)
    backends.exporter(target).export_component(spec, path, cfg)
    return path


def measure_variants(unet, variants: dict[str, list[str]], runtime: str, *, seq_len: int, runs: int = 10, rounds: int = 5,
                     warmup: int = 3, threads: int | None = None, progress: bool = False) -> dict[str, dict]:
    """Per-call latency of each variant of ``unet`` on ``runtime`` on this host, interleaved.

    Returns ``{variant: {"median_ms", "p90_ms", "min_ms", "samples_ms"}}``, plus the runtime's device
    string under each variant's ``"device"``.
    """
    import numpy as np
    from tqdm import tqdm

    from pocketfusion.export.components import unet_spec
    from pocketfusion.runtimes.base import load_session

    runtime = backends.canonical_runtime(runtime)
    target = backends.for_runtime(runtime).target
    if not backends.installed(target, runtime=True) or not backends.installed(target):
        extra = backends.backend(target).extra
        raise UserError(f"--runtime {runtime}: its exporter or runtime is not installed (pip install 'pocketfusion[{extra}]')")
    tmp = Path(tempfile.mkdtemp(prefix=".pocketfusion-latency-"))
    try:
        files, feeds = {}, None
        bar = tqdm(variants.items(), desc=f"export variants ({runtime})", disable=not progress, unit="variant")
        for name, removed in bar:
            suffix = {"onnx": ".onnx", "executorch": ".pte", "tflite": ".tflite", "coreml": ".mlpackage"}[target]
            files[name] = export_variant(unet, removed, runtime, tmp / f"v{len(files)}{suffix}", seq_len=seq_len)
        spec = unet_spec(unet, seq_len=seq_len)
        feeds = {s.name: spec.golden[0][s.name] for s in spec.inputs}
        size = sum(_size(p) for p in files.values())
        held = size <= _SESSIONS_IN_MEMORY_BYTES
        sessions = {n: load_session(p, runtime, threads=threads) for n, p in files.items()} if held else {}
        samples: dict[str, list[float]] = {n: [] for n in variants}
        device = ""
        for r in tqdm(range(rounds), desc=f"latency rounds ({runtime})", disable=not progress, unit="round"):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))  # no variant always runs first
            for name in order:
                s = sessions[name] if held else load_session(files[name], runtime, threads=threads)
                device = s.device
                for _ in range(warmup if (r == 0 or not held) else 1):
                    s.run(feeds)
                for _ in range(runs):
                    t = time.perf_counter()
                    s.run(feeds)
                    samples[name].append((time.perf_counter() - t) * 1e3)
        return {n: {"median_ms": statistics.median(v), "p90_ms": float(np.percentile(v, 90)), "min_ms": min(v),
                    "samples_ms": v, "device": device} for n, v in samples.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def unit_table(unet, runtime: str, *, seq_len: int, units: list[str] | None = None, runs: int = 10, rounds: int = 5,
               threads: int | None = None, progress: bool = False) -> dict:
    """The latency table of ``unet`` on ``runtime``: each unit's measured saving when removed alone.

    Returns a JSON-able dict (``compress.prune.LatencyTable.from_dict`` reads it): runtime, device,
    ``base_ms``, per unit ``ms`` (the U-Net without it) and ``saving_ms``, the measurement's settings
    and wall time.
    """
    t0 = time.perf_counter()
    names = units if units is not None else [u.name for u in pruning.units(unet)]
    variants = {"full": [], **{n: [n] for n in names}}
    res = measure_variants(unet, variants, runtime, seq_len=seq_len, runs=runs, rounds=rounds, threads=threads,
                           progress=progress)
    base = res["full"]["median_ms"]
    params = {u.name: u.params for u in pruning.units(unet)}
    return {
        "runtime": backends.canonical_runtime(runtime), "device": res["full"]["device"], "base_ms": base,
        "units": {n: {"ms": res[n]["median_ms"], "saving_ms": base - res[n]["median_ms"], "params": params.get(n, 0)}
                  for n in names},
        "method": "each unit's saving when removed alone: the U-Net without it exported and timed, round robin with the full one",
        "shapes": {"seq_len": seq_len, "sample_size": unet.config.sample_size},
        "runs": runs, "rounds": rounds, "threads": threads, "wall_s": round(time.perf_counter() - t0, 2),
    }
