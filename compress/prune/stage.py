"""The prune stage: ``prune(model, PruneConfig, out, table=..., measure=...)`` removes U-Net units
(ResNet blocks, attention blocks, the mid-block; ``pocketfusion.pruning``) until the U-Net's latency
*measured on the target runtime* reaches ``cfg.latency_budget`` of the original's, and recovers the rest
by knowledge distillation from the original. Writes one artifact directory (stage ``prune``):

    unet/            the pruned U-Net (safetensors); ``config.json`` says what a diffusers config can (attention-
                     free block types, ``mid_block_type: null``), ``pruning.json`` lists any other removed unit
    vae/, text_encoder/, tokenizer/, scheduler/   the source's, as they are (the sampler is unchanged)
    manifest.json    settings, the latency table used, the search's frontier, the removed units, parameters
                     and MACs before/after, the measured latency before/after, teacher-vs-student error
                     before/after recovery, and the training cost

SnapFusion's recipe, data-free: (1) robust training: the U-Net is distilled from the original while every
unit is dropped at random per call, so that sub-networks stay usable; (2) a search that removes, and may
put back, units scored by quality lost per millisecond saved (quality: the teacher-vs-student error of the
noise prediction on noised teacher samples; milliseconds: the runtime's latency table), checked against a
real export's latency and continued while the budget is missed; (3) recovery by task loss + output KD +
feature KD (BK-SDM). The runtime measurements come in as arguments (``table``, ``measure``) from the
caller (``pocketfusion prune``), since compress imports no exporter or runtime.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pocketfusion import artifact, pruning
from pocketfusion.compress.prune.config import PruneConfig
from pocketfusion.compress.workdir import frozen
from pocketfusion.errors import UserError
from pocketfusion.validate import resolve_device

logger = logging.getLogger(__name__)

STAGE = "prune"
_FORMATS = {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers", "tokenizer": "tokenizer", "scheduler": "scheduler"}
_RESUME_FREE = ("recovery_iterations", "checkpoint_every", "resume", "keep_work", "work_dir", "teacher_batch", "bench_runs",
                "bench_rounds")

Measure = Callable[[Any, dict[str, list[str]]], dict[str, dict]]  # (unet, {variant: removed units}) -> {variant: {median_ms}}


def work_dir(out: str | Path, cfg: PruneConfig) -> Path:
    out = Path(out)
    return Path(cfg.work_dir) if cfg.work_dir is not None else out.parent / f".{out.name}.prune-work"


def preset_units(unet, preset: str) -> list[str]:
    """BK-SDM's block removal, on this U-Net's units.

    ``bk-sdm-base``: the mid-block. ``bk-sdm-small``: also one ResNet + attention pair per stage where the
    stage keeps one (down: its last pair; up: its second). ``bk-sdm-tiny``: also the innermost stage (every
    ResNet of the last down block and of the first up block).
    """
    names = {u.name for u in pruning.units(unet)}
    out = [pruning.MID]
    if preset in ("bk-sdm-small", "bk-sdm-tiny"):
        for i, b in enumerate(unet.down_blocks):
            n = len(b.resnets)
            if n >= 2:
                out += [f"down_blocks.{i}.resnets.{n - 1}", f"down_blocks.{i}.attentions.{n - 1}"]
        for i, _ in enumerate(unet.up_blocks):
            out += [f"up_blocks.{i}.resnets.1", f"up_blocks.{i}.attentions.1"]
    if preset == "bk-sdm-tiny":
        last = len(unet.down_blocks) - 1
        out += [f"down_blocks.{last}.resnets.{j}" for j in range(len(unet.down_blocks[last].resnets))]
        out += [f"up_blocks.0.resnets.{j}" for j in range(len(unet.up_blocks[0].resnets))]
    return [n for n in dict.fromkeys(out) if n in names]


def prune(model, cfg: PruneConfig, out: str | Path, *, table: dict | None = None, measure: Measure | None = None,
          progress: bool = True) -> artifact.Manifest:
    """Prune ``model``'s U-Net and write the artifact ``out``.

    Args:
        model: a loaded Stable Diffusion pipeline (``checkpoint.Model``), float, not distilled.
        cfg: the stage's options.
        out: output directory (written under a temporary name, renamed into place when complete).
        table: the latency table of ``model.unet`` on ``cfg.runtime`` (``export.latency.unit_table``); needed by the
            search (not by a preset).
        measure: times U-Net variants on ``cfg.runtime`` (``export.latency.measure_variants``); without it the
            result's latency is the table's estimate, and the manifest says so.

    Raises:
        UserError: bad input, no latency table for a search, a budget no removal reaches.
    """
    _check_input(model, out, cfg, table)
    try:
        return _prune(model, cfg, Path(out), table, measure, progress)
    finally:
        if cfg.device != "cpu":
            model.components["text_encoder"].to("cpu")
            model.unet.to("cpu")


def _check_input(model, out, cfg: PruneConfig, table: dict | None) -> None:
    if model.kind != "pipeline" or model.class_name != "StableDiffusionPipeline":
        raise UserError(f"{model.path} is a {model.class_name}: prune takes a Stable Diffusion 1.x/2.x pipeline "
                        "(its teacher samples need the text encoder and scheduler)")
    if model.quantized:
        raise UserError(f"{model.path} is quantized: prune its float source, then quantize")
    if getattr(model.unet.config, "time_cond_proj_dim", None) is not None:
        raise UserError(f"{model.path} is a distilled student: prune its teacher, then distill the pruned model")
    if pruning.read(Path(model.path) / "unet") is not None:
        raise UserError(f"{model.path} is already pruned: prune its source with a lower --latency-budget")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    if out.resolve() == Path(model.path).resolve():
        raise UserError(f"output {out} is the source model folder; choose another directory")
    if cfg.preset is None and not table:
        raise UserError("the search needs a latency table measured on the runtime (pocketfusion prune measures one, "
                        "or give --latency-table FILE)")
    if table and table.get("runtime") != cfg.runtime:
        raise UserError(f"the latency table was measured on {table.get('runtime')}, not {cfg.runtime}")
    resolve_device(cfg.device)


class _Data:
    """Noised teacher samples: the training and scoring inputs of every phase."""

    def __init__(self, model, cfg: PruneConfig, work: Path, device, source_hash: str, progress: bool):
        from pocketfusion.compress.distill import teacher as TE
        from pocketfusion.compress.distill.student import Schedule

        self.prompts = TE.select_prompts(model, cfg)
        self.cond = TE.encode(model, self.prompts, device).cpu()
        self.uncond = TE.encode(model, [""], device, negative=True).cpu()
        self.schedule = Schedule(dict(model.components["scheduler"].config), 1.0)
        self.pairs = TE.teacher_pairs(model, model.unet.to(device).eval(), self.cond, self.uncond, self.prompts, cfg,
                                      device=device, work=work, model_hash=source_hash, progress=progress)
        self.cfg = cfg

    def batch(self, n: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor, torch.Tensor]:
        """(x_t, t, U-Net kwargs, x0, noise) for ``n`` random teacher samples at random timesteps; a share
        ``cfg_dropout`` of the rows is conditioned on the empty prompt (the pruned U-Net still runs CFG)."""
        p = self.pairs
        idx = torch.randint(0, len(p), (n,), generator=gen)
        x0 = p.latents[idx]
        t = torch.randint(0, self.schedule.T, (n,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        hidden = self.cond.hidden[p.prompt_index[idx]].clone()
        drop = torch.rand(n, generator=gen) < self.cfg.cfg_dropout
        hidden[drop] = self.uncond.hidden[0]
        s = self.schedule
        x_t = s.add_noise(x0, noise, t)
        return x_t.to(device), t.to(device), {"encoder_hidden_states": hidden.to(device)}, x0.to(device), noise.to(device)

    def target(self, x0, noise, t):
        """The diffusion loss's target: v or epsilon, as the model predicts."""
        if self.schedule.prediction == "v_prediction":
            alpha, sigma = self.schedule._ab(t.cpu(), x0.dim())
            return alpha.to(x0.device) * noise - sigma.to(x0.device) * x0
        return noise


