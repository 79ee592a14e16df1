"""U-Net pruning: units and their removal (exact skip paths), what a diffusers config can express and what
loads only through pocketfusion, the measured latency table on onnxruntime, the search, the prune stage on
the tiny SD-1.5 fixture (table, real latency measurement, KD recovery, export with parity) and the CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from pocketfusion import pruning
from pocketfusion.errors import UserError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    from pocketfusion.testing.fixtures import TINY_CONFIGS

    torch.manual_seed(0)  # SD-1.5's layout, two ResNet + attention pairs per down stage as at full size
    return UNet2DConditionModel(**dict(TINY_CONFIGS["sd15"], layers_per_block=2)).eval()


def _inputs(unet, seed=0):
    from pocketfusion.testing.fixtures import example_inputs

    args, kw = example_inputs(unet, batch=2, seed=seed)
    return args, kw


def test_units_cover_every_block_in_forward_order(unet):
    names = [u.name for u in pruning.units(unet)]
    assert names[0] == "down_blocks.0.resnets.0" and names[-1].startswith("up_blocks.3.")
    assert "mid_block" in names and "mid_block.attentions.0" in names
    kinds = {u.kind for u in pruning.units(unet)}
    assert kinds == {"resnet", "attention", "mid"}
    n_res = sum(len(b.resnets) for b in [*unet.down_blocks, *unet.up_blocks]) + len(unet.mid_block.resnets)
    assert sum(u.kind == "resnet" for u in pruning.units(unet)) == n_res


def test_gates_off_is_the_model_and_gate_drop_equals_removal(unet):
    args, kw = _inputs(unet)
    model = copy.deepcopy(unet)
    with torch.no_grad():
        ref = model(*args, **kw).sample
        gates = pruning.gate(model)
        assert torch.equal(model(*args, **kw).sample, ref)
        drop = ["down_blocks.1.attentions.0", "up_blocks.2.resnets.1", "mid_block", "down_blocks.3.resnets.0"]
        gates.drop = drop
        gated = model(*args, **kw).sample
        gates.ungate()
        assert torch.equal(model(*args, **kw).sample, ref)
        removed = copy.deepcopy(unet)
        pruning.remove(removed, drop)
        assert torch.allclose(removed(*args, **kw).sample, gated, atol=1e-6)
        assert not torch.allclose(gated, ref, atol=1e-3)  # something was removed


def test_removed_resnet_keeps_exactly_its_skip_path():
    from diffusers.models.resnet import ResnetBlock2D

    block = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=4, groups=4).eval()
    stand_in = pruning.RemovedResnet(block)
    x, temb = torch.randn(1, 8, 4, 4), torch.randn(1, 4)
    with torch.no_grad():
        torch.nn.init.zeros_(block.conv2.weight)
        torch.nn.init.zeros_(block.conv2.bias)  # the residual branch now adds nothing
        assert torch.allclose(block(x, temb), stand_in(x, temb), atol=1e-6)


def test_whole_block_attention_and_mid_block_load_in_plain_diffusers(unet, tmp_path):
    from diffusers import UNet2DConditionModel

    removed = ["down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "mid_block"]
    model = copy.deepcopy(unet)
    pruning.remove(model, removed)
    record = pruning.save(model, tmp_path / "unet", removed=removed, source_config=dict(unet.config))
    assert record["plain_diffusers"] and not (tmp_path / "unet" / pruning.PRUNING_FILE).exists()
    cfg = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert cfg["down_block_types"][0] == "DownBlock2D" and cfg["mid_block_type"] is None
    plain = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"))
    args, kw = _inputs(unet)
    with torch.no_grad():
        assert torch.allclose(plain(*args, **kw).sample, model(*args, **kw).sample, atol=1e-6)


def test_other_removals_load_through_pocketfusion_only(unet, tmp_path):
    from pocketfusion.checkpoint import load_component

    removed = ["up_blocks.1.resnets.0", "down_blocks.1.attentions.0"]  # one of two attentions: no config says that
    model = copy.deepcopy(unet)
    pruning.remove(model, removed)
    record = pruning.save(model, tmp_path / "unet", removed=removed, source_config=dict(unet.config))
    assert not record["plain_diffusers"] and set(record["not_in_config"]) == set(removed)
    loaded = load_component(tmp_path / "unet")
    args, kw = _inputs(unet)
    with torch.no_grad():
        assert torch.equal(loaded(*args, **kw).sample, model(*args, **kw).sample)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in unet.parameters())


def test_unknown_unit_is_a_user_error(unet):
    with pytest.raises(UserError, match="unknown U-Net unit"):
        pruning.remove(copy.deepcopy(unet), ["down_blocks.9.resnets.0"])


def test_search_meets_the_budget_at_least_error_per_ms_and_puts_back():
    from pocketfusion.compress.prune import search
    from pocketfusion.compress.prune.stage import greedy_path

    table = {"base_ms": 10.0, "units": {"a": {"saving_ms": 4.0}, "b": {"saving_ms": 3.0}, "c": {"saving_ms": 1.0},
                                         "d": {"saving_ms": 0.0}}}
    cost = {"a": 0.4, "b": 0.03, "c": 0.02, "d": 0.0}  # error added by each unit's removal

    def score(r):
        return sum(cost[n] for n in r)

    removed, frontier = search(table, score, budget_ms=6.5)
    assert removed == {"b", "c"}  # b (0.01/ms) and c (0.02/ms) before a (0.1/ms); d saves nothing
    assert frontier[-1]["est_ms"] <= 6.5
    path = greedy_path(table, score, floor_ms=0.0)
    assert [p["action"] for p in path] == ["start", "-b", "-c", "-a"]
    # a budget the cheap units cannot reach takes a; then c goes back (the budget still holds without it)
    removed, frontier = search(table, score, budget_ms=3.5)
    assert removed == {"a", "b"} and frontier[-1]["action"] == "+c"


def test_unit_table_on_onnxruntime(unet):
    pytest.importorskip("onnxruntime")
    from pocketfusion.export.latency import unit_table

    units = ["mid_block", "up_blocks.1.attentions.0"]
    table = unit_table(unet, "onnxruntime", seq_len=16, units=units, runs=3, rounds=2)
    assert table["runtime"] == "onnxruntime" and table["base_ms"] > 0 and set(table["units"]) == set(units)
    for u in table["units"].values():
        assert u["ms"] > 0 and abs(table["base_ms"] - u["ms"] - u["saving_ms"]) < 1e-9


FAST = dict(n_pairs=8, teacher_steps=5, teacher_batch=8, batch_size=4, score_samples=8, robust_iterations=2,
            recovery_iterations=2, bench_runs=2, bench_rounds=1, checkpoint_every=0)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from pocketfusion.testing.fixtures import save_tiny_pipeline

    path = tmp_path_factory.mktemp("prune-src") / "sd15"
    save_tiny_pipeline(path, "sd15")
    (path.parent / "prompts.txt").write_text("a red circle on a blue background\na small green square\n")
    return path


def test_prune_stage_search_measured_recovered_exported(pipeline, tmp_path):
    pytest.importorskip("onnxruntime")
    from pocketfusion import artifact
    from pocketfusion.checkpoint import load_model
    from pocketfusion.compress.prune import PruneConfig, prune
    from pocketfusion.export import ExportConfig, export
    from pocketfusion.export.latency import measure_variants, unit_table_alone

    model = load_model(pipeline)
    units = ["mid_block", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "down_blocks.2.resnets.0"]

    def measure(unet, variants):
        return measure_variants(unet, variants, "onnxruntime", seq_len=16, runs=5, rounds=3)

    # each unit timed alone: a removal's saving on this 1.5 ms U-Net is within the host's noise (a CI run once
    # measured every removal slower), a unit's own time is not
    table = unit_table_alone(model.unet, "onnxruntime", seq_len=16, units=units, runs=5, rounds=3)
    table["base_ms"] = measure(model.unet, {"full": []})["full"]["median_ms"]
    print(json.dumps(table["units"]))
    assert set(table["units"]) == set(units) and all(u["saving_ms"] > 0 for u in table["units"].values())
    cfg = PruneConfig(prompts=str(pipeline.parent / "prompts.txt"), latency_budget=0.97, **FAST)

    out = tmp_path / "pruned"
    manifest = prune(model, cfg, out, table=table, measure=measure, progress=False)
    p = manifest.metrics["pruning"]
    assert manifest.stage == "prune" and p["removed"] and set(p["removed"]) <= set(units)
    assert p["latency"]["measured_on"] == "onnxruntime" and p["latency"]["pruned_ms"] > 0
    assert any("measured_ratio" in f for f in p["frontier"])
    assert p["params"]["after"] < p["params"]["before"]
    assert manifest.metrics["training"]["recovery"]["iterations"] == 2
    assert not (out.parent / ".pruned.prune-work").exists()  # the work directory is gone once written
    pruned = load_model(out)
    assert artifact.load_manifest(out).sampler.guidance == "cfg"
    exp = export(pruned, ExportConfig(targets=("onnx",)), tmp_path / "export", progress=False)
    parity = exp.metrics["components"]
    assert all(v.get("parity", {}).get("rel_max", 0) < 1e-4 for v in parity.values() if isinstance(v, dict))


def test_bk_sdm_presets_on_the_fixture(unet):
    from pocketfusion.compress.prune import preset_units

    base, small, tiny = (preset_units(unet, p) for p in ("bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny"))
    assert base == ["mid_block"]
    assert set(base) < set(small) < set(tiny)
    assert "down_blocks.0.resnets.1" in small and "down_blocks.0.attentions.1" in small and "up_blocks.1.resnets.1" in small
    assert "down_blocks.3.resnets.0" in tiny and "up_blocks.0.resnets.0" in tiny


def test_cli_bad_input_is_one_line_exit_2(pipeline, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "pocketfusion", "prune", str(pipeline), *args, "-o", str(tmp_path / "o")],
                              capture_output=True, text=True, timeout=120)

    cases = ((["--latency-budget", "1.5"], "latency_budget"), (["--latency-table", str(tmp_path / "nope.json")], "is not a file"),
             (["--device", "android"], "latency table"), (["--prompts", str(tmp_path / "none.txt")], "not a file"))
    for args, needle in cases:
        p = run(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error:") and needle in p.stderr, p.stderr
    assert not (tmp_path / "o").exists()


def test_prune_then_distill_from_the_unpruned_teacher(pipeline, tmp_path):
    """(prune ->) distill: the student starts from the pruned U-Net, the original makes the targets, and the
    manifest names that teacher (``checkpoint.find_teacher``, what ``run`` compares speed against)."""
    import shutil

    from pocketfusion import artifact
    from pocketfusion.checkpoint import find_teacher, load_model
    from pocketfusion.compress.distill import DistillConfig, distill

    pruned = tmp_path / "pruned"
    shutil.copytree(pipeline, pruned)
    unet = load_model(pipeline).unet
    shutil.rmtree(pruned / "unet")
    removed = ["mid_block", "up_blocks.1.resnets.0"]
    pruning.remove(unet, removed)
    pruning.save(unet, pruned / "unet", removed=removed, source_config=dict(load_model(pipeline).unet.config))
    cfg = DistillConfig(steps=2, teacher=str(pipeline), prompts=str(pipeline.parent / "prompts.txt"), n_pairs=4, teacher_steps=4,
                        teacher_batch=4, batch_size=2, w_embedding_dim=16, iterations=2, checkpoint_every=0)
    manifest = distill(load_model(pruned), cfg, tmp_path / "student", progress=False)
    assert manifest.metrics["training"]["teacher"]["sha256"] == artifact.content_hash(pipeline)
    student = load_model(tmp_path / "student")
    assert student.unet.mid_block is None and find_teacher(student).resolve() == pipeline.resolve()
    other = tmp_path / "other"
    shutil.copytree(pipeline, other)
    te = load_model(other).components["text_encoder"]
    with torch.no_grad():
        next(te.parameters()).add_(1.0)
    te.save_pretrained(str(other / "text_encoder"), safe_serialization=True)
    with pytest.raises(UserError, match="text encoder differs"):
        distill(load_model(pruned), DistillConfig(**{**cfg.to_dict(), "teacher": str(other)}), tmp_path / "s2", progress=False)
