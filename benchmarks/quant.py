"""Quantization comparison: pocketfusion's W8 / W4 against what a user would pick instead, on one U-Net.

    python benchmarks/quant.py [--model DIR] [--prompts N] [--steps S] [--json OUT] [--skip WHAT,...]

Every row quantizes the same fp32 U-Net (default: the bundled demo model) and is measured the same way:

* **pocketfusion** — ``compress.grid.rtn_grid`` (RTN, every layer at the same bits), RTN onto the
  calibrated model's per-layer bits (``compress.quant.rtn_like``: the equal-size baseline), and
  ``pocketfusion.compress.api.compress(method="gptq")`` (calibrated, W4 with measured mixed
  precision); then the calibrated folders exported through each target
  (``export_model(..., ExportConfig(targets=(t,), components=("unet",)))``). A target whose exporter
  writes no quantized weights (no ``quantization`` block in its manifest entry) is reported
  "not available", with the reason.
* **peers on the same U-Net** — optimum-quanto ``quantize(weights=qint8|qint4); freeze``; torchao
  ``Int8WeightOnlyConfig`` (its default filter: Linear only) and ``IntxWeightOnlyConfig`` int8
  per-channel / int4 ``PerGroup(32)`` on Linear + Conv2d (layers whose input size is not a multiple
  of 32 stay fp32 at int4: torchao refuses them; ``Int4WeightOnlyConfig`` does not run on this CPU
  build: its plain format needs the ``mslk`` package, its ``opaque`` format is not in 0.18); onnxruntime ``quantize_dynamic`` int8 (per tensor,
  its default, and per channel) and ``MatMulNBitsQuantizer`` 4-bit on pocketfusion's fp32
  ``unet.onnx``; ai-edge-quantizer's stock recipes (``weight_only_wi8_afp32``,
  ``weight_only_wi4_afp32``, ``dynamic_wi8_afp32``) on pocketfusion's fp32 ``unet.tflite``;
  coremltools ``palettize_weights`` (4-bit k-means) and ``linear_quantize_weights`` (int8) on the
  fp32 ``.mlpackage``.

Columns (all measured here):

* **size** — artifact file size (``.onnx`` / ``.tflite`` / ``.pte`` / ``.mlpackage`` directory)
  and its % of the same target's fp32 file; for PyTorch rows the ``torch.save`` size of the
  quantized U-Net's state dict (peers) or, for pocketfusion's grid (which PyTorch runs as fp32
  on-grid weights), the packed size the targets store: int8 1 byte, int4 ½ byte, fp16 scales,
  everything else fp32 (``compress.quant.weight_bytes``) — against the fp32 parameter bytes.
* **U-Net error** — on held-out calibration feeds (U-Net inputs recorded along real sampling
  trajectories of prompts not used to calibrate: ``calibration.resolve(...).unet_feeds("heldout")``),
  against the fp32 PyTorch U-Net: relative error ``max|out - ref| / max|ref|`` (the export
  parity measure) and SNR ``10 log10(sum ref^2 / sum (out - ref)^2)`` in dB.
* **image PSNR** — generated images vs the fp32 PyTorch pipeline, same prompts and seeds (image
  ``i`` seed ``--seed + i``): PyTorch rows through ``generate.evaluate``; target rows through
  ``pipeline.RuntimePipeline`` on a copy of the fp32 export directory with the quantized U-Net
  file swapped in (text encoder and decoder stay fp32 in that runtime).
* **prompt accuracy** — ``demo.metrics.prompt_accuracy`` of those images (demo-grammar models):
  mean over the five attributes, and every attribute in the JSON.
* **ms/call** — host latency of one U-Net call (batch 2, a CFG pair): median of ``--rounds`` x
  ``--runs`` calls, all rows interleaved round robin (this machine's speed drifts).

Core ML cannot run on Linux (``MLModel.predict`` needs macOS): Core ML rows report the package size,
and their error / images are computed by reading the weights back out of the package
(``coremltools.optimize.coreml.decompress_weights``) into the PyTorch U-Net — the weight
quantization's effect, not Core ML's kernels; no latency.

``--skip`` drops rows by tag (``pocketfusion``, ``rtn``, ``gptq``, ``fp32``, ``peers``, ``quanto``,
``torchao``, ``ort``, ``ai-edge-quantizer``, ``coremltools``, ``pytorch``, ``onnx``, ``tflite``,
``executorch``, ``coreml``) or a measurement (``images``, ``latency``). Everything is written into a
temporary directory that is removed at the end; the JSON (every figure, per-image PSNRs, latency
samples) goes to ``--json`` (default: a file in the system temp directory, path printed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LEVELS = ("pytorch", "onnx", "tflite", "executorch", "coreml")
RUNTIME_TARGETS = ("onnx", "tflite", "executorch")  # targets that run here
TARGET_FILE = {"onnx": "unet.onnx", "tflite": "unet.tflite", "executorch": "unet.pte", "coreml": "unet.mlpackage"}
AIEQ_RECIPES = {"weight_only_wi8_afp32": 8, "dynamic_wi8_afp32": 8, "weight_only_wi4_afp32": 4}
MEASUREMENTS = ("images", "latency")
NOTE_CHARS = 110  # each note's length in the printed table (the JSON has them whole)
TAGS = ("pocketfusion", "rtn", "gptq", "fp32", "peers", "quanto", "torchao", "ort", "ai-edge-quantizer", "coremltools") + LEVELS


class NotAvailable(Exception):
    """A row that cannot be produced here; the message says why (reported, never faked)."""


@dataclass
class Row:
    name: str
    tool: str  # pocketfusion | optimum-quanto | torchao | onnxruntime | ai-edge-quantizer | coremltools | fp32
    level: str  # one of LEVELS: where the quantized U-Net runs (or is stored)
    bits: int  # nominal weight bits: 32, 8, 4
    bits_detail: str = ""  # e.g. "4 (12 layers 8)" for mixed precision
    status: str = "ok"  # ok | not available | failed
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    size_bytes: float | None = None
    size_kind: str = ""  # "file" | "torch.save" | "packed"
    fp32_bytes: float | None = None
    make_seconds: float | None = None
    error: dict | None = None  # rel, rel_l2, snr_db, feeds
    images: dict | None = None  # image PSNR vs fp32
    accuracy: dict | None = None
    latency: dict | None = None
    extra: dict = field(default_factory=dict)
    # not serialised
    run: Callable | None = None  # feed dict -> noise_pred ndarray
    generate: Callable | None = None  # prompts -> (images, accuracy or None)
    time_it: bool = True  # include in the latency rounds

    @property
    def size_pct(self) -> float | None:
        if self.size_bytes is None or not self.fp32_bytes:
            return None
        return 100.0 * self.size_bytes / self.fp32_bytes

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("run", "generate", "time_it")}
        d["size_pct_of_fp32"] = self.size_pct
        return d


# ------------------------------------------------------------------------------------- measuring


def torch_runner(unet) -> Callable:
    """feed dict (numpy, batch 2) -> the U-Net's output as numpy."""
    import torch

    sdxl = unet.config.addition_embed_type == "text_time"

    def run(feed):
        kw = {}
        if sdxl:
            kw["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(feed["text_embeds"]), "time_ids": torch.from_numpy(feed["time_ids"])}
        with torch.no_grad():
            out = unet(torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"]),
                       torch.from_numpy(feed["encoder_hidden_states"]), return_dict=False, **kw)[0]
        return out.float().numpy()

    return run


def session_runner(session) -> Callable:
    return lambda feed: np.asarray(session.run(feed)["noise_pred"])


def output_error(run: Callable, feeds: list[dict], refs: list[np.ndarray]) -> dict:
    """Relative error (max-abs / max|ref|, the export parity measure), relative L2 and SNR (dB) over ``feeds``."""
    max_abs = peak = 0.0
    se = sref = 0.0
    for feed, ref in zip(feeds, refs):
        out = np.asarray(run(feed), dtype=np.float64).reshape(ref.shape)
        d = out - ref
        max_abs = max(max_abs, float(np.abs(d).max()))
        peak = max(peak, float(np.abs(ref).max()))
        se += float((d**2).sum())
        sref += float((ref.astype(np.float64) ** 2).sum())
    return {
        "rel": max_abs / max(peak, 1e-30), "rel_l2": (se / max(sref, 1e-30)) ** 0.5,
        "snr_db": float("inf") if se == 0 else 10.0 * np.log10(sref / se), "feeds": len(feeds),
    }


def accuracy_summary(acc: dict) -> dict:
    per = acc["per_attribute"]
    return {"mean": float(np.mean(list(per.values()))), "per_attribute": per, "all_correct": acc["all_correct"], "n": acc["n"]}


def interleaved_latency(runners: dict[str, Callable[[], Any]], *, runs: int, rounds: int, warmup: int = 3,
                        progress: bool = False) -> dict[str, dict]:
    """Per-call latency of each runner: ``rounds`` round-robin rounds of ``runs`` calls each."""
    from tqdm import tqdm

    for fn in runners.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in tqdm(range(rounds), desc="latency rounds", disable=not progress, unit="round"):
        for name, fn in runners.items():
            for _ in range(runs):
                t = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t) * 1e3)
    return {k: {"median_ms": statistics.median(v), "p90_ms": float(np.percentile(v, 90)), "min_ms": min(v), "samples_ms": v}
            for k, v in samples.items()}


