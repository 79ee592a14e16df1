"""The shared context of one benchmark run: the fp32 model and its references, the fp32 exports and
calibrated models every row reuses (each made once), and measuring one row."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pocketfusion.benchmarks.quant.measure import (
    accuracy_summary,
    artifact_bytes,
    param_bytes,
    quiet,
    state_dict_bytes,
    torch_runner,
    unet_error,
)
from pocketfusion.benchmarks.quant.rows import NotAvailable, Planned, Row, first_line
from pocketfusion.benchmarks.quant.targets import runs_here, unet_path

PIPELINE_COMPONENTS = ("text_encoder", "unet", "vae_decoder")


class Bench:
    """The fp32 model, held-out feeds and their fp32 outputs, prompts, reference images; the rows.

    ``suite``: the model's prompt suite with an evaluator (``pocketfusion.suite.suite_for``), or None
    (no prompt accuracy)."""

    def __init__(self, args, model, feeds: list[dict], prompts: list[str], suite, work: Path):
        import torch

        from pocketfusion.generate import GenerateConfig

        self.a = args
        self.model = model
        self.unet = model.unet
        self.feeds = feeds
        self.prompts = prompts
        self.suite = suite
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
        self.base_seconds: dict[str, float] = {}
        self.compressed: dict[tuple[str, str], Any] = {}  # (scheme, method) -> (folder, model, grid, seconds) or reason str
        self.rows: list[Row] = []

    # ---- images -------------------------------------------------------------------------------
    def torch_generate(self, unet) -> Callable:
        """prompts -> (images, accuracy or None) of the fp32 pipeline with ``unet`` in it."""
        from pocketfusion.generate import evaluate, generate_images

        m = dataclasses.replace(self.model, components={**self.model.components, "unet": unet})

        def gen(prompts):
            if self.suite is not None:
                r = evaluate(m, self.cfg, len(prompts), suite=self.suite)
                return r["images"], accuracy_summary(r)
            return generate_images(m, prompts, self.cfg)[0], None

        return gen

    def runtime_generate(self, export_dir: Path, runtime: str) -> Callable:
        """prompts -> (images, accuracy or None) through an export directory in ``runtime``."""
        from pocketfusion.runtimes.pipeline import RuntimePipeline

        def gen(prompts):
            pipe = RuntimePipeline(export_dir, runtime, threads=self.threads)
            images, _ = pipe.generate(prompts, steps=self.cfg.steps, guidance=self.cfg.guidance, seed=self.cfg.seed)
            acc = accuracy_summary(self.suite.evaluate(images, prompts)) if self.suite is not None else None
            return images, acc

        return gen

    # ---- fp32 exports ---------------------------------------------------------------------------
    def base_export(self, target: str) -> Path:
        """pocketfusion's fp32 export of ``target`` (all components where the target runs here; the
        U-Net only for Core ML, fp32 precision), made once."""
        if target not in self.base:
            from pocketfusion.export.api import export
            from pocketfusion.export.base import ExportConfig

            comps = PIPELINE_COMPONENTS if runs_here(target) and self.model.kind == "pipeline" else ("unet",)
            out = self.work / f"fp32-{target}"
            t0 = time.perf_counter()
            try:
                with quiet():
                    export(self.model, ExportConfig(targets=(target,), components=comps, coreml_precision="fp32", seed=self.a.seed),
                           out, progress=False)
                self.base[target] = out
                self.base_seconds[target] = time.perf_counter() - t0
            except Exception as e:  # a missing backend, a converter failure: every row on this target says so
                self.base[target] = f"fp32 {target} export failed ({first_line(e)})"
        b = self.base[target]
        if isinstance(b, str):
            raise NotAvailable(b)
        return b

    def fp32_file_bytes(self, target: str) -> int:
        return artifact_bytes(unet_path(self.base_export(target), target))

    # ---- pocketfusion quantize ------------------------------------------------------------------
    def compressed_model(self, scheme: str, method: str):
        """``(folder, loaded model, its U-Net grid, seconds)`` of ``quantize`` with the shared calibration set, made once."""
        key = (scheme, method)
        if key not in self.compressed:
            self.compressed[key] = self._quantize(scheme, method)
        c = self.compressed[key]
        if isinstance(c, str):
            raise NotAvailable(c)
        return c

    def _quantize(self, scheme: str, method: str):
        try:
            from pocketfusion.compress.quant import QuantConfig, quantize
            from pocketfusion.compress.quant.grid import load_grid
        except ImportError as e:
            return f"pocketfusion.compress.quant not importable ({e})"
        from pocketfusion.checkpoint import load_model

        out = self.work / f"compressed-{scheme}-{method}"
        t0 = time.perf_counter()
        try:
            cfg = QuantConfig(scheme=scheme, method=method, calib=str(self.a.calib_dir), group_size=self.a.group_size, seed=self.a.seed,
                              image_prompts=0)
            with quiet():
                quantize(self.model, cfg, out, progress=False)
            m = load_model(out)
            return out, m, load_grid(m, "unet"), time.perf_counter() - t0
        except Exception as e:
            return f"quantize --quant {scheme} --method {method} failed ({first_line(e)})"

    # ---- one row --------------------------------------------------------------------------------
    def add(self, p: Planned, progress=None) -> None:
        """Make the planned row (a failure or an unavailable tool is a result too), measure it, keep it."""
        if progress is not None:
            progress.set_postfix_str(p.name[:40])
        row = Row(p.name, p.tool, p.level, p.bits)
        t0 = time.perf_counter()
        try:
            p.make(row)
            if row.make_seconds is None:
                row.make_seconds = time.perf_counter() - t0
        except NotAvailable as e:
            row.status, row.reason = "not available", str(e)
        except Exception as e:  # a peer tool's failure is a result too
            row.status, row.reason = "failed", first_line(e)
            logging.getLogger(__name__).debug("row %s failed", p.name, exc_info=True)
        if row.status == "ok":
            self.measure(row)
        self.rows.append(row)

    def measure(self, row: Row) -> None:
        from pocketfusion.metrics import image_psnr

        try:
            if row.run is not None:
                row.error = unet_error(row.run, self.feeds, self.refs)
            if row.generate is not None and "images" not in self.skip and self.prompts:
                images, acc = row.generate(self.prompts)
                row.images = image_psnr(self.ref_images, images) if self.ref_images is not None else None
                row.accuracy = acc
        except Exception as e:
            row.status, row.reason = "failed", f"measuring: {first_line(e)}"

