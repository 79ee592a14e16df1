"""The distillation benchmarks run: the full-size scale benchmark's code path at the fixture's size, and
the method comparison's HTML page from measured figures."""

from __future__ import annotations

import json
import subprocess
import sys


def test_distill_scale_runs_both_methods_through_the_real_loop(tmp_path):
    out = tmp_path / "scale.json"
    p = subprocess.run([sys.executable, "-m", "pocketfusion.benchmarks.distill_scale", "--size", "tiny", "--iterations", "2",
                        "--json", str(out)], capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                                                                                               **__import__("os").environ})
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())["results"]
    assert [r["method"] for r in res] == ["regression", "lcm"]
    for r in res:
        assert r["seconds_per_iteration"] > 0 and r["peak_rss_gib"] > 0 and len(r["losses"]) == 2
        assert r["gradient_checkpointing"] and r["params"] > 0
    assert res[1]["state_by_count_bytes"]["ema_target"] > 0 == res[0]["state_by_count_bytes"]["ema_target"]


def test_distill_comparison_page_plots_accuracy_against_steps():
    from pocketfusion.benchmarks.distill import render

    def ev(acc, fd):
        return {"per_attribute": {"shape": acc, "color": 1.0}, "all_correct": acc, "frechet": fd, "diversity": 0.5,
                "prompts": 240, "guidance": 4.0, "frechet_renders": 3.4}

    res = {"teacher": {"steps": 50, **ev(0.875, 39.2)},
           "students": {"regression": {"training": {"wall_s": 600, "device": "cpu", "iterations": 10, "batch_size": 4},
                                       "by_steps": {"1": ev(0.85, 40.0), "4": ev(0.86, 39.0)}}}}
    page = render(res)
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    assert page.count("<tr>") == 4 and "85.0%" in page and "10.0 min on cpu" in page