def state_dict_bytes(module) -> int:
    """Bytes of ``torch.save(module.state_dict())`` (what a PyTorch user ships)."""
    import torch

    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return len(buf.getvalue())


def artifact_bytes(path: Path) -> int:
    """A file's size (with its ``.data`` external-data file), or a directory's total (``.mlpackage``)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    extra = Path(str(path) + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.is_file() else 0)


def param_bytes(unet) -> int:
    return sum(p.numel() for p in unet.parameters()) * 4


@contextlib.contextmanager
def quiet():
    """Silence third-party prints and warnings (ai-edge-quantizer and coremltools print progress)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------ PyTorch-level quantizers


def pf_rtn(unet, bits: int, group_size: int = 32):
    """pocketfusion RTN on a copy: every Linear / Conv2d at ``bits`` (``compress.grid.rtn_grid``)."""
    from pocketfusion.compress.grid import rtn_grid

    u = copy.deepcopy(unet)
    grid = rtn_grid(u, bits, group_size=group_size)
    return u, grid


def grid_packed_bytes(unet, grid, scale_bytes: int = 2) -> float:
    """Bytes the targets store for a grid: int8 1 B, int4 ½ B per weight, fp16 scales, the rest fp32."""
    from pocketfusion.compress.quant import weight_bytes

    return weight_bytes(unet, grid.weight_bits, {n: g.group_size for n, g in grid.layers.items()}, scale_bytes=scale_bytes)["bytes"]


