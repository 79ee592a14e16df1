import json
import shutil
import subprocess
import sys

import pytest

from pocketfusion import artifact
from pocketfusion.errors import UserError
from pocketfusion.runtimes.bench import BenchConfig, bench, format_table
from pocketfusion.runtimes.devices import adb
from pocketfusion.runtimes.devices.profiles import PROFILES, roofline_ms


@pytest.fixture(scope="module")
def results(tiny_onnx_export):
    return bench([tiny_onnx_export], BenchConfig(runs=5, warmup=1, steps=3, threads=1), progress=False)


def test_results_schema(results, tiny_onnx_export):
    assert results["schema"] == "pocketfusion.bench" and results["schema_version"] == 1
    assert results["artifacts"][0]["manifest_sha256"] == artifact.sha256_file(tiny_onnx_export / "manifest.json")
    assert {"machine", "processor", "cpus", "os", "python", "peak_gflops_fp32"} <= set(results["host"])
    assert results["host"]["peak_gflops_fp32"] > 0.1
    assert "onnxruntime" in results["versions"] and results["settings"]["threads"] == 1
    comps = {r["component"] for r in results["results"]}
    assert comps == {"text_encoder", "unet", "vae_decoder", "end_to_end"}
    for r in results["results"]:
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["max"]
        assert len(r["latencies_ms"]) == lat["runs"]
        assert r["peak_rss_mib"] > r["rss_growth_mib"] > 0  # measured in a child process
        assert "onnxruntime" in r["device"] and r["load_ms"] > 0
    unet = next(r for r in results["results"] if r["component"] == "unet")
    assert unet["macs"] > 0 and unet["roofline_fraction"] > 0
    for r in results["results"]:  # every entry with MACs has a roofline: a fraction <= 1 and its bound
        if r["component"] == "end_to_end":
            continue
        assert 0 < r["roofline_fraction"] <= 1 and r["roofline_bound"] in ("compute", "bandwidth")
        roof = r["roofline"]
        assert roof["attainable_gflops"] >= r["gflops"] > 0 and roof["precision"] == "fp32"
        assert roof["attainable_gflops"] == pytest.approx(r["gflops"] / r["roofline_fraction"])
        if not roof["probe_exceeded"]:
            assert roof["attainable_gflops"] == pytest.approx(min(roof["compute_gflops"], roof["bandwidth_gflops"]))
    e2e = next(r for r in results["results"] if r["component"] == "end_to_end")
    assert e2e["latency_ms"]["median"] > unet["latency_ms"]["min"] * 3  # >= 3 steps of the U-Net
    est = [e for e in results["estimates"] if e["component"] == "unet"]
    assert len(est) == 4 and all(e["label"] == "estimate" and e["estimate_ms"] > 0 for e in est)
    table = format_table(results)
    assert "end_to_end" in table and "peak" in table and "roofline onnxruntime" in table and "(compute)" in table + "(bandwidth)"
    json.dumps(results)  # serialisable


def test_roofline_probes(results):
    """The probes of the runtime's own kernels: positive GFLOP/s per kind and precision, positive GB/s."""
    roof = results["host"]["roofline"]
    assert roof["bandwidth"]["copy_gbs"] > 0 and roof["bandwidth"]["triad_gbs"] > 0
    ort = roof["runtimes"]["onnxruntime"]
    assert "error" not in ort and ort["bandwidth"]["gbs"] > 0 and "onnxruntime" in ort["device"]
    unet = ort["shapes"][f"{results['artifacts'][0]['label']}/unet"]
    for kind in ("gemm", "conv"):
        assert unet[kind]["fp32"]["gflops"] > 0 and unet[kind]["int8"]["gflops"] > 0 and unet[kind]["macs"] > 0
    assert "MatMulInteger" in unet["gemm"]["int8"]["path"]


def test_probe_cache_round_trip(results, tmp_path):
    from pocketfusion.runtimes import roofline

    path = tmp_path / "roofline-probes.json"
    roofline.save_cache(path)
    saved = dict(roofline._CACHE)
    roofline._CACHE.clear()
    try:
        assert roofline.load_cache(path) > 0 and roofline.load_cache(tmp_path / "missing.json") == 0
        assert set(roofline._CACHE) == {k for k in saved if k[0] != "numpy_bandwidth"}
    finally:
        roofline._CACHE.update(saved)


