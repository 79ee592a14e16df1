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


def _unit_wrapper(module, kind: str):
    """The unit as a module of positional tensors: resnet (x, temb), attention (x, context), mid (x, temb, context)."""
    import torch

    class Unit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unit = module

        def forward(self, *xs):
            if kind == "resnet":
                return self.unit(xs[0], xs[1])
            if kind == "attention":
                return self.unit(xs[0], encoder_hidden_states=xs[1], return_dict=False)[0]
            return self.unit(xs[0], xs[1], encoder_hidden_states=xs[2])

    return Unit().eval()


def unit_inputs(unet, *, seq_len: int, batch: int | None = None) -> dict[str, tuple]:
    """Each unit's real inputs in one U-Net call at the model's shapes: ``{unit: (x, temb or context, ...)}``."""
    import torch

    from pocketfusion.export.components import unet_batch

    batch = batch or unet_batch(unet)
    units = pruning.units(unet)
    seen: dict[str, tuple] = {}
    hooks = []
    for u in units:
        def hook(module, args, kwargs, name=u.name, kind=u.kind):
            ctx = kwargs.get("encoder_hidden_states")
            x, temb = args[0], (args[1] if len(args) > 1 else kwargs.get("temb"))
            seen[name] = (x, temb) if kind == "resnet" else (x, ctx) if kind == "attention" else (x, temb, ctx)
        hooks.append(unet.get_submodule(u.name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        cfg = unet.config
        s = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        ctx_dim = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
        g = torch.Generator().manual_seed(0)
        kw = {}
        if getattr(cfg, "time_cond_proj_dim", None) is not None:
            kw["timestep_cond"] = torch.zeros(batch, cfg.time_cond_proj_dim)
        with torch.no_grad():
            unet(torch.randn(batch, cfg.in_channels, s, s, generator=g), torch.full((batch,), 500.0),
                 torch.randn(batch, seq_len, ctx_dim, generator=g), **kw)
    finally:
        for h in hooks:
            h.remove()
    return {n: tuple(t.detach().clone() for t in v) for n, v in seen.items()}


def module_spec(name: str, wrapper, xs: tuple, *, source: str):
    """A ``ComponentSpec`` of ``wrapper`` (a module of positional float tensors, its submodule ``source`` the layers a
    grid names) at inputs ``xs``: inputs ``in0, in1, ...``, output ``out``, ``xs`` as its one golden feed."""
    import torch

    from pocketfusion.artifact import TensorSpec
    from pocketfusion.export.components import ComponentSpec

    with torch.no_grad():
        out = wrapper(*xs)
    specs = tuple(TensorSpec(f"in{i}", tuple(x.shape), "float32") for i, x in enumerate(xs))
    feed = {s.name: x.float().numpy() for s, x in zip(specs, xs)}
    return ComponentSpec(name, wrapper, specs, (TensorSpec("out", tuple(out.shape), "float32"),), [feed], source=source)


def unit_table_alone(unet, runtime: str, *, seq_len: int, units: list[str] | None = None, runs: int = 10, rounds: int = 3,
                     threads: int | None = None, progress: bool = False) -> dict:
    """The latency table with each unit exported and timed alone at its real input shapes (cheap at full size,
    where exporting the whole U-Net once per unit is not); ``saving_ms`` is the unit's own time (always > 0, so
    unlike a removal's saving it is not lost in noise on a U-Net too small to time). ``base_ms`` is left None:
    the caller times the whole U-Net (``measure_variants``)."""
    import numpy as np
    from tqdm import tqdm

    from pocketfusion.export.base import ExportConfig
    from pocketfusion.runtimes.base import load_session

    t0 = time.perf_counter()
    runtime = backends.canonical_runtime(runtime)
    target = backends.for_runtime(runtime).target
    inputs = unit_inputs(unet, seq_len=seq_len)
    if units is not None:
        inputs = {n: inputs[n] for n in units}
    kinds = {u.name: u for u in pruning.units(unet)}
    tmp = Path(tempfile.mkdtemp(prefix=".pocketfusion-latency-"))
    cfg = ExportConfig(targets=(target,), components=("unet",), check_parity=False, executorch_profile_runs=0)
    try:
        sessions, feeds = {}, {}
        for name in tqdm(inputs, desc=f"export units ({runtime})", disable=not progress, unit="unit"):
            spec = module_spec("unit", _unit_wrapper(unet.get_submodule(name), kinds[name].kind), inputs[name], source="unit")
            feed = spec.golden[0]
            suffix = {"onnx": ".onnx", "executorch": ".pte", "tflite": ".tflite"}[target]
            path = tmp / f"u{len(sessions)}{suffix}"
            backends.exporter(target).export_component(spec, path, cfg)
            sessions[name], feeds[name] = load_session(path, runtime, threads=threads), feed
        samples: dict[str, list[float]] = {n: [] for n in sessions}
        for _ in tqdm(range(rounds), desc=f"latency rounds ({runtime})", disable=not progress, unit="round"):
            for name, s in sessions.items():
                s.run(feeds[name])
                for _ in range(runs):
                    t = time.perf_counter()
                    s.run(feeds[name])
                    samples[name].append((time.perf_counter() - t) * 1e3)
        ms = {n: float(np.median(v)) for n, v in samples.items()}
        device = next(iter(sessions.values())).device if sessions else ""
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "runtime": runtime, "device": device, "base_ms": None,
        "units": {n: {"ms": v, "saving_ms": v, "params": kinds[n].params} for n, v in ms.items()},
        "method": "each unit exported and timed alone at its real input shapes (saving = its own time)",
        "shapes": {"seq_len": seq_len, "sample_size": unet.config.sample_size, "units_total_ms": sum(ms.values())},
        "runs": runs, "rounds": rounds, "threads": threads, "wall_s": round(time.perf_counter() - t0, 2),
    }