def grid_bits_detail(grid, bits: int) -> str:
    others: dict[int, int] = {}
    for g in grid.layers.values():
        if g.bits != bits:
            others[g.bits] = others.get(g.bits, 0) + 1
    per_ch = sum(1 for g in grid.layers.values() if g.bits == 4 and g.group_size is None)
    parts = [str(bits)] + [f"{n} layers at {ob}" for ob, n in sorted(others.items())]
    if per_ch:
        parts.append(f"{per_ch} per-channel")
    return parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")


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
            quantize_(u, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)), filter_fn=lambda m, f: isinstance(m, lin_conv))
            note = "IntxWeightOnlyConfig int8 PerAxis(0) with a Linear+Conv2d filter"
        elif variant == "intx4":
            quantize_(u, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)), filter_fn=_divisible(32))
            note = ("IntxWeightOnlyConfig int4 PerGroup(32), Linear+Conv2d whose input size divides by 32 (torchao refuses the rest); "
                    "int4 values stored unpacked in int8 (its default UNPACKED_TO_INT8 format)")
        else:
            raise ValueError(variant)
    n_q = sum(1 for m in u.modules() if isinstance(m, lin_conv) and type(m.weight).__name__ not in ("Parameter", "Tensor"))
    return u, [f"{note}; {n_q} of {n_all} Linear/Conv2d quantized"]


# ------------------------------------------------------------------------ artifact-level quantizers


def peer_ort_dynamic(onnx_path: Path, out: Path, *, per_channel: bool) -> Path:
    """onnxruntime ``quantize_dynamic`` int8 (after ``quant_pre_process``, as its docs say)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + ".pre.onnx")
    with quiet():
        quant_pre_process(str(onnx_path), str(pre))
        quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
    pre.unlink()
    return out


def peer_ort_nbits(onnx_path: Path, out: Path, *, block_size: int = 32) -> Path:
    """onnxruntime ``MatMulNBitsQuantizer`` 4-bit (symmetric, block 32): MatMul nodes only."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + ".pre.onnx")
    with quiet():
        quant_pre_process(str(onnx_path), str(pre))
        q = MatMulNBitsQuantizer(onnx.load(str(pre)), block_size=block_size, is_symmetric=True)
        q.process()
        q.model.save_model_to_file(str(out), False)
    pre.unlink()
    return out