def test_roofline_never_above_one():
    from pocketfusion.runtimes.roofline import entry_roofline

    probes = {"shapes": {"a/unet": {"gemm": {"fp32": {"gflops": 10.0}, "int8": {"gflops": 40.0}}, "conv": {"fp32": {"gflops": 20.0}}}}}
    macs = {"total": 3_000_000, "conv": 2_000_000, "linear": 1_000_000, "attention": 0}
    kw = dict(macs=macs, activation_bytes=1000, weight_bytes=9000, probes=probes, shapes_key="a/unet")
    r = entry_roofline(gflops=5.0, bandwidth_gbs=100.0, precision="fp32", **kw)
    # 2 M conv MACs at 20, 1 M linear MACs at 10 GFLOP/s: 15 GFLOP/s; 100 GB/s x 600 FLOP/byte far above
    assert r["compute_gflops"] == pytest.approx(6e6 / (4e6 / 20 + 2e6 / 10)) and r["bound"] == "compute"
    assert r["fraction"] == pytest.approx(5.0 / 15.0) and not r["probe_exceeded"]
    assert entry_roofline(gflops=5.0, bandwidth_gbs=100.0, precision="int8", **kw)["compute_gflops"] == pytest.approx(
        6e6 / (4e6 / 20 + 2e6 / 40))  # quantized: the faster of the fp32 and int8 kernels
    r = entry_roofline(gflops=5.0, bandwidth_gbs=0.01, precision="fp32", **kw)  # 0.01 GB/s x 600 = 6 GFLOP/s
    assert r["bound"] == "bandwidth" and r["attainable_gflops"] == pytest.approx(6.0) and r["arithmetic_intensity"] == 600
    r = entry_roofline(gflops=50.0, bandwidth_gbs=100.0, precision="fp32", **kw)  # above its probe: never > 100 %
    assert r["fraction"] == 1.0 and r["probe_exceeded"] and "not this runtime's peak" in r["note"]
    assert entry_roofline(gflops=5.0, bandwidth_gbs=1.0, precision="fp32", **{**kw, "probes": {"shapes": {}}}) is None


def test_compare_mode_interleaves_and_reports_ratios(tiny_onnx_export, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(tiny_onnx_export, other)
    res = bench([tiny_onnx_export, other], BenchConfig(runs=4, warmup=1, rounds=2, end_to_end=False), progress=False)
    labels = [a["label"] for a in res["artifacts"]]
    assert len(set(labels)) == 2
    ratios = res["ratios"][labels[1]]
    assert set(ratios) == {"onnxruntime/text_encoder", "onnxruntime/unet", "onnxruntime/vae_decoder"}
    assert all(v > 0 for v in ratios.values())
    assert all(r["latency_ms"]["runs"] == 4 for r in res["results"])  # 2 rounds x 2 runs


def test_report_html(results, tmp_path):
    from pocketfusion.runtimes.report import write_report

    pytest.importorskip("matplotlib")
    res_path = tmp_path / "r.json"
    res_path.write_text(json.dumps(results))
    out = tmp_path / "report.html"
    write_report([res_path], out)
    text = out.read_text()
    assert text.count("data:image/png;base64,") >= 2 and "<table>" in text and "end_to_end" in text
    assert "Roofline" in text and "roofline onnxruntime" in text and ("(compute)" in text or "(bandwidth)" in text)
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "other"}')
    with pytest.raises(UserError, match="not a pocketfusion bench result"):
        write_report([bad], out)


def test_bench_rejects_non_export(tiny_sd):
    with pytest.raises(UserError):
        bench([tiny_sd], BenchConfig())


