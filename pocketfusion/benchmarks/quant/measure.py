"""Runners and measures shared by every row: U-Net error, sizes, prompt accuracy, silencing tools."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pocketfusion.metrics import output_error, parity_error


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
    """feed dict -> the U-Net output of a runtime session (``runtimes.base.load_session``)."""
    return lambda feed: np.asarray(session.run(feed)["noise_pred"])


def unet_error(run: Callable, feeds: list[dict], refs: list[np.ndarray]) -> dict:
    """Error of ``run`` against the fp32 outputs ``refs`` over ``feeds``, in ``pocketfusion.metrics``' names:
    ``rel_max`` (max-abs / max|ref|, the export parity measure), ``rel_rms``, ``snr_db``; and ``feeds``."""
    outs = [np.asarray(run(feed), dtype=np.float64).reshape(ref.shape) for feed, ref in zip(feeds, refs)]
    par = parity_error(zip(outs, refs))
    err = output_error(refs, outs)
    return {"rel_max": par["rel_max"], "rel_rms": err["rel_rms"], "snr_db": err["snr_db"], "feeds": len(outs)}


def accuracy_summary(acc: dict) -> dict:
    """A prompt-suite evaluation as the table reports it: mean over attributes, every attribute."""
    per = acc["per_attribute"]
    return {"mean": float(np.mean(list(per.values()))), "per_attribute": per, "all_correct": acc["all_correct"], "n": acc["n"]}


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
