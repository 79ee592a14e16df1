"""pocketfusion.training: the one training loop (tiny models, CPU, a few seconds)."""

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pocketfusion.errors import MissingBackendError, UserError
from pocketfusion.training import TrainConfig, latest_checkpoint, learning_rate, train


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 1))


_W = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def _data(ctx):
    x = torch.randn(8, 4, generator=ctx.rng)
    return x, x @ _W


def _mse(net):
    return lambda batch, ctx: (net(batch[0]) - batch[1]).pow(2).mean()


def _params(net):
    return [p.detach().clone() for p in net.parameters()]


def test_loss_decreases():
    net = _net()
    res = train({"net": net}, _mse(net), TrainConfig(iterations=150, lr=1e-2, schedule="cosine", warmup=10), data=_data, progress=False)
    assert len(res.losses) == res.iterations == 150
    assert np.mean(res.losses[-10:]) < 0.2 * np.mean(res.losses[:10])
    assert res.log[0]["iteration"] == 0 and res.log[-1]["iteration"] == 149


def test_two_modules_with_their_own_learning_rates():
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    a0, b0 = _params(a), _params(b)
    cfg = TrainConfig(iterations=1, lr=1e-2, module_lr={"b": 1e-4}, weight_decay=0.0)
    train({"a": a, "b": b}, lambda batch, ctx: (b(a(batch[0])) - batch[1]).pow(2).mean(), cfg, data=_data, progress=False)
    # Adam's first step moves every weight by ~lr (m / sqrt(v) = sign(g)).
    for new, old, lr in [*zip(a.parameters(), a0, [1e-2] * 2), *zip(b.parameters(), b0, [1e-4] * 2)]:
        torch.testing.assert_close((new - old).abs(), torch.full_like(old, lr), rtol=1e-3, atol=0)


def test_accumulation_of_two_halves_equals_one_big_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g)
    batch = (x, x @ _W)
    halves = [(x[:8], batch[1][:8]), (x[8:], batch[1][8:])]
    big, acc = _net(), _net()
    cfg = dict(iterations=4, lr=1e-2, grad_clip=0.5)
    r1 = train({"net": big}, _mse(big), TrainConfig(**cfg), data=[batch], progress=False)
    r2 = train({"net": acc}, _mse(acc), TrainConfig(accumulation=2, **cfg), data=halves, progress=False)
    for p, q in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r1.losses, r2.losses, rtol=1e-5)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_value(warmup):
    net = _net()
    seen = []

    def loss_fn(batch, ctx):
        seen.append(_params(net))  # the weights before each step
        return _mse(net)(batch, ctx)

    res = train({"net": net}, loss_fn, TrainConfig(iterations=5, lr=1e-2, ema_decay=0.8, ema_warmup=warmup), data=_data, progress=False)
    states = seen + [_params(net)]
    expected = states[0]
    for i, after in enumerate(states[1:]):
        d = min(0.8, (1 + i) / (10 + i)) if warmup else 0.8
        expected = [d * e + (1 - d) * p for e, p in zip(expected, after)]
    ema = res.ema_module("net")
    for e, p in zip(expected, ema.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-7)
    assert not torch.equal(next(ema.parameters()), next(net.parameters()))


class _Stop(Exception):
    pass


def _resumable_run(ckpt_dir, stop_at=None, resume=False, data=None):
    """A run that uses every RNG the loop restores (dropout, loop generator, numpy, random)."""
    net = _net(dropout=0.1)

    def loss_fn(batch, ctx):
        if ctx.iteration == stop_at:
            raise _Stop
        jitter = float(np.random.rand()) * 1e-3 + random.random() * 1e-3
        return (net(batch[0]) - batch[1]).pow(2).mean() * (1 + jitter)

    cfg = TrainConfig(iterations=10, lr=1e-2, schedule="linear", warmup=2, grad_clip=1.0, ema_decay=0.9, accumulation=2,
                      checkpoint_every=4, resume=resume, seed=3)
    return net, train({"net": net}, loss_fn, cfg, data=data or _data, ckpt_dir=ckpt_dir, progress=False)


@pytest.mark.parametrize("iterable", [False, True])
def test_resume_is_bit_identical(tmp_path, iterable):
    data = None
    if iterable:
        g = torch.Generator().manual_seed(5)
        xs = [torch.randn(8, 4, generator=g) for _ in range(3)]
        data = [(x, x @ _W) for x in xs]
    ref_net, ref = _resumable_run(tmp_path / "ref", data=data)
    with pytest.raises(_Stop):
        _resumable_run(tmp_path / "run", stop_at=6, data=data)  # killed after the checkpoint at 4
    assert latest_checkpoint(tmp_path / "run").name == "iter-00000004"
    net, res = _resumable_run(tmp_path / "run", resume=True, data=data)
    assert res.resumed_from == 4 and res.iterations == 10
    for p, q in zip(ref_net.parameters(), net.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(ref.ema_module("net").parameters(), res.ema_module("net").parameters()):
        assert torch.equal(p, q)
    assert res.losses == ref.losses


def test_checkpoints_hold_no_pickle(tmp_path):
    _resumable_run(tmp_path)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".safetensors", ".json") for p in files), files
    from safetensors import safe_open

    for p in files:  # each parses as what its name says: no pickle or torch.save zip inside
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            with safe_open(str(p), "pt") as f:
                assert list(f.keys())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter-00000008", "iter-00000010", "latest.json"]  # keep_checkpoints=2
    state = json.loads((tmp_path / "iter-00000010" / "state.json").read_text())
    assert state["iterations_done"] == 10 and TrainConfig.from_dict(state["config"]).iterations == 10