def test_cli_bench_bad_dir():
    r = subprocess.run([sys.executable, "-m", "pocketfusion.cli", "bench", "/no/such/dir"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: artifact directory /no/such/dir does not exist"


def test_roofline_by_hand():
    p = PROFILES["iphone-15-pro"]
    est = roofline_ms(macs=402_000_000_000, weight_bytes=1_720_000_000, profile=p, efficiency=0.25)
    assert est["compute_ms"] == pytest.approx(2 * 402e9 / (35e12 * 0.25) * 1e3)  # 91.9 ms
    assert est["memory_ms"] == pytest.approx(1.72e9 / 51.2e9 * 1e3)  # 33.6 ms
    assert est["bound"] == "compute" and est["label"] == "estimate" and "Apple" in est["source"]


# ---- adb -------------------------------------------------------------------------------------

def _files(tmp_path, *names):
    out = []
    for n in names:
        (tmp_path / n).write_bytes(b"x")
        out.append(tmp_path / n)
    return out


@pytest.fixture()
def job(tmp_path, monkeypatch):
    monkeypatch.setattr(adb.shutil, "which", lambda name: "/usr/bin/adb")
    pte, runner = _files(tmp_path, "unet.pte", "executor_runner")
    return adb.AdbJob(artifact=pte, runner=runner, serial="emulator-5554; rm -rf /", runs=5, warmup=2, threads=4)


def test_adb_commands_are_argument_lists(job):
    cmds = adb.push_cmds(job)
    assert cmds[0] == ["/usr/bin/adb", "-s", "emulator-5554; rm -rf /", "shell", "mkdir", "-p", adb.REMOTE_ROOT]
    assert cmds[1][-2:] == [str(job.runner), f"{adb.REMOTE_ROOT}/executor_runner"]
    assert cmds[3][-2:] == [str(job.artifact), f"{adb.REMOTE_ROOT}/unet.pte"]
    run = adb.run_cmd(job)
    assert run[:4] == ["/usr/bin/adb", "-s", "emulator-5554; rm -rf /", "shell"]
    assert len(run) == 5 and "--num_executions=7" in run[4] and "VmHWM" in run[4]
    assert adb.cleanup_cmd(job)[-3:] == ["rm", "-rf", adb.REMOTE_ROOT]


def test_adb_device_side_quoting(tmp_path, monkeypatch):
    monkeypatch.setattr(adb.shutil, "which", lambda name: "/usr/bin/adb")
    model, runner = _files(tmp_path, "my model;reboot.tflite", "benchmark_model")
    j = adb.AdbJob(artifact=model, runner=runner)
    script = adb.run_cmd(j)[-1]
    assert "'--graph=/data/local/tmp/pocketfusion/my model;reboot.tflite'" in script


def test_adb_runner_mismatch(tmp_path):
    pte, runner = _files(tmp_path, "m.pte", "benchmark_model")
    with pytest.raises(UserError, match="executor_runner runs .pte"):
        adb.AdbJob(artifact=pte, runner=runner)


def test_adb_output_parsing():
    tfl = (
        "Inference timings in us: Init: 12000, First inference: 9000, Warmup (avg): 8000, Inference (avg): 7500.5"
        "\nPOCKETFUSION_VMHWM_KB=20480"
    )
    assert adb.parse_output("benchmark_model", tfl) == {"peak_rss_mib": 20.0, "latency_ms_avg": 7.5005, "load_ms": 12.0}
    et = "I 00:00:01 executor_runner.cpp:200] Model executed successfully 7 time(s) in 70.0 ms.\nPOCKETFUSION_VMHWM_KB=1024"
    assert adb.parse_output("executor_runner", et) == {"peak_rss_mib": 1.0, "latency_ms_avg": 10.0}
    with pytest.raises(UserError, match="could not read a latency"):
        adb.parse_output("executor_runner", "Segmentation fault")


@pytest.mark.skipif(shutil.which("adb") is None, reason="Debian's adb client is not installed")
def test_real_adb_without_device_is_one_line_error(tmp_path):
    pte, runner = _files(tmp_path, "unet.pte", "executor_runner")
    with pytest.raises(UserError, match="no Android device attached"):
        adb.bench_on_device(adb.AdbJob(artifact=pte, runner=runner))


def test_pipeline_onnxruntime_sessions_do_not_spin_and_leave_other_sessions_alone(tiny_onnx_export):
    """The runtime pipeline's sessions take turns on the cores: their idle workers must not spin against each
    other; and nothing process-wide is set, so a plain onnxruntime session (its quantization tools make them)
    still loads after them."""
    import onnxruntime as ort

    from pocketfusion.runtimes.pipeline import RuntimePipeline

    pipe = RuntimePipeline(tiny_onnx_export, "onnxruntime")
    for s in pipe.sessions.values():
        assert s._s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    plain = ort.InferenceSession(str(next(tiny_onnx_export.rglob("unet.onnx"))), providers=["CPUExecutionProvider"])
    assert plain.get_inputs()


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["executorch", "litert"])
def test_roofline_probe_xnnpack_runtimes(runtime):
    """ExecuTorch (qd8 through the exporter's W8 grid) and LiteRT (dynamic-range) probes: slow lowering on 2 cores."""
    from pocketfusion import backends
    from pocketfusion.export.roofline import probe

    target = backends.for_runtime(runtime).target
    if not (backends.installed(target) and backends.installed(target, runtime=True)):
        pytest.skip(f"{runtime} not installed")
    res = probe(runtime, {"c": {"gemm": {"m": 32, "k": 32, "n": 64},
                                "conv": {"batch": 1, "in_channels": 8, "out_channels": 8, "height": 16, "width": 16}}}, threads=1)
    for kind in ("gemm", "conv"):
        assert res["shapes"]["c"][kind]["fp32"]["gflops"] > 0 and res["shapes"]["c"][kind]["int8"]["gflops"] > 0, res
    assert res["bandwidth"]["gbs"] > 0


def test_student_steps_apply_to_distilled_students_only(tiny_onnx_export, tmp_path):
    """``--student-steps``: a student (sampler guidance "embedded") is timed end to end at that step count, a CFG
    teacher in the same run at its own; bad values are one-line errors."""
    from pocketfusion.errors import UserError
    from pocketfusion.runtimes.bench import BenchConfig, _jobs

    student = tmp_path / "student"
    shutil.copytree(tiny_onnx_export, student)
    m = json.loads((student / "manifest.json").read_text())
    m["sampler"].update(guidance="embedded", default_steps=4)
    (student / "manifest.json").write_text(json.dumps(m))
    cfg = BenchConfig(runtimes=("onnxruntime",), student_steps=1)
    e2e = {str(r): next(j for j in _jobs(r, cfg) if j["component"] == "end_to_end") for r in (tiny_onnx_export, student)}
    assert e2e[str(student)]["steps"] == 1 and e2e[str(student)]["guidance_mode"] == "embedded"
    teacher_steps = json.loads((tiny_onnx_export / "manifest.json").read_text())["sampler"]["default_steps"]
    assert e2e[str(tiny_onnx_export)]["steps"] == teacher_steps != 1
    with pytest.raises(UserError, match="--student-steps"):
        BenchConfig(student_steps=0)
