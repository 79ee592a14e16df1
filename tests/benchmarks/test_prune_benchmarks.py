"""The pruning benchmarks on the tiny fixture: the full-size script's table and KD parts run for real
(each in its own process), and the unit-alone table times every unit at its real shapes."""

from __future__ import annotations

import json
import subprocess
import sys


def test_prune_scale_table_and_kd_on_the_tiny_unet(tmp_path):
    out = tmp_path / "scale.json"
    p = subprocess.run([sys.executable, "benchmarks/prune_scale.py", "--size", "tiny", "--runs", "2", "--rounds", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    res = {r["part"]: r for r in json.loads(out.read_text())["results"]}
    table, kd = res["table"], res["kd"]
    assert table["units"] == len(table["table"]["units"]) > 10 and table["base_ms"] > 0 and table["units_total_ms"] > 0
    assert all(u["ms"] > 0 for u in table["table"]["units"].values())
    assert kd["seconds_per_iteration"] > 0 and kd["student_params"] < kd["teacher_params"] and len(kd["losses"]) == 2
