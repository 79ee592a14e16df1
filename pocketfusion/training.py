"""The one training loop of every stage that trains (demo model, distillation, pruning recovery, LoRA).

AdamW with per-module learning rates, warmup + cosine/linear schedule, gradient clipping and
accumulation, EMA, mixed precision, seeding, a progress bar, and checkpoints that resume bit for bit.
The caller owns the model and the objective: ``loss_fn(batch, ctx)`` returns a scalar loss and draws
its randomness from ``ctx.rng``, a generator the loop seeds and checkpoints::

    cfg = TrainConfig(iterations=1000, lr=1e-4, schedule="cosine", warmup=100, ema_decay=0.999, checkpoint_every=200)
    result = train({"unet": unet}, lambda batch, ctx: unet(batch).pow(2).mean(), cfg, data=loader, ckpt_dir="runs/x/ckpt")
    result.ema_module("unet").save_pretrained("runs/x/unet")

A checkpoint (``<ckpt_dir>/iter-00000200/``) is safetensors + JSON, never pickle, renamed into place
when complete before ``latest.json`` is replaced atomically. Under ``accelerate launch`` (WORLD_SIZE > 1)
the loop is data-parallel: rank 0's weights are broadcast, gradients averaged, each rank draws from
seed + rank * 1000003, rank 0 writes the checkpoints (each rank its own RNG state).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pocketfusion.artifact import atomic_write_text
from pocketfusion.backends import require
from pocketfusion.errors import CheckpointError, UserError
from pocketfusion.validate import DEVICES, is_int, is_num, resolve_device

logger = logging.getLogger(__name__)

CONFIG_VERSION = 1
CHECKPOINT_FORMAT = 1
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("none", "bf16", "fp16")
_LATEST = "latest.json"
_CKPT_RE = re.compile(r"^iter-(\d{8})$")
_RANK_SEED_STRIDE = 1_000_003  # rank r seeds with seed + r * stride; rank 0 keeps the seed as given
# Config fields a resumed run may change without changing what it computes (iterations: it changes the schedule).
_RESUME_FREE = ("iterations", "checkpoint_every", "keep_checkpoints", "resume", "log_every")


@dataclass(frozen=True)
class TrainConfig:
    """How to train; validated on construction (``UserError`` naming the field, value and allowed values)."""

    iterations: int = 1000  # optimizer steps of the whole run (a resumed run counts those done)
    lr: float = 1e-4  # AdamW rate of every module not in module_lr
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    module_lr: tuple[tuple[str, float], ...] = ()  # (("text_encoder", 1e-5), ...); a dict is accepted
    schedule: str = "constant"  # constant | cosine | linear: decay after warmup to min_lr_ratio * rate
    warmup: int = 0  # linear warmup iterations: rate * (i + 1) / warmup
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None  # max global L2 norm of all trained gradients; None: no clipping
    ema_decay: float | None = None  # keep an EMA of the trained parameters; None: none
    ema_warmup: bool = False  # decay min(ema_decay, (1 + i) / (10 + i)) at iteration i
    accumulation: int = 1  # micro-batches per optimizer step, gradients averaged
    precision: str = "none"  # none | bf16 (autocast, cpu or cuda) | fp16 (cuda, GradScaler)
    device: str = "cpu"  # cpu | cuda
    seed: int = 0  # seeds torch, numpy, random and the loop's generator when a run starts
    checkpoint_every: int = 0  # every N iterations and after the last; 0: never
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: bool = False  # continue from the newest checkpoint in ckpt_dir when there is one
    log_every: int = 50  # TrainResult.log entry every N iterations and at the last
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        try:
            pairs = self.module_lr.items() if isinstance(self.module_lr, Mapping) else self.module_lr
            object.__setattr__(self, "module_lr", tuple((str(k), float(v)) for k, v in pairs))
            object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        except (TypeError, ValueError) as e:
            raise UserError(f"TrainConfig: module_lr must be (name, lr) pairs and betas two floats ({e})") from None
        if problems := _config_problems(self):
            raise UserError("TrainConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists), ``version`` included."""
        return {**dataclasses.asdict(self), "betas": list(self.betas), "module_lr": [list(p) for p in self.module_lr]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict``; raises UserError on an unknown key or ``version`` or a bad value."""
        names = [f.name for f in dataclasses.fields(cls)]
        if unknown := sorted(set(d) - set(names)):
            raise UserError(f"TrainConfig: unknown keys {unknown}; known: {names}")
        if d.get("version", CONFIG_VERSION) != CONFIG_VERSION:
            raise UserError(f"TrainConfig: version {d['version']!r} is not supported (only {CONFIG_VERSION})")
        return cls(**d)




def _config_problems(c: TrainConfig) -> list[str]:
    inf = math.inf
    checks = [
        (c.version == CONFIG_VERSION, f"version={c.version!r}: only {CONFIG_VERSION}"),
        (is_int(c.iterations, 1), f"iterations={c.iterations!r}: an int >= 1"),
        (is_num(c.lr, 0, inf, open_low=True), f"lr={c.lr!r}: a finite float > 0"),
        (all(is_num(v, 0, inf, open_low=True) for _, v in c.module_lr), f"module_lr={c.module_lr!r}: rates > 0"),
        (len(c.module_lr) == len({k for k, _ in c.module_lr}), f"module_lr={c.module_lr!r}: a module named twice"),
        (len(c.betas) == 2 and all(is_num(b, 0, 1, open_high=True) for b in c.betas), f"betas={c.betas!r}: two floats in [0, 1)"),
        (is_num(c.eps, 0, inf, open_low=True), f"eps={c.eps!r}: a float > 0"),
        (is_num(c.weight_decay, 0, inf), f"weight_decay={c.weight_decay!r}: a float >= 0"),
        (c.schedule in SCHEDULES, f"schedule={c.schedule!r}: one of {', '.join(SCHEDULES)}"),
        (is_int(c.warmup, 0), f"warmup={c.warmup!r}: an int >= 0"),
        (is_num(c.min_lr_ratio, 0, 1), f"min_lr_ratio={c.min_lr_ratio!r}: a float in [0, 1]"),
        (c.grad_clip is None or is_num(c.grad_clip, 0, inf, open_low=True), f"grad_clip={c.grad_clip!r}: None or > 0"),
        (c.ema_decay is None or is_num(c.ema_decay, 0, 1, open_low=True, open_high=True), f"ema_decay={c.ema_decay!r}: None or in (0, 1)"),
        (isinstance(c.ema_warmup, bool), f"ema_warmup={c.ema_warmup!r}: a bool"),
        (is_int(c.accumulation, 1), f"accumulation={c.accumulation!r}: an int >= 1"),
        (c.precision in PRECISIONS, f"precision={c.precision!r}: one of {', '.join(PRECISIONS)}"),
        (c.device in DEVICES, f"device={c.device!r}: one of {', '.join(DEVICES)}"),
        (is_int(c.seed, 0) and c.seed < 2**31, f"seed={c.seed!r}: an int in [0, 2**31)"),
        (is_int(c.checkpoint_every, 0), f"checkpoint_every={c.checkpoint_every!r}: an int >= 0 (0: never)"),
        (is_int(c.keep_checkpoints, 1), f"keep_checkpoints={c.keep_checkpoints!r}: an int >= 1"),
        (isinstance(c.resume, bool), f"resume={c.resume!r}: a bool"),
        (is_int(c.log_every, 1), f"log_every={c.log_every!r}: an int >= 1"),
        (not (c.precision == "fp16" and c.device == "cpu"), "precision='fp16' needs device='cuda' (GradScaler); use 'bf16' on cpu"),
    ]
    return [msg for ok, msg in checks if not ok]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and every CUDA device) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def learning_rate(cfg: TrainConfig, iteration: int, base: float | None = None) -> float:
    """The learning rate at 0-based ``iteration`` for base rate ``base`` (default ``cfg.lr``).

    Linear warmup ``base * (i + 1) / warmup``, then ``constant``, or ``cosine``/``linear`` decay from
    ``base`` to ``base * cfg.min_lr_ratio`` at the last iteration.
    """
    base = cfg.lr if base is None else base
    if iteration < cfg.warmup:
        return base * (iteration + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return base
    p = (iteration - cfg.warmup) / max(1, cfg.iterations - cfg.warmup)
    m = cfg.min_lr_ratio
    shape = 0.5 * (1 + math.cos(math.pi * p)) if cfg.schedule == "cosine" else 1.0 - p
    return base * (m + (1 - m) * shape)


@dataclass(frozen=True)
class StepContext:
    """What ``data`` and ``loss_fn`` get on every micro-step. ``rng``: the loop's CPU generator (seeded from
    ``TrainConfig.seed`` and the rank, restored on resume); draw all randomness from it to resume bit for bit."""

    iteration: int  # 0-based optimizer step
    micro_step: int  # 0 .. accumulation - 1
    rng: torch.Generator
    device: torch.device
    rank: int = 0
    world_size: int = 1


@dataclass
class TrainResult:
    """What ``train`` returns. ``modules`` are the trained modules themselves (not copies)."""

    modules: dict[str, nn.Module]
    losses: list[float]  # every iteration's loss from iteration 0 (resumed runs included), mean over micro-batches and ranks
    log: list[dict[str, float]]  # iteration, loss, lr, elapsed_s every log_every iterations and at the last
    iterations: int
    elapsed_s: float
    resumed_from: int | None = None
    checkpoint: Path | None = None
    ema: dict[str, dict[str, torch.Tensor]] | None = field(default=None, repr=False)

    def ema_module(self, name: str) -> nn.Module:
        """A deep copy of module ``name`` holding the EMA weights (what to save when EMA is on).

        Raises:
            UserError: the run kept no EMA, or no module is called ``name``.
        """
        if self.ema is None:
            raise UserError("this run kept no EMA: set TrainConfig.ema_decay")
        if name not in self.modules:
            raise UserError(f"no module {name!r}; trained: {sorted(self.modules)}")
        module = copy.deepcopy(self.modules[name])
        params = dict(module.named_parameters())
        with torch.no_grad():
            for pname, value in self.ema[name].items():
                params[pname].copy_(value)
        return module

    def iteration_seconds(self) -> tuple[float, float]:
        """(first iteration, median of the rest) in seconds, from a run logged every iteration (``log_every=1``)."""
        elapsed = [e["elapsed_s"] for e in self.log]
        if not elapsed:
            return self.elapsed_s, self.elapsed_s
        times = [elapsed[0]] + [b - a for a, b in zip(elapsed, elapsed[1:])]
        rest = sorted(times[1:]) or times
        return round(times[0], 4), round(rest[len(rest) // 2], 4)


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def barrier(self) -> None:
        return torch.distributed.barrier() if self.world > 1 else None


def _distributed(cfg: TrainConfig) -> _Dist:
    """Single process, or the process group of ``accelerate launch`` when WORLD_SIZE > 1."""
    resolve_device(cfg.device)  # UserError: cuda where torch sees none
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _Dist(device=torch.device(cfg.device))
    state = require("accelerate", "train").PartialState(cpu=cfg.device == "cpu")
    if state.num_processes <= 1:
        return _Dist(device=torch.device(cfg.device))
    device = state.device if cfg.device == "cuda" else torch.device("cpu")
    logger.info("data-parallel training: rank %d of %d on %s", state.process_index, state.num_processes, device)
    return _Dist(rank=state.process_index, world=state.num_processes, device=device)


def _batch_source(data: Callable[[StepContext], Any] | Iterable | None, skip: int) -> Callable[[StepContext], Any]:
    """``data`` as a callable: called with the context, or iterated (restarted when it runs out)."""
    if data is None:
        return lambda ctx: None
    if callable(data):
        return data
    state: dict[str, Any] = {"it": None, "skip": skip}

    def pull() -> Any:
        for _ in range(2):
            if state["it"] is None:
                state["it"] = iter(data)
            try:
                return next(state["it"])
            except StopIteration:
                state["it"] = None  # next epoch
        raise UserError("data yielded no batch: pass a re-iterable (list, DataLoader) or a callable(ctx) -> batch")

    def source(ctx: StepContext) -> Any:
        while state["skip"] > 0:  # a resumed run replays the batches it already used
            state["skip"] -= 1
            pull()
        return pull()

    return source


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """safetensors file, fsynced; tensors that share storage (tied weights) are copied apart."""
    from safetensors.torch import save_file

    out, seen = {}, set()
    for k, v in tensors.items():
        t = v.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[k] = t.clone() if t.numel() and key in seen else t
        seen.add(key)
    save_file(out, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    return load_file(str(path))


def _rng_state(gen: torch.Generator, cuda: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state(), "loop": gen.get_state()}
    tensors.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())} if cuda else {})
    (kind, keys, pos, has_gauss, gauss), py = np.random.get_state(), random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)], "python": [py[0], list(py[1]), py[2]]}


def _set_rng_state(gen: torch.Generator, tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    gen.set_state(tensors["loop"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    n = scalars["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = scalars["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _flatten_optimizer(sd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state_dict as tensors (``"<param index>/<key>"``) + JSON (groups, scalar state)."""
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            (tensors if torch.is_tensor(v) else scalars)[f"{idx}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in [*tensors.items(), *meta["scalars"].items()]:
        idx, k = key.split("/", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else dict(g) for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place only when whole), oldest first."""
    found = ckpt_dir.iterdir() if ckpt_dir.is_dir() else ()
    return sorted(p for p in found if p.is_dir() and _CKPT_RE.match(p.name) and (p / "state.json").is_file())


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint (``<ckpt_dir>/iter-NNNNNNNN``) that ``latest.json`` names, else the newest complete one, else None."""
    ckpt_dir = Path(ckpt_dir)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        named = ckpt_dir / json.loads((ckpt_dir / _LATEST).read_text())["dir"]
        if (named / "state.json").is_file():
            return named
    found = _checkpoints(ckpt_dir)
    return found[-1] if found else None


class _Run:
    """The mutable state of one training run: modules, optimizer, scaler, EMA, generator, history."""

    def __init__(self, modules: Mapping[str, nn.Module], loss_fn: Callable, cfg: TrainConfig, ckpt_dir: Path | None):
        self.cfg, self.loss_fn, self.ckpt_dir = cfg, loss_fn, ckpt_dir
        self.dist = _distributed(cfg)
        self.modules = {name: m.to(self.dist.device) for name, m in modules.items()}
        if unknown := sorted(set(dict(cfg.module_lr)) - set(self.modules)):
            raise UserError(f"TrainConfig.module_lr names {unknown}, which are not trained modules: {sorted(self.modules)}")
        self.names: list[tuple[str, str]] = []  # (module, parameter) of each trained parameter, in order
        groups, self.base_lrs = [], []
        for name, m in self.modules.items():
            params = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
            if params:
                self.names += [(name, n) for n, _ in params]
                self.base_lrs.append(dict(cfg.module_lr).get(name, cfg.lr))
                groups.append({"params": [p for _, p in params], "lr": self.base_lrs[-1]})
        if not groups:
            raise UserError(f"no trainable parameters in {sorted(self.modules)}: all have requires_grad=False")
        self.params = [p for g in groups for p in g["params"]]
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        seed = cfg.seed + self.dist.rank * _RANK_SEED_STRIDE
        seed_everything(seed)
        self.rng = torch.Generator().manual_seed(seed)
        if self.dist.world > 1:
            with torch.no_grad():
                for m in self.modules.values():
                    for t in [*m.parameters(), *m.buffers()]:
                        torch.distributed.broadcast(t, src=0)
        self.ema = [p.detach().clone() for p in self.params] if cfg.ema_decay is not None else None
        self.done, self.losses, self.log, self.elapsed_before = 0, [], [], 0.0
        self.resumed_from, self.checkpoint = None, None  # set by load / save

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.precision == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16)

    def iteration(self, it: int, source: Callable[[StepContext], Any]) -> float:
        """One optimizer step over ``accumulation`` micro-batches; returns the mean loss."""
        cfg, d = self.cfg, self.dist
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = learning_rate(cfg, it, base)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.accumulation):
            ctx = StepContext(it, micro, self.rng, d.device, d.rank, d.world)
            batch = source(ctx)
            with self._autocast():
                loss = self.loss_fn(batch, ctx)
            if not torch.is_tensor(loss) or loss.dim() != 0:
                raise UserError(f"loss_fn must return a 0-dim tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}")
            total += loss.item()
            scaled = loss / cfg.accumulation if cfg.accumulation > 1 else loss
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        mean = total / cfg.accumulation
        if d.world > 1:
            mean = self._all_reduce_grads(mean)
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        if self.ema is not None:
            decay = min(cfg.ema_decay, (1 + it) / (10 + it)) if cfg.ema_warmup else cfg.ema_decay
            with torch.no_grad():
                for shadow, p in zip(self.ema, self.params):
                    shadow.lerp_(p, 1 - decay)
        return mean

    def _all_reduce_grads(self, loss: float) -> float:
        """Average gradients (a missing one counts as zeros) and the loss over ranks."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for dtype in {p.grad.dtype for p in self.params}:  # one flat all-reduce per dtype
            grads = [p.grad for p in self.params if p.grad.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            for g, part in zip(grads, flat.div_(self.dist.world).split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))
        t = torch.tensor([loss], dtype=torch.float64, device=self.dist.device)
        torch.distributed.all_reduce(t)
        return float(t.item() / self.dist.world)

    def _tensors(self, ema: bool) -> dict[str, torch.Tensor]:
        """Trained parameters (or their EMA) and all buffers, keyed ``"<module>/<name>"``."""
        if ema:
            return {f"{m}/{n}": t for (m, n), t in zip(self.names, self.ema)}
        trained = set(self.names)
        out = {}
        for name, module in self.modules.items():
            buffers = {n for n, _ in module.named_buffers()}
            out.update({f"{name}/{k}": v for k, v in module.state_dict().items() if (name, k) in trained or k in buffers})
        return out

    def save(self, done: int, elapsed: float) -> Path:
        """Write checkpoint ``iter-<done>`` (every rank its RNG state, rank 0 the rest) and publish it."""
        d, name = self.dist, f"iter-{done:08d}"
        tmp, final = self.ckpt_dir / f".{name}.tmp", self.ckpt_dir / name
        if d.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        d.barrier()
        rng_t, rng_s = _rng_state(self.rng, d.device.type == "cuda")
        _save_tensors(tmp / f"rng-rank{d.rank}.safetensors", rng_t)
        atomic_write_text(tmp / f"rng-rank{d.rank}.json", json.dumps(rng_s))
        d.barrier()
        if d.rank == 0:
            _save_tensors(tmp / "model.safetensors", self._tensors(ema=False))
            if self.ema is not None:
                _save_tensors(tmp / "ema.safetensors", self._tensors(ema=True))
            opt_t, opt_meta = _flatten_optimizer(self.opt.state_dict())
            _save_tensors(tmp / "optimizer.safetensors", opt_t)
            scaler = self.scaler.state_dict() if self.scaler is not None else None
            state = {"format": CHECKPOINT_FORMAT, "iterations_done": done, "world_size": d.world, "config": self.cfg.to_dict(),
                     "modules": list(self.modules), "optimizer": opt_meta, "scaler": scaler, "losses": self.losses,
                     "log": self.log, "elapsed_s": elapsed}
            atomic_write_text(tmp / "state.json", json.dumps(state))  # last: marks the folder complete
            shutil.rmtree(final, ignore_errors=True)  # a rerun over an older run's checkpoint
            os.replace(tmp, final)
            atomic_write_text(self.ckpt_dir / _LATEST, json.dumps({"dir": name, "iterations_done": done}) + "\n")
            for old in [c for c in _checkpoints(self.ckpt_dir)[: -self.cfg.keep_checkpoints] if c != final]:
                shutil.rmtree(old, ignore_errors=True)
        d.barrier()
        self.checkpoint = final
        return final

    def load(self, path: Path) -> None:
        """Restore everything ``save`` wrote; the config must match except for ``_RESUME_FREE`` fields."""
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read checkpoint {path / 'state.json'}: {e}") from None
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint {path} has format {state.get('format')!r}; this version reads {CHECKPOINT_FORMAT}")
        now, then = self.cfg.to_dict(), state["config"]
        changed = [f"{k}: {then.get(k)!r} -> {now[k]!r}" for k in now if k not in _RESUME_FREE and then.get(k) != now[k]]
        if changed:
            raise UserError(f"cannot resume from {path}: config changed ({'; '.join(changed)}); use the same settings or a new ckpt_dir")
        if then["iterations"] != now["iterations"]:
            logger.warning("resuming with iterations=%d instead of %d: the LR schedule changes", now["iterations"], then["iterations"])
        if state["world_size"] != self.dist.world or state["modules"] != list(self.modules):
            raise UserError(f"cannot resume from {path}: it was made by {state['world_size']} process(es) training "
                            f"{state['modules']}; this run has {self.dist.world} training {list(self.modules)}")
        self._load_tensors(path, state)
        _set_rng_state(self.rng, _load_tensors(path / f"rng-rank{self.dist.rank}.safetensors"),
                       json.loads((path / f"rng-rank{self.dist.rank}.json").read_text()))
        self.done = self.resumed_from = int(state["iterations_done"])
        self.losses, self.log, self.elapsed_before, self.checkpoint = state["losses"], state["log"], float(state["elapsed_s"]), path
        logger.info("resumed from %s (%d iterations done)", path, self.done)

    def _load_tensors(self, path: Path, state: Mapping[str, Any]) -> None:
        saved = _load_tensors(path / "model.safetensors")
        targets = {f"{name}/{k}": v for name, m in self.modules.items() for k, v in m.state_dict().items()}
        expected = set(self._tensors(ema=False))
        if set(saved) != expected:
            diff = sorted(set(saved) ^ expected)
            raise CheckpointError(f"checkpoint {path} does not match the modules: {len(diff)} keys differ, e.g. {diff[:3]}")
        with torch.no_grad():
            for k, v in saved.items():
                targets[k].copy_(v)
            if self.ema is not None:
                ema = _load_tensors(path / "ema.safetensors")
                for k, shadow in zip((f"{m}/{n}" for m, n in self.names), self.ema):
                    shadow.copy_(ema[k])
        self.opt.load_state_dict(_unflatten_optimizer(_load_tensors(path / "optimizer.safetensors"), state["optimizer"]))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def result(self, elapsed: float) -> TrainResult:
        ema = None if self.ema is None else {k: {n: t for (m, n), t in zip(self.names, self.ema) if m == k} for k in self.modules}
        return TrainResult(self.modules, self.losses, self.log, self.done, elapsed, self.resumed_from, self.checkpoint, ema)


def train(
    modules: Mapping[str, nn.Module],
    loss_fn: Callable[[Any, StepContext], torch.Tensor],
    cfg: TrainConfig,
    *,
    data: Callable[[StepContext], Any] | Iterable | None = None,
    ckpt_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "train",
    on_checkpoint: Callable[[Path, int], None] | None = None,
) -> TrainResult:
    """Train ``modules`` jointly (one AdamW parameter group each, moved to the device, trained in place).

    Each iteration runs ``cfg.accumulation`` micro-steps of ``loss_fn(data(ctx), ctx)`` under autocast,
    then clips, steps, updates the EMA and checkpoints every ``cfg.checkpoint_every`` iterations.

    Args:
        modules: name -> module; only parameters with ``requires_grad`` are trained. A single model: ``{"model": m}``.
        loss_fn: ``(batch, ctx) -> 0-dim loss tensor``; draw randomness from ``ctx.rng`` only.
        cfg: the training configuration.
        data: ``callable(ctx) -> batch``, a re-iterable of batches (replayed to the resume point), or None.
        ckpt_dir: where checkpoints go; needed when ``cfg.checkpoint_every`` or ``cfg.resume`` is set.
        progress: show a tqdm bar (ETA, running loss) on rank 0.
        desc: the bar's label.
        on_checkpoint: called on rank 0 as ``on_checkpoint(path, iterations_done)`` after each checkpoint.

    Returns:
        TrainResult: the modules, per-iteration losses, log, EMA weights and the last checkpoint.

    Raises:
        UserError: bad arguments, CUDA asked for but missing, a checkpoint made with another config.
        MissingBackendError: WORLD_SIZE > 1 without ``accelerate`` (``pip install 'pocketfusion[train]'``).
        CheckpointError: an unreadable or mismatching checkpoint.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> train({"net": net}, lambda b, ctx: net(torch.ones(1, 2)).pow(2).mean(), TrainConfig(iterations=3)).iterations
        3
    """
    from tqdm import tqdm

    if not isinstance(modules, Mapping) or not modules or not all(isinstance(m, nn.Module) for m in modules.values()):
        raise UserError("train() takes a non-empty mapping of name -> torch.nn.Module, e.g. {'unet': unet}")
    if (cfg.checkpoint_every or cfg.resume) and ckpt_dir is None:
        raise UserError("TrainConfig.checkpoint_every / resume need a ckpt_dir")
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
    run = _Run(modules, loss_fn, cfg, ckpt_dir)
    found = latest_checkpoint(ckpt_dir) if cfg.resume else None
    if found is not None:
        run.load(found)
    elif cfg.resume:
        logger.info("no checkpoint in %s: starting from iteration 0", ckpt_dir)
    source = _batch_source(data, run.done * cfg.accumulation)
    bar = tqdm(total=cfg.iterations, initial=run.done, desc=desc, disable=not progress or run.dist.rank != 0, mininterval=2.0)
    t0, elapsed = time.perf_counter(), run.elapsed_before
    try:
        for it in range(run.done, cfg.iterations):
            loss = run.iteration(it, source)
            run.done = it + 1
            run.losses.append(loss)
            elapsed = run.elapsed_before + time.perf_counter() - t0
            if it % cfg.log_every == 0 or run.done == cfg.iterations:
                run.log.append({"iteration": it, "loss": loss, "lr": run.opt.param_groups[0]["lr"], "elapsed_s": round(elapsed, 4)})
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)
            if cfg.checkpoint_every and (run.done % cfg.checkpoint_every == 0 or run.done == cfg.iterations):
                path = run.save(run.done, elapsed)
                if on_checkpoint is not None and run.dist.rank == 0:
                    on_checkpoint(path, run.done)
    finally:
        bar.close()
    return run.result(elapsed)