def onnx_op_counts(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def peer_aieq(tflite_path: Path, out: Path, recipe_name: str) -> Path:
    """ai-edge-quantizer with one of its stock recipes; the component's ``.io.json`` is copied beside."""
    from ai_edge_quantizer import quantizer, recipe

    with quiet(), contextlib.redirect_stderr(io.StringIO()):
        q = quantizer.Quantizer(str(tflite_path))
        q.load_quantization_recipe(getattr(recipe, recipe_name)())
        q.quantize().export_model(str(out), overwrite=True)
    io_json = Path(str(tflite_path) + ".io.json")
    if io_json.is_file():
        shutil.copy(io_json, str(out) + ".io.json")
    return out


def peer_coreml(mlpackage: Path, out: Path, kind: str) -> Path:
    """coremltools on an fp32 ``.mlpackage``: ``palettize4`` (k-means 4-bit LUT) or ``linear8`` (int8 symmetric per channel)."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    with quiet(), contextlib.redirect_stderr(io.StringIO()):
        ml = ct.models.MLModel(str(mlpackage), skip_model_load=True)
        if kind == "palettize4":
            q = cto.palettize_weights(ml, cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=4)))
        elif kind == "linear8":
            q = cto.linear_quantize_weights(ml, cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8")))
        else:
            raise ValueError(kind)
        q.save(str(out))
    return out


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

    from pocketfusion.compress.grid import quantizable_layers

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


# -------------------------------------------------------------------------------- export helpers


def swap_unet(base: Path, target: str, files: dict[str, Path], dst: Path) -> Path:
    """Copy the fp32 export directory ``base`` (its ``target`` only) to ``dst`` with the U-Net's
    file(s) replaced by ``files`` (name in ``target/`` -> source), and re-checksum its manifest."""
    from pocketfusion import artifact

    ignore = shutil.ignore_patterns(*(t for t in ("onnx", "tflite", "executorch", "coreml", "golden") if t != target))
    shutil.copytree(base, dst, ignore=lambda d, names: ignore(d, names) if Path(d) == base else set())
    for name, src in files.items():
        tgt = dst / target / name
        if tgt.is_dir():
            shutil.rmtree(tgt)
        elif tgt.exists():
            tgt.unlink()
        (shutil.copytree if Path(src).is_dir() else shutil.copy)(src, tgt)
    m = artifact.load_manifest(base, verify=False)
    comps = {k: dict(v) for k, v in m.metrics.get("components", {}).items() if k.startswith(target + "/")}
    if f"{target}/unet" in comps:
        comps[f"{target}/unet"]["size_bytes"] = artifact_bytes(dst / target / TARGET_FILE[target])
    (dst / artifact.MANIFEST).unlink(missing_ok=True)
    artifact.write_manifest(dst, stage="export", settings=m.settings, source=m.source, metrics={"components": comps})
    return dst


def unet_files(export_dir: Path, target: str) -> dict[str, Path]:
    """The U-Net's file and its side files (``.io.json``, ``.data``) in an export directory."""
    d = Path(export_dir) / target
    main = d / TARGET_FILE[target]
    return {p.name: p for p in d.iterdir() if p.name == main.name or p.name.startswith(main.name + ".")}


# ----------------------------------------------------------------------------------------- bench


class Bench:
    """The shared context of one run: the fp32 model, held-out feeds, prompts, references."""

    def __init__(self, args, model, feeds: list[dict], prompts: list[str], demo: bool, work: Path):
        import torch

        from pocketfusion.generate import GenerateConfig

        self.a = args
        self.model = model
        self.unet = model.unet
        self.feeds = feeds
        self.prompts = prompts
        self.demo = demo
        self.work = work
        self.skip = set(args.skip)
        self.cfg = GenerateConfig(steps=args.steps, guidance=args.guidance, seed=args.seed)
        self.threads = args.threads
        torch.manual_seed(args.seed)
        self.refs = [torch_runner(self.unet)(f) for f in feeds]
        self.fp32_param_bytes = param_bytes(self.unet)
        self.fp32_state_bytes = state_dict_bytes(self.unet)
        self.ref_images: list[np.ndarray] | None = None
        self.fp32_accuracy: dict | None = None
        self.base: dict[str, Path | str] = {}  # target -> fp32 export dir, or why not
        self.compressed: dict[tuple[str, str], Any] = {}  # (scheme, method) -> (folder, loaded model) or reason str
        self.rows: list[Row] = []

    # ---- images -------------------------------------------------------------------------------
    def torch_generate(self, unet) -> Callable:
        from pocketfusion.generate import evaluate, generate_images

        m = dataclasses.replace(self.model, components={**self.model.components, "unet": unet}, quant=None)

        def gen(prompts):
            if self.demo:
                r = evaluate(m, self.cfg, len(prompts))
                return r["images"], accuracy_summary(r)
            return generate_images(m, prompts, self.cfg)[0], None

        return gen

    def runtime_generate(self, export_dir: Path, runtime: str) -> Callable:
        from pocketfusion.demo.metrics import prompt_accuracy
        from pocketfusion.demo.scenes import split_scenes
        from pocketfusion.pipeline import RuntimePipeline

        def gen(prompts):
            pipe = RuntimePipeline(export_dir, runtime, threads=self.threads)
            images, _ = pipe.generate(prompts, steps=self.cfg.steps, guidance=self.cfg.guidance, seed=self.cfg.seed)
            acc = accuracy_summary(prompt_accuracy(images, split_scenes()[1][: len(prompts)])) if self.demo else None
            return images, acc

        return gen

    # ---- fp32 exports ---------------------------------------------------------------------------
    def base_export(self, target: str) -> Path:
        """pocketfusion's fp32 export of ``target`` (all components where the target runs here; the
        U-Net only for Core ML, fp32 precision), made once."""
        if target not in self.base:
            from pocketfusion.export.api import export_model
            from pocketfusion.export.base import ExportConfig

            comps = ("text_encoder", "unet", "vae_decoder") if target in RUNTIME_TARGETS and self.model.kind == "pipeline" else ("unet",)
            out = self.work / f"fp32-{target}"
            t0 = time.perf_counter()
            try:
                with quiet():
                    export_model(self.model, ExportConfig(targets=(target,), components=comps, coreml_precision="fp32", seed=self.a.seed),
                                 out, progress=False)
                self.base[target] = out
                self.base[f"{target}:seconds"] = time.perf_counter() - t0
            except Exception as e:  # a missing backend, a converter failure: every row on this target says so
                self.base[target] = f"fp32 {target} export failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        b = self.base[target]
        if isinstance(b, str):
            raise NotAvailable(b)
        return b

    def fp32_file_bytes(self, target: str) -> int:
        return artifact_bytes(self.base_export(target) / target / TARGET_FILE[target])

    # ---- pocketfusion compress ------------------------------------------------------------------
    def compressed_model(self, scheme: str, method: str):
        key = (scheme, method)
        if key not in self.compressed:
            try:
                from pocketfusion.compress.api import compress
            except ImportError as e:
                self.compressed[key] = f"pocketfusion.compress.api not importable ({e})"
            else:
                from pocketfusion.checkpoint import load_model

                out = self.work / f"compressed-{scheme}-{method}"
                t0 = time.perf_counter()
                try:
                    with quiet():
                        compress(self.model, out, scheme=scheme, method=method, calib=self.a.calib_dir, n_prompts=None,
                                 group_size=self.a.group_size, seed=self.a.seed, progress=False, image_prompts=0)
                    self.compressed[key] = (out, load_model(out), time.perf_counter() - t0)
                except Exception as e:
                    self.compressed[key] = f"compress --quant {scheme} --method {method} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        c = self.compressed[key]
        if isinstance(c, str):
            raise NotAvailable(c)
        return c

    # ---- one row --------------------------------------------------------------------------------
    def add(self, name: str, tool: str, level: str, bits: int, tags: set[str], make: Callable[[], Row | None], progress=None) -> None:
        if tags & self.skip:
            return
        if progress is not None:
            progress.set_postfix_str(name[:40])
        row = Row(name, tool, level, bits)
        t0 = time.perf_counter()
        try:
            make(row)
            if row.make_seconds is None:
                row.make_seconds = time.perf_counter() - t0
        except NotAvailable as e:
            row.status, row.reason = "not available", str(e)
        except Exception as e:  # a peer tool's failure is a result too
            row.status, row.reason = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            logging.getLogger(__name__).debug("row %s failed", name, exc_info=True)
        if row.status == "ok":
            self.measure(row)
        self.rows.append(row)

    def measure(self, row: Row) -> None:
        from pocketfusion.compress.api import image_psnr

        try:
            if row.run is not None:
                row.error = output_error(row.run, self.feeds, self.refs)
            if row.generate is not None and "images" not in self.skip and self.prompts:
                images, acc = row.generate(self.prompts)
                row.images = image_psnr(self.ref_images, images) if self.ref_images is not None else None
                row.accuracy = acc
        except Exception as e:
            row.status, row.reason = "failed", f"measuring: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# -------------------------------------------------------------------------------------- row makers


def make_rows(b: Bench, progress: bool) -> None:
    """Build and measure every row (in table order within each bit group)."""
    from tqdm import tqdm

    unet = b.unet
    gs = b.a.group_size
    bar = tqdm(total=31, desc="rows", disable=not progress, unit="row")

    def add(*args, **kw):
        b.add(*args, progress=bar, **kw)
        bar.update(1)

    # fp32 references ------------------------------------------------------------------------
    def fp32_torch(r: Row):
        r.size_bytes, r.size_kind, r.fp32_bytes = b.fp32_state_bytes, "torch.save", b.fp32_state_bytes
        r.run, r.generate = torch_runner(unet), b.torch_generate(unet)

    add("fp32 PyTorch", "fp32", "pytorch", 32, {"fp32", "pytorch"}, fp32_torch)

    def fp32_target(target):
        def make(r: Row):
            from pocketfusion.runtimes.base import TARGET_RUNTIME, load_session

            base = b.base_export(target)
            r.make_seconds = b.base.get(f"{target}:seconds")
            r.size_bytes = r.fp32_bytes = b.fp32_file_bytes(target)
            r.size_kind = "file"
            if target == "coreml":
                r.notes.append("fp32 ML Program; Core ML cannot run on Linux: size only")
                return
            s = load_session(base / target / TARGET_FILE[target], TARGET_RUNTIME[target], threads=b.threads)
            r.run, r.generate = session_runner(s), (b.runtime_generate(base, TARGET_RUNTIME[target]) if b.model.kind == "pipeline" else None)
            r.extra["device"] = s.device

        return make

    for t in LEVELS[1:]:
        add(f"fp32 {t}", "fp32", t, 32, {"fp32", t}, fp32_target(t))

    # pocketfusion, PyTorch level ------------------------------------------------------------
    def pf_rtn_row(bits):
        def make(r: Row):
            u, grid = pf_rtn(unet, bits, gs)
            r.size_bytes, r.size_kind, r.fp32_bytes = grid_packed_bytes(u, grid), "packed", b.fp32_param_bytes
            r.bits_detail = grid_bits_detail(grid, bits)
            r.run, r.generate = torch_runner(u), b.torch_generate(u)
            r.notes.append(f"compress.grid.rtn_grid: every Linear/Conv2d at {bits} bits" + (f", group {gs}" if bits == 4 else ", per channel"))

        return make

    def pf_gptq_row(scheme, bits):
        def make(r: Row):
            folder, m, secs = b.compressed_model(scheme, "gptq")
            grid = m.quant
            r.make_seconds = secs
            r.size_bytes, r.size_kind, r.fp32_bytes = grid_packed_bytes(m.unet, grid), "packed", b.fp32_param_bytes
            r.bits_detail = grid_bits_detail(grid, bits)
            r.run, r.generate = torch_runner(m.unet), b.torch_generate(m.unet)
            kept = grid.settings.get("mixed_precision", {}).get("kept_8bit", [])
            r.notes.append("compress(method='gptq')" + (f"; {len(kept)} layers kept at 8 bits by measured sensitivity" if kept else ""))

        return make

    def pf_rtn_like_row(scheme, bits):
        def make(r: Row):
            from pocketfusion.compress.quant import rtn_like

            _, m, _ = b.compressed_model(scheme, "gptq")
            t0 = time.perf_counter()
            u = copy.deepcopy(unet)
            grid = rtn_like(u, m.quant)
            r.make_seconds = time.perf_counter() - t0
            r.size_bytes, r.size_kind, r.fp32_bytes = grid_packed_bytes(u, grid), "packed", b.fp32_param_bytes
            r.bits_detail = grid_bits_detail(grid, bits)
            r.run, r.generate = torch_runner(u), b.torch_generate(u)
            r.notes.append("compress.quant.rtn_like: RTN onto the calibrated grid's per-layer bits and groups (equal size)")

        return make

    # peers, PyTorch level ----------------------------------------------------------------------
    def torch_peer(fn, *args):
        def make(r: Row):
            u, notes = fn(unet, *args)
            r.size_bytes, r.size_kind, r.fp32_bytes = state_dict_bytes(u), "torch.save", b.fp32_state_bytes
            r.run, r.generate = torch_runner(u), b.torch_generate(u)
            r.notes += notes

        return make

    # pocketfusion exports ----------------------------------------------------------------------
    def pf_export_row(scheme, target):
        def make(r: Row):
            from pocketfusion.export.api import export_model
            from pocketfusion.export.base import ExportConfig
            from pocketfusion.runtimes.base import TARGET_RUNTIME, load_session

            folder, m, _ = b.compressed_model(scheme, "gptq")
            fp32 = b.fp32_file_bytes(target)  # also makes the fp32 export the runtime rows swap into
            out = b.work / f"export-{scheme}-{target}"
            t0 = time.perf_counter()
            with quiet():
                man = export_model(m, ExportConfig(targets=(target,), components=("unet",), coreml_precision="fp32", seed=b.a.seed),
                                   out, progress=False)
            r.make_seconds = time.perf_counter() - t0
            entry = man.metrics["components"][f"{target}/unet"]
            q = entry.get("quantization")
            size = artifact_bytes(out / target / TARGET_FILE[target])
            r.extra["export_entry"] = {k: v for k, v in entry.items() if k not in ("inputs", "outputs")}
            if not q:
                raise NotAvailable(f"the {target} exporter writes no quantized weights yet (no 'quantization' in its manifest entry; "
                                   f"the file holds fp32 on-grid weights, {size / fp32:.0%} of fp32)")
            r.size_bytes, r.size_kind, r.fp32_bytes = size, "file", fp32
            counts = [f"{q.get(k, 0)} {lab}" for k, lab in (("layers_int4", "int4"), ("layers_int8", "int8"), ("layers_float", "float")) if q.get(k)]
            r.bits_detail = f"{r.bits} ({', '.join(counts)})" if counts else str(r.bits)
            acts = q.get("activations")
            if isinstance(acts, dict):
                kinds = [f"{k} {v}" for k, v in acts.items() if isinstance(v, int) and v]
                r.notes.append("activations: " + (", ".join(kinds) or "float") + (f" ({acts['note']})" if acts.get("note") else ""))
            elif acts:
                r.notes.append(f"activations: {acts}")
            if q.get("fallbacks"):
                r.notes.append(f"{len(q['fallbacks'])} fallbacks (see JSON)")
            r.notes += [n for n in q.get("notes", [])][:3]
            par = entry.get("parity", {})
            if par.get("rel") is not None:
                r.extra["parity_vs_on_grid"] = par
            if target == "coreml":
                coreml_measure(r, out / target / TARGET_FILE[target])
                return
            s = load_session(out / target / TARGET_FILE[target], TARGET_RUNTIME[target], threads=b.threads)
            r.run = session_runner(s)
            r.extra["device"] = s.device
            if b.model.kind == "pipeline":
                swapped = swap_unet(b.base_export(target), target, unet_files(out, target), b.work / f"swap-{scheme}-{target}")
                r.generate = b.runtime_generate(swapped, TARGET_RUNTIME[target])

        return make

    def coreml_measure(r: Row, pkg: Path):
        u, matched, total = unet_with_coreml_weights(unet, coreml_weights(pkg))
        r.notes.append(f"Core ML cannot run on Linux: error and images use the {matched}/{total} Linear/Conv2d weights "
                       "read back from the package, run in PyTorch; no latency")
        r.run, r.generate, r.time_it = torch_runner(u), b.torch_generate(u), False

    # peers on the artifacts ------------------------------------------------------------------
    def artifact_peer(target, produce, name):
        def make(r: Row):
            from pocketfusion.runtimes.base import TARGET_RUNTIME, load_session

            base = b.base_export(target)
            src = base / target / TARGET_FILE[target]
            out = b.work / "peers" / target / name / TARGET_FILE[target]
            out.parent.mkdir(parents=True, exist_ok=True)
            produce(src, out)
            r.size_bytes, r.size_kind, r.fp32_bytes = artifact_bytes(out), "file", b.fp32_file_bytes(target)
            if target == "onnx":
                ops = onnx_op_counts(out)
                r.extra["ops"] = ops
                q_ops = {k: v for k, v in ops.items() if k in ("MatMulNBits", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "DequantizeLinear")}
                r.notes.append("quantized ops: " + (", ".join(f"{k} {v}" for k, v in q_ops.items()) or "none"))
            if target == "coreml":
                coreml_measure(r, out)
                return
            s = load_session(out, TARGET_RUNTIME[target], threads=b.threads)
            r.run = session_runner(s)
            r.extra["device"] = s.device
            if b.model.kind == "pipeline":
                swapped = swap_unet(base, target, {p.name: p for p in out.parent.iterdir()}, b.work / "swap" / target / name)
                r.generate = b.runtime_generate(swapped, TARGET_RUNTIME[target])

        return make

    for bits in (8, 4):
        scheme = f"w{bits}"
        add(f"pocketfusion RTN w{bits}", "pocketfusion", "pytorch", bits, {"pocketfusion", "rtn", "pytorch"}, pf_rtn_row(bits))
        if bits == 4:
            add("pocketfusion RTN w4, GPTQ's bits", "pocketfusion", "pytorch", bits, {"pocketfusion", "rtn", "gptq", "pytorch"},
                pf_rtn_like_row(scheme, bits))
        add(f"pocketfusion GPTQ w{bits}", "pocketfusion", "pytorch", bits, {"pocketfusion", "gptq", "pytorch"}, pf_gptq_row(scheme, bits))
        add(f"optimum-quanto qint{bits}", "optimum-quanto", "pytorch", bits, {"peers", "quanto", "pytorch"}, torch_peer(peer_quanto, bits))
        for v in (("int8", "intx8") if bits == 8 else ("intx4",)):
            label = {"int8": "torchao Int8WeightOnly (Linear)", "intx8": "torchao IntxWeightOnly int8", "intx4": "torchao IntxWeightOnly int4 g32"}[v]
            add(label, "torchao", "pytorch", bits, {"peers", "torchao", "pytorch"}, torch_peer(peer_torchao, v))
        # ONNX
        add(f"pocketfusion GPTQ w{bits} -> onnx", "pocketfusion", "onnx", bits, {"pocketfusion", "gptq", "onnx"}, pf_export_row(scheme, "onnx"))
        if bits == 8:
            add("ORT quantize_dynamic int8", "onnxruntime", "onnx", 8, {"peers", "ort", "onnx"},
                artifact_peer("onnx", lambda s, o: peer_ort_dynamic(s, o, per_channel=False), "dyn"))
            add("ORT quantize_dynamic int8 per-channel", "onnxruntime", "onnx", 8, {"peers", "ort", "onnx"},
                artifact_peer("onnx", lambda s, o: peer_ort_dynamic(s, o, per_channel=True), "dyn-pc"))
        else:
            add("ORT MatMulNBits 4-bit b32", "onnxruntime", "onnx", 4, {"peers", "ort", "onnx"},
                artifact_peer("onnx", lambda s, o: peer_ort_nbits(s, o, block_size=32), "nbits"))
        # TFLite
        add(f"pocketfusion GPTQ w{bits} -> tflite", "pocketfusion", "tflite", bits, {"pocketfusion", "gptq", "tflite"}, pf_export_row(scheme, "tflite"))
        for rec, rb in AIEQ_RECIPES.items():
            if rb == bits:
                add(f"ai-edge-quantizer {rec}", "ai-edge-quantizer", "tflite", bits, {"peers", "ai-edge-quantizer", "tflite"},
                    artifact_peer("tflite", lambda s, o, rec=rec: peer_aieq(s, o, rec), rec))
        # ExecuTorch
        add(f"pocketfusion GPTQ w{bits} -> executorch", "pocketfusion", "executorch", bits, {"pocketfusion", "gptq", "executorch"},
            pf_export_row(scheme, "executorch"))
        # Core ML
        add(f"pocketfusion GPTQ w{bits} -> coreml", "pocketfusion", "coreml", bits, {"pocketfusion", "gptq", "coreml"}, pf_export_row(scheme, "coreml"))
        kind = "linear8" if bits == 8 else "palettize4"
        label = "coremltools linear_quantize_weights int8" if bits == 8 else "coremltools palettize_weights 4-bit k-means"
        add(label, "coremltools", "coreml", bits, {"peers", "coremltools", "coreml"},
            artifact_peer("coreml", lambda s, o, kind=kind: peer_coreml(s, o, kind), kind))
    bar.close()


# ------------------------------------------------------------------------------------------ output


def _fmt(v, spec: str, none: str = "–") -> str:
    if v is None:
        return none
    if isinstance(v, float) and np.isinf(v):
        return "inf"
    return format(v, spec)


def format_table(rows: list[Row]) -> str:
    """Markdown table: one line per row, grouped fp32 / W8 / W4."""
    head = ("| bits | row | runs in | size MB | % fp32 | U-Net rel err | SNR dB | image PSNR dB mean / min | prompt acc % | ms/call | notes |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    order = {lv: i for i, lv in enumerate(LEVELS)}
    for r in sorted(rows, key=lambda r: (-r.bits, order.get(r.level, 9))):
        bits = r.bits_detail or str(r.bits)
        if r.status != "ok":
            reason = r.reason.replace("|", "/")
            lines.append(f"| {bits} | {r.name} | {r.level} | – | – | – | – | – | – | – | **{r.status}**: {reason} |")
            continue
        size = _fmt(r.size_bytes / 1e6 if r.size_bytes is not None else None, ".2f")
        if r.size_kind == "packed":
            size += " (packed)"
        err = r.error or {}
        img = f"{_fmt(r.images['mean_db'], '.1f')} / {_fmt(r.images['min_db'], '.1f')}" if r.images else "–"
        acc = _fmt(100 * r.accuracy["mean"] if r.accuracy else None, ".1f")
        lat = _fmt(r.latency["median_ms"] if r.latency else None, ".2f")
        notes = "; ".join(n if len(n) <= NOTE_CHARS else n[: NOTE_CHARS - 1] + "…" for n in r.notes).replace("|", "/")
        lines.append(f"| {bits} | {r.name} | {r.level} | {size} | {_fmt(r.size_pct, '.1f')} | {_fmt(err.get('rel'), '.2e')} | "
                     f"{_fmt(err.get('snr_db'), '.1f')} | {img} | {acc} | {lat} | {notes} |")
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for p in ("torch", "diffusers", "onnxruntime", "ai-edge-quantizer", "ai-edge-litert", "coremltools", "executorch", "torchao", "optimum-quanto"):
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="diffusers pipeline folder (default: the bundled demo model)")
    ap.add_argument("--prompts", type=int, default=8, help="images per row for PSNR and prompt accuracy (held-out prompts; 0: none)")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps of those images")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib", type=Path, default=None, help="prompts file or saved calibration set (default: the demo's built-in prompts)")
    ap.add_argument("--calib-prompts", type=int, default=None, help="calibration prompts (default: the calibration module's, 32)")
    ap.add_argument("--feeds", type=int, default=None, help="at most this many held-out U-Net feeds for the error columns (default: all)")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10, help="U-Net calls per row per latency round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    ap.add_argument("--skip", action="append", default=[], help=f"comma-separated tags to leave out: {', '.join(TAGS + MEASUREMENTS)}")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here (default: a file in the system temp dir)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    a.skip = [s.strip() for item in a.skip for s in item.split(",") if s.strip()]
    bad = [s for s in a.skip if s not in TAGS + MEASUREMENTS]
    if bad:
        ap.error(f"unknown --skip {', '.join(bad)}; choose from {', '.join(TAGS + MEASUREMENTS)}")
    if a.prompts < 0 or a.steps < 1 or a.runs < 1 or a.rounds < 1:
        ap.error("--prompts >= 0, --steps, --runs, --rounds >= 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from pocketfusion import calibration as C
    from pocketfusion.checkpoint import DEMO_MODEL, load_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    progress = not a.no_progress
    t_start = time.perf_counter()
    model = load_model(a.model or DEMO_MODEL)
    model.require_pipeline()
    if model.quant is not None:
        raise SystemExit(f"error: {model.path} is already quantized; give its fp32 source")
    work = Path(tempfile.mkdtemp(prefix="pf-bench-quant-"))
    try:
        # One calibration set for every pocketfusion row; its held-out prompts' feeds for every row's error.
        cset = C.resolve(model, a.calib, n_prompts=a.calib_prompts, seed=a.seed, progress=progress)
        a.calib_dir = work / "calibration"
        C.save(cset, a.calib_dir)
        feeds = cset.unet_feeds("heldout")[: a.feeds or None]
        demo = C.is_demo_compatible(model)
        if demo:
            from pocketfusion.demo.scenes import split_scenes

            prompts = [s.prompt for s in split_scenes()[1][: a.prompts]]
        else:
            held = [cset.prompts[i] for i in cset.prompt_indices("heldout")]
            prompts = (held + [p for p in cset.prompts if p not in held])[: a.prompts]
        b = Bench(a, model, feeds, prompts, demo, work)
        if prompts and "images" not in b.skip:
            b.ref_images, acc = b.torch_generate(model.unet)(prompts)
            b.fp32_accuracy = acc
        make_rows(b, progress)
        timed = {r.name: r for r in b.rows if r.status == "ok" and r.run is not None and r.time_it}
        if timed and "latency" not in b.skip:
            feed = feeds[0]
            lat = interleaved_latency({k: (lambda r=r: r.run(feed)) for k, r in timed.items()}, runs=a.runs, rounds=a.rounds, progress=progress)
            for k, v in lat.items():
                timed[k].latency = v
        table = format_table(b.rows)
        host = f"{platform.processor() or platform.machine()}, {a.threads} thread(s)"
        print(f"\n{model.path.name} U-Net ({b.fp32_param_bytes / 4e6:.2f} M params); errors on {len(feeds)} held-out calibration feeds "
              f"(CFG pairs); images: {len(prompts)} held-out prompts x {a.steps} steps, seeds {a.seed}..; "
              + (f"latency: {a.rounds}x{a.runs} interleaved calls, {host}" if "latency" not in b.skip else f"latency skipped, {host}"))
        print(table)
        result = {
            "schema": "pocketfusion.bench.quant", "schema_version": 1,
            "model": str(model.path), "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "host": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "versions": _versions(),
            "calibration": {"prompts": len(cset.prompts), "heldout_prompts": len(cset.prompt_indices("heldout")),
                            "heldout_feeds_used": len(feeds), "settings": cset.settings},
            "image_prompts": prompts, "fp32_accuracy": b.fp32_accuracy,
            "fp32_bytes": {"parameters": b.fp32_param_bytes, "torch_save": b.fp32_state_bytes},
            "rows": [r.to_dict() for r in b.rows], "table_markdown": table,
            "seconds": round(time.perf_counter() - t_start, 1),
        }
        out = a.json or Path(tempfile.gettempdir()) / f"pf-bench-quant-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps(result, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n")
        print(f"\nJSON: {out}  ({result['seconds']:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