class _Features:
    """Each stage's output feature map (down blocks, mid-block, up blocks), captured by forward hooks."""

    def __init__(self, unet):
        self.maps: dict[str, torch.Tensor] = {}
        self._hooks = []
        blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
        blocks += [("mid_block", unet.mid_block)] if unet.mid_block is not None else []
        blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
        for name, block in blocks:
            self._hooks.append(block.register_forward_hook(self._keep(name)))

    def _keep(self, name):
        def hook(module, args, output):
            self.maps[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _kd_loss(student, teacher, data: _Data, cfg: PruneConfig, *, gates: pruning.Gates | None = None, drop_prob: float = 0.0,
             weights: tuple[float, float, float]) -> Callable:
    """task * diffusion loss + output_kd * MSE to the teacher's prediction + feature_kd * sum over stages of the
    MSE to the teacher's feature map, each over the teacher feature's mean square. With ``gates``, each unit
    is dropped with probability ``drop_prob`` per call (robust training)."""
    w_task, w_out, w_feat = weights
    fs, ft = (_Features(student), _Features(teacher)) if w_feat > 0 else (None, None)
    names = gates.names if gates is not None else []

    def loss_fn(batch, ctx) -> torch.Tensor:
        x_t, t, kw, x0, noise = data.batch(cfg.batch_size, ctx.rng, ctx.device)
        if gates is not None:
            u = torch.rand(len(names), generator=ctx.rng)
            gates.drop = [n for n, r in zip(names, u.tolist()) if r < drop_prob]
        pred = student(x_t, t, **kw).sample.float()
        with torch.no_grad():
            ref = teacher(x_t, t, **kw).sample.float()
        loss = pred.new_zeros(())
        if w_task:
            loss = loss + w_task * torch.nn.functional.mse_loss(pred, data.target(x0, noise, t).float())
        if w_out:
            loss = loss + w_out * torch.nn.functional.mse_loss(pred, ref)
        if w_feat:
            for k, f in fs.maps.items():
                if k in ft.maps:
                    r = ft.maps[k].float()
                    loss = loss + w_feat * torch.nn.functional.mse_loss(f.float(), r) / r.pow(2).mean().clamp(min=1e-8)
        return loss

    loss_fn.features = (fs, ft)
    return loss_fn


def _train(modules: dict, loss_fn, cfg: PruneConfig, iterations: int, ckpt: Path, desc: str, progress: bool):
    from pocketfusion.training import TrainConfig, train

    tcfg = TrainConfig(iterations=iterations, lr=cfg.lr, grad_clip=1.0, device=cfg.device, seed=cfg.seed, schedule="cosine",
                       warmup=min(100, iterations // 10), min_lr_ratio=0.1, checkpoint_every=cfg.checkpoint_every,
                       resume=cfg.resume, log_every=max(1, iterations // 50))
    try:
        return train(modules, loss_fn, tcfg, ckpt_dir=ckpt, progress=progress, desc=desc)
    finally:
        for f in getattr(loss_fn, "features", (None, None)):
            if f is not None:
                f.remove()


class _Scorer:
    """Teacher-vs-student error of the *guided* prediction (both CFG branches at the sampler's scale, as sampling
    uses them) on a fixed set of noised teacher samples: mean squared difference over the teacher's mean square."""

    def __init__(self, teacher, data: _Data, cfg: PruneConfig, device, guidance: float = 4.0):
        gen = torch.Generator().manual_seed(cfg.seed + 7919)
        self.batches, self.guidance = [], guidance
        n = cfg.score_samples
        with torch.no_grad():
            for i in range(0, n, 64):
                m = min(64, n - i)
                x_t, t, _, _, _ = data.batch(m, gen, device)
                idx = torch.randint(0, len(data.cond), (m,), generator=gen)
                hidden = torch.cat([data.uncond.hidden.expand(m, -1, -1), data.cond.hidden[idx]]).to(device)
                args = (torch.cat([x_t, x_t]), torch.cat([t, t]), {"encoder_hidden_states": hidden})
                self.batches.append((args, self._guided(teacher, args)))
        self.scale = sum(r.pow(2).sum().item() for _, r in self.batches) / sum(r.numel() for _, r in self.batches)
        self.calls = 0

    def _guided(self, unet, args) -> torch.Tensor:
        x, t, kw = args
        e_u, e_c = unet(x, t, **kw).sample.float().chunk(2)
        return e_u + self.guidance * (e_c - e_u)

    @torch.no_grad()
    def __call__(self, unet, gates: pruning.Gates | None = None, drop=()) -> float:
        if gates is not None:
            gates.drop = list(drop)
        self.calls += 1
        err, n = 0.0, 0
        for args, ref in self.batches:
            d = self._guided(unet, args) - ref
            err += d.pow(2).sum().item()
            n += d.numel()
        return err / n / self.scale


def _estimate(table: dict, scale: float = 1.0) -> tuple[dict[str, float], Callable[[set[str]], float]]:
    """(each unit's saving, a set's estimated latency): the base minus its units' savings times ``scale``;
    units inside the mid-block count nothing once the mid-block itself is removed."""
    savings = {n: max(0.0, u["saving_ms"]) * scale for n, u in table["units"].items()}

    def est(r: set[str]) -> float:
        mid = pruning.MID in r
        return table["base_ms"] - sum(s for n, s in savings.items() if n in r and not (mid and n.startswith(pruning.MID + ".")))

    return savings, est


def greedy_path(table: dict, score: Callable[[set[str]], float], floor_ms: float) -> list[dict]:
    """Nested removal sets, one unit more each step, the unit with the least error added per millisecond saved
    (table estimate) first, until the estimate reaches ``floor_ms`` or nothing is left to remove."""
    savings, est = _estimate(table)
    removed: set[str] = set()
    q = score(removed)
    path = [{"removed": [], "est_ms": est(removed), "error": q, "action": "start"}]
    while est(removed) > floor_ms:
        best = None
        for n in savings:
            if n in removed or savings[n] <= 0 or (pruning.MID in removed and n.startswith(pruning.MID + ".")):
                continue
            gain = est(removed) - est(removed | {n})
            if gain > 0:
                qc = score(removed | {n})
                if best is None or (qc - q) / gain < best[0]:
                    best = ((qc - q) / gain, n, qc)
        if best is None:
            break
        _, n, q = best
        removed.add(n)
        path.append({"removed": sorted(removed), "est_ms": est(removed), "error": q, "action": f"-{n}"})
    return path


def search(table: dict, score: Callable[[set[str]], float], budget_ms: float, *, start: set[str] | None = None,
           scale: float = 1.0) -> tuple[set[str], list[dict]]:
    """Greedy removal by quality lost per millisecond saved until the estimated latency meets ``budget_ms``,
    then put-backs and swaps that keep the budget and lower the error.

    ``table``: ``unit_table``'s dict; a set's latency is estimated as the base minus its units' savings
    (times ``scale``: measured saving over estimated, after a real measurement). Units inside the mid-block
    count nothing once the mid-block itself is removed. Returns (removed units, frontier: one entry a step).
    """
    savings, est = _estimate(table, scale)
    base = table["base_ms"]
    removed = set(start or ())
    q = score(removed)
    frontier = [{"removed": sorted(removed), "est_ms": est(removed), "error": q, "action": "start"}]
    while est(removed) > budget_ms:
        best = None
        for n in savings:
            if n in removed or savings[n] <= 0 or (pruning.MID in removed and n.startswith(pruning.MID + ".")):
                continue
            cand = removed | {n}
            gain = est(removed) - est(cand)
            if gain <= 0:
                continue
            qc = score(cand)
            ratio = (qc - q) / gain
            if best is None or ratio < best[0]:
                best = (ratio, n, qc)
        if best is None:
            raise UserError(f"no removal reaches the latency budget: the table's units save at most "
                            f"{base - est(removed | set(savings)):.3f} of {base:.3f} ms")
        _, n, q = best
        removed.add(n)
        frontier.append({"removed": sorted(removed), "est_ms": est(removed), "error": q, "action": f"-{n}"})
    improved = True
    while improved:  # put back what the budget allows, then swap a removed unit for a cheaper-to-lose one
        improved = False
        for r in sorted(removed):
            back = removed - {r}
            if est(back) <= budget_ms and (qb := score(back)) <= q:
                removed, q, improved = back, qb, True
                frontier.append({"removed": sorted(removed), "est_ms": est(removed), "error": q, "action": f"+{r}"})
                break
        if improved:
            continue
        for r in sorted(removed):
            for n in savings:
                if n in removed or savings[n] <= 0:
                    continue
                cand = (removed - {r}) | {n}
                if est(cand) <= budget_ms and (qc := score(cand)) < q - 1e-9:
                    removed, q, improved = cand, qc, True
                    frontier.append({"removed": sorted(removed), "est_ms": est(removed), "error": q, "action": f"+{r} -{n}"})
                    break
            if improved:
                break
    return removed, frontier


def _choose(table: dict, score: Callable[[set[str]], float], unet, cfg: PruneConfig, measure: Measure | None,
            frontier: list[dict]) -> tuple[set[str], dict]:
    """The removal set: the greedy path's points near the budget are exported and timed for real (round robin
    with the original), the lowest-error one within the budget is kept, then refined by put-backs and swaps
    (table estimate, rescaled by what was measured), the refinement kept only if its own measurement holds."""
    budget = cfg.latency_budget
    base = table["base_ms"]
    path = greedy_path(table, score, floor_ms=0.5 * budget * base)
    frontier += path
    if len(path) == 1:
        raise UserError(f"no unit's removal measured faster on {table['runtime']} (latency table: every saving <= 0); "
                        "nothing to prune: measure the table again with more --runs, or use a --preset")
    if measure is None:
        within = [p for p in path if p["est_ms"] <= budget * base] or path[-1:]
        return set(within[0]["removed"]), {}
    near = [i for i, p in enumerate(path) if 0.6 * budget * base <= p["est_ms"] <= 1.5 * budget * base and i > 0]
    near = near or list(range(1, len(path)))
    picks = sorted({near[round(k * (len(near) - 1) / max(1, min(10, len(near)) - 1))] for k in range(min(10, len(near)))})
    for attempt in range(cfg.max_remeasure + 1):
        ms = measure(unet, {"full": [], **{f"p{i}": path[i]["removed"] for i in picks}})
        full = ms["full"]["median_ms"]
        for i in picks:
            path[i]["measured_ratio"] = ms[f"p{i}"]["median_ms"] / full
        ok = [i for i in picks if path[i]["measured_ratio"] <= budget]
        if ok or attempt == cfg.max_remeasure:
            break
        picks = list(range(max(picks) + 1, len(path)))[:10]  # every measured point missed: measure further along
        if not picks:
            break
    measured_pts = [i for i in range(len(path)) if "measured_ratio" in path[i]]
    chosen = min(ok, key=lambda i: path[i]["error"]) if ok else min(measured_pts, key=lambda i: path[i]["measured_ratio"])
    removed, ratio = set(path[chosen]["removed"]), path[chosen]["measured_ratio"]
    result = {"full_ms": full, "pruned_ms": ratio * full, "ratio": ratio, "met_budget": bool(ok),
              "points_measured": len(measured_pts)}
    if ok:  # refine: put units back / swap them while the (rescaled) estimate keeps the budget
        _, est = _estimate(table)
        scale = (1 - ratio) * base / max(1e-9, base - est(removed))
        refined, steps = search(table, score, budget * base, start=removed, scale=max(0.2, min(5.0, scale)))
        if refined != removed:
            frontier += steps[1:]
            ms = measure(unet, {"full": [], "refined": sorted(refined)})
            r2 = ms["refined"]["median_ms"] / ms["full"]["median_ms"]
            frontier[-1]["measured_ratio"] = r2
            if r2 <= budget:
                removed = refined
                result.update(full_ms=ms["full"]["median_ms"], pruned_ms=ms["refined"]["median_ms"], ratio=r2, refined=True)
    return removed, result


def _prune(model, cfg: PruneConfig, out: Path, table: dict | None, measure: Measure | None, progress: bool) -> artifact.Manifest:
    from pocketfusion.macs import unet_macs

    t0 = time.perf_counter()
    work = work_dir(out, cfg)
    _claim_work_dir(work, cfg)
    device = torch.device(cfg.device)
    source = artifact.source_ref(model.path)
    teacher = frozen(model.unet, device)
    data = _Data(model, cfg, work, device, source.sha256, progress)
    sampling_s = time.perf_counter() - t0
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    scorer = _Scorer(teacher, data, cfg, device)
    metrics: dict[str, Any] = {"training": {"teacher_pairs": len(data.pairs), "teacher_sampling_s": round(data.pairs.seconds, 2),
                                            "teacher_pairs_cached": data.pairs.cached, "device": cfg.device}}

    # 1. robust training: any subset of units may be dropped on a call
    gates = pruning.gate(student)
    robust_file = work / "robust.safetensors"
    if cfg.preset is None and cfg.robust_iterations > 0:
        t1 = time.perf_counter()
        if cfg.resume and robust_file.is_file():
            from safetensors.torch import load_file

            student.load_state_dict(load_file(str(robust_file)))
            metrics["training"]["robust"] = json.loads((work / "robust.json").read_text())
        else:
            loss = _kd_loss(student, teacher, data, cfg, gates=gates, drop_prob=cfg.drop_prob, weights=(cfg.task, cfg.output_kd, 0.0))
            res = _train({"unet": student}, loss, cfg, cfg.robust_iterations, work / "robust", "robust training", progress)
            gates.drop = []
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in student.state_dict().items()}, str(robust_file))
            metrics["training"]["robust"] = {"iterations": res.iterations, "train_s": round(time.perf_counter() - t1, 2),
                                             "first_loss": res.losses[0], "final_loss": res.losses[-1],
                                             "drop_prob": cfg.drop_prob}
            artifact.atomic_write_text(work / "robust.json", json.dumps(metrics["training"]["robust"]) + "\n")
    student.eval()
    gates.drop = []
    error_robust_full = scorer(student, gates, ())

    # 2. what to remove: a preset, or the search against the measured table, checked by a real measurement
    units_before = pruning.units(teacher)
    frontier: list[dict] = []
    measured: dict[str, Any] = {}
    chosen = work / "search.json"  # a resumed run keeps what the search chose (its measurements would differ)
    if cfg.preset is not None:
        removed = set(preset_units(teacher, cfg.preset))
    elif cfg.resume and chosen.is_file():
        saved = json.loads(chosen.read_text())
        removed, measured, frontier = set(saved["removed"]), saved["measured"], saved["frontier"]
    else:
        removed, measured = _choose(table, lambda r: scorer(student, gates, r), teacher, cfg, measure, frontier)
        artifact.atomic_write_text(chosen, json.dumps({"removed": sorted(removed), "measured": measured, "frontier": frontier}) + "\n")
    gates.drop = sorted(removed)
    error_pruned_robust = scorer(student, gates, removed)
    gates.ungate()
    if cfg.preset is not None:  # a preset starts from the original weights, as BK-SDM does
        student = copy.deepcopy(teacher).requires_grad_(True)
    pruning.remove(student, sorted(removed))
    error_before_kd = scorer(student)

    # 3. recovery: task + output KD + feature KD from the original
    t2 = time.perf_counter()
    if cfg.recovery_iterations > 0:
        student.train()
        loss = _kd_loss(student, teacher, data, cfg, weights=(cfg.task, cfg.output_kd, cfg.feature_kd))
        res = _train({"unet": student}, loss, cfg, cfg.recovery_iterations, work / "recovery", "KD recovery", progress)
        metrics["training"]["recovery"] = {"iterations": res.iterations, "train_s": round(time.perf_counter() - t2, 2),
                                           "resumed_from": res.resumed_from, "first_loss": res.losses[0],
                                           "final_loss": res.losses[-1],
                                           "weights": {"task": cfg.task, "output_kd": cfg.output_kd, "feature_kd": cfg.feature_kd}}
    student = student.cpu().eval().requires_grad_(False)
    error_after_kd = scorer(student.to(device))
    student = student.cpu()
    if measure is not None and not measured:
        ms = measure(teacher.cpu(), {"full": [], "pruned": sorted(removed)})
        measured = {"full_ms": ms["full"]["median_ms"], "pruned_ms": ms["pruned"]["median_ms"],
                    "ratio": ms["pruned"]["median_ms"] / ms["full"]["median_ms"], "attempts": 1}
    teacher = teacher.cpu()

    seq_len = data.cond.hidden.shape[1]
    params_before = sum(p.numel() for p in teacher.parameters())
    params_after = sum(p.numel() for p in student.parameters())
    macs_before, macs_after = unet_macs(teacher, seq_len=seq_len), unet_macs(student, seq_len=seq_len)
    metrics.update({
        "pruning": {
            "runtime": cfg.runtime, "preset": cfg.preset, "latency_budget": cfg.latency_budget,
            "removed": sorted(removed), "units": [u.__dict__ for u in units_before],
            "params": {"before": params_before, "after": params_after, "removed_fraction": 1 - params_after / params_before},
            "macs_per_call": {"before": macs_before, "after": macs_after, "removed_fraction": 1 - macs_after / macs_before},
            "latency": ({**measured, "measured_on": cfg.runtime, "speedup": 1 / measured["ratio"]} if measured else
                        {"estimated_ratio": None, "note": "not measured (no runtime measurement given)"}),
            "error_vs_teacher": {"robust_full": error_robust_full, "robust_pruned": error_pruned_robust,
                                 "before_recovery": error_before_kd, "after_recovery": error_after_kd,
                                 "metric": "mean squared difference of the CFG-guided U-Net prediction (scale 4) over the teacher's "
                                           f"mean square, {cfg.score_samples} noised teacher samples"},
            "frontier": frontier, "search_scores": scorer.calls,
        },
        "latency_table": table,
    })
    metrics["training"]["wall_s"] = round(time.perf_counter() - t0, 2)
    metrics["training"]["teacher_s"] = round(sampling_s, 2)
    manifest = _write(model, student, cfg, out, source=source, metrics=metrics, removed=sorted(removed))
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _claim_work_dir(work: Path, cfg: PruneConfig) -> None:
    from pocketfusion.compress.workdir import claim

    claim(work, {k: v for k, v in cfg.to_dict().items() if k not in _RESUME_FREE}, resume=cfg.resume, record="prune.json",
          fresh=("robust", "recovery", "robust.safetensors", "search.json"))


def _write(model, unet, cfg: PruneConfig, out: Path, *, source, metrics: dict, removed: list[str]) -> artifact.Manifest:
    from pocketfusion.checkpoint import sampler_of

    src = Path(model.path)
    index = json.loads((src / "model_index.json").read_text())
    with artifact.staged_dir(out) as tmp:
        artifact.copy_components(src, tmp, skip=("unet",))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        record = pruning.save(unet, tmp / "unet", removed=removed, source_config=dict(model.unet.config))
        metrics["pruning"]["plain_diffusers"] = record["plain_diffusers"]
        metrics["pruning"]["not_in_config"] = record["not_in_config"]
        notes = [f"pruned U-Net ({len(removed)} units removed, "
                 + (f"preset {cfg.preset}" if cfg.preset else f"searched for {cfg.latency_budget:.0%} of the latency on {cfg.runtime}")
                 + ")"]
        if record["plain_diffusers"]:
            notes.append("unet/config.json expresses every removal: plain diffusers loads this folder")
        else:
            notes.append(f"plain diffusers cannot load unet/: {len(record['not_in_config'])} removed unit(s) are beyond what a "
                         f"UNet2DConditionModel config expresses (listed in unet/{pruning.PRUNING_FILE}; a removed ResNet "
                         "block keeps only its skip path); pocketfusion loads it")
        comps = [artifact.Component(n, n, _FORMATS.get(n) or _FORMATS[n.rstrip("_0123456789")]) for n in model.components]
        return artifact.write_manifest(tmp, stage=STAGE, settings=cfg.to_dict(), source=source, components=comps,
                                       sampler=sampler_of(model), metrics=metrics, notes=notes)


def summary(manifest: artifact.Manifest) -> str:
    p, t = manifest.metrics["pruning"], manifest.metrics["training"]
    lat = p["latency"]
    lines = [f"  removed {len(p['removed'])} unit(s): {', '.join(p['removed'])}",
             f"  parameters {p['params']['before']:,} -> {p['params']['after']:,} (-{p['params']['removed_fraction']:.0%}); "
             f"MACs/call -{p['macs_per_call']['removed_fraction']:.0%}"]
    if "ratio" in lat:
        lines.append(f"  U-Net per call on {lat['measured_on']}: {lat['full_ms']:.3f} -> {lat['pruned_ms']:.3f} ms "
                     f"({lat['speedup']:.2f}x faster, measured interleaved)")
    e = p["error_vs_teacher"]
    lines.append(f"  error vs the original: {e['before_recovery']:.4f} before recovery, {e['after_recovery']:.4f} after")
    lines.append(f"  cost: {t['wall_s']:.0f} s wall; plain diffusers loads it: {'yes' if p['plain_diffusers'] else 'no'}")
    return "\n".join(lines)