def test_interrupted_write_never_becomes_latest(tmp_path):
    _resumable_run(tmp_path)
    (tmp_path / ".iter-00000012.tmp").mkdir()  # a write killed before its rename
    (tmp_path / "latest.json").write_text(json.dumps({"dir": "iter-00000099"}))  # names a folder that is gone
    assert latest_checkpoint(tmp_path).name == "iter-00000010"


def test_resume_with_another_config_is_refused(tmp_path):
    _resumable_run(tmp_path)
    net = _net()
    with pytest.raises(UserError, match="config changed.*lr"):
        train({"net": net}, _mse(net), TrainConfig(iterations=12, lr=0.5, resume=True), data=_data, ckpt_dir=tmp_path, progress=False)


@pytest.mark.parametrize(
    "bad",
    [
        dict(iterations=0), dict(lr=0.0), dict(lr=float("nan")), dict(betas=(0.9, 1.0)), dict(weight_decay=-1.0),
        dict(schedule="step"), dict(warmup=-1), dict(min_lr_ratio=2.0), dict(grad_clip=0.0), dict(ema_decay=1.0),
        dict(accumulation=0), dict(precision="fp8"), dict(precision="fp16", device="cpu"), dict(device="tpu"),
        dict(seed=-1), dict(checkpoint_every=-1), dict(keep_checkpoints=0), dict(module_lr={"x": -1.0}),
        dict(iterations=2.5), dict(resume="yes"), dict(version=2),
    ],
)
def test_bad_config_raises_user_error(bad):
    with pytest.raises(UserError, match=next(iter(bad)).split("_")[0]):
        TrainConfig(**bad)


def test_config_round_trip_and_unknown_keys():
    cfg = TrainConfig(iterations=7, module_lr={"te": 1e-5}, ema_decay=0.99, precision="bf16")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UserError, match="unknown keys"):
        TrainConfig.from_dict({**cfg.to_dict(), "momentum": 0.9})


def test_learning_rate_schedule():
    cfg = TrainConfig(iterations=100, lr=1.0, schedule="cosine", warmup=10, min_lr_ratio=0.05)
    assert learning_rate(cfg, 0) == pytest.approx(0.1) and learning_rate(cfg, 9) == 1.0
    assert learning_rate(cfg, 10) == 1.0 and learning_rate(cfg, 100) == pytest.approx(0.05)
    lin = TrainConfig(iterations=10, lr=2.0, schedule="linear")
    assert [learning_rate(lin, i) for i in (0, 5)] == [2.0, 1.0]


def test_bf16_autocast_on_cpu():
    net = _net()
    res = train({"net": net}, _mse(net), TrainConfig(iterations=3, lr=1e-2, precision="bf16"), data=_data, progress=False)
    assert all(np.isfinite(res.losses)) and next(net.parameters()).dtype == torch.float32


def test_bad_arguments(tmp_path, monkeypatch):
    net = _net()
    with pytest.raises(UserError, match="ckpt_dir"):
        train({"net": net}, _mse(net), TrainConfig(iterations=1, checkpoint_every=1), data=_data)
    with pytest.raises(UserError, match="mapping"):
        train(net, _mse(net), TrainConfig(iterations=1), data=_data)
    with pytest.raises(UserError, match="0-dim"):
        train({"net": net}, lambda b, ctx: net(b[0]), TrainConfig(iterations=1), data=_data, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="cuda"):
            train({"net": net}, _mse(net), TrainConfig(iterations=1, device="cuda"), data=_data)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MissingBackendError, match=r"pocketfusion\[train\]"):
        train({"net": net}, _mse(net), TrainConfig(iterations=1), data=_data)


_MP_SCRIPT = """
import sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from pocketfusion.training import TrainConfig, train

torch.set_num_threads(1)
out = Path(sys.argv[1])
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
x = torch.linspace(-1, 1, 32).reshape(8, 4)
y = x.sum(dim=1, keepdim=True)
cfg = TrainConfig(iterations=6, lr=1e-2, grad_clip=1.0, ema_decay=0.9, checkpoint_every=3)
train({"net": net}, lambda b, ctx: (net(x) - y).pow(2).mean(), cfg, ckpt_dir=out / "ckpt", progress=False)
dist = torch.distributed.is_initialized()
rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / f"w{world}-rank{rank}.safetensors"))
"""


@pytest.mark.slow
def test_two_processes_with_accelerate_match_one(tmp_path):
    """``accelerate launch`` with 2 CPU processes (gloo): same batch on both ranks -> same weights as 1 process."""
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    script = tmp_path / "mp_train.py"
    script.write_text(textwrap.dedent(_MP_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29631"]
    subprocess.run([*launch, str(script), str(tmp_path / "two")], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], check=True, env=env, timeout=300)
    r0, r1 = (load_file(str(tmp_path / "two" / f"w2-rank{r}.safetensors")) for r in (0, 1))
    one = load_file(str(tmp_path / "one" / "w1-rank0.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) and torch.equal(r0[k], one[k]) for k in one)
    names = {p.name for p in Path(tmp_path / "two" / "ckpt" / "iter-00000006").iterdir()}
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors", "model.safetensors", "state.json"} <= names
