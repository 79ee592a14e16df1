"""`bench --device android|qemu-arm64 --runner pf-run` (runtimes/devices/pfrun.py): the device copy of the aarch64
bundle (its own glibc), the adb command lines (argument lists, device side quoted), the real adb client's
no-device error; and the qemu-arm64 path for real: the self-contained copy under qemu-aarch64 on the mini export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pocketfusion.errors import UserError
from pocketfusion.runtimes.devices import adb, pfrun

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def fake_bundle(root: Path, arch: str = "aarch64") -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "lib").mkdir()
    (root / "bin" / "pf-run").write_bytes(b"\x7fELF")
    (root / "lib" / "libexecutorch.so").write_bytes(b"x")
    (root / "bundle.json").write_text(json.dumps({"schema": "pocketfusion.native-bundle", "arch": arch}))
    return root


def fake_sysroot(root: Path) -> Path:
    root.mkdir(parents=True)
    for n in pfrun.GLIBC_LIBS:
        (root / n).write_bytes(n.encode())
    return root


def test_runner_resolution(tmp_path, monkeypatch):
    b = fake_bundle(tmp_path / "b")
    assert pfrun.is_pfrun("pf-run") and pfrun.is_pfrun(b) and not pfrun.is_pfrun(tmp_path / "executor_runner")
    assert not pfrun.is_pfrun(None)
    assert pfrun.resolve_bundle(b) == b
    with pytest.raises(UserError, match="the bundle is for 'x86_64'"):
        pfrun.resolve_bundle(fake_bundle(tmp_path / "x", "x86_64"))
    # --runner pf-run: the cached bundle, reused as it is (no build when bundle.json is there)
    monkeypatch.setattr(pfrun, "default_bundle_dir", lambda: b)
    assert pfrun.resolve_bundle("pf-run") == b


def test_device_copy_carries_its_glibc(tmp_path):
    b = fake_bundle(tmp_path / "b")
    dev = pfrun.stage_device_bundle(b, tmp_path / "pf-run", fake_sysroot(tmp_path / "sysroot"))
    assert (dev / "bin" / "pf-run").is_file() and (dev / "lib" / "libexecutorch.so").is_file()
    assert all((dev / "lib" / n).is_file() for n in pfrun.GLIBC_LIBS)
    assert (dev / "lib" / pfrun.LOADER).stat().st_mode & 0o111
    with pytest.raises(UserError, match="aarch64 glibc runtime is not at"):
        pfrun.stage_device_bundle(b, tmp_path / "other", tmp_path / "nowhere")


def test_adb_command_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(adb.shutil, "which", lambda name: "/usr/bin/adb")
    export = tmp_path / "my export;reboot"
    export.mkdir()
    dev = fake_bundle(tmp_path / "pf-run")
    serial = "emulator-5554; rm -rf /"
    cmds = pfrun.push_cmds(dev, export, serial)
    assert all(c[:3] == ["/usr/bin/adb", "-s", serial] for c in cmds)
    assert cmds[0][3:] == ["shell", "rm", "-rf", adb.REMOTE_ROOT]
    assert ["push", str(dev), adb.REMOTE_ROOT] == cmds[2][3:] and ["push", str(export), adb.REMOTE_ROOT] == cmds[4][3:]
    args = pfrun.bench_args(runs=5, warmup=2, threads=4, steps=8, end_to_end=False)
    assert args == ["--runs", "5", "--warmup", "2", "--threads", "4", "--steps", "8", "--no-end-to-end"]
    run = pfrun.run_cmd(export, serial, args)
    assert run[:4] == ["/usr/bin/adb", "-s", serial, "shell"] and len(run) == 5
    script = run[4]
    root = pfrun.REMOTE_BUNDLE
    assert script.startswith(f"{root}/lib/ld-linux-aarch64.so.1 --library-path {root}/lib {root}/bin/pf-run bench ")
    assert f"'{adb.REMOTE_ROOT}/my export;reboot'" in script  # quoted on the device side
    assert f"--json {pfrun.REMOTE_JSON} --runs 5" in script and script.endswith("; echo POCKETFUSION_EXIT=$?")
    assert pfrun.pull_cmd(tmp_path / "b.json", None) == ["/usr/bin/adb", "pull", pfrun.REMOTE_JSON, str(tmp_path / "b.json")]
    assert pfrun.exit_status("x\nPOCKETFUSION_EXIT=2\n") == 2 and pfrun.exit_status("Segmentation fault") is None
    assert pfrun.last_line("error: bad\nPOCKETFUSION_EXIT=2") == "error: bad"


def test_results_are_labelled_with_the_device():
    res = {"schema": "pocketfusion.bench", "results": [{"component": "unet", "device": "executorch 1.5.1 (C++ pf-run)"}]}
    out = pfrun.label(res, "android emulator-5554", None)["results"][0]
    assert out["device"] == "android emulator-5554 (pf-run)" and out["runtime_detail"] == "executorch 1.5.1 (C++ pf-run)"
    with pytest.raises(UserError, match="no pocketfusion.bench results"):
        pfrun.label({"schema": "other"}, "x", None)


@pytest.mark.skipif(shutil.which("adb") is None, reason="Debian's adb client is not installed")
def test_real_adb_without_device_is_one_line_error(tmp_path, capsys):
    from pocketfusion.cli import main

    export = tmp_path / "e"
    export.mkdir()
    (export / "manifest.json").write_text("{}")
    b = fake_bundle(tmp_path / "b")
    with pytest.raises(UserError, match="no Android device attached"):
        pfrun.bench_android(b, export, serial=None, args=[])
    for runner in (str(b), "pf-run"):  # pf-run: the device is looked for before any bundle is built
        assert main(["bench", str(export), "--device", "android", "--runner", runner]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no Android device attached" in err[0]


def test_qemu_arm64_bench_with_pf_run(aarch64_bundle, mini_et_export, tmp_path, capsys):
    """The device copy (the bundle plus its own glibc, no -L sysroot) under qemu-aarch64: pf-run's bench schema read
    back, every component and end to end, labelled as emulated."""
    from pocketfusion.cli import main
    from pocketfusion.runtimes.bench import SCHEMA

    bundle, _ = aarch64_bundle
    out = tmp_path / "bench.json"
    rc = main(["bench", str(mini_et_export), "--device", "qemu-arm64", "--runner", str(bundle), "--runs", "2", "--warmup", "0",
               "--threads", "1", "--steps", "2", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["schema"] == SCHEMA and res["device"] == "qemu-arm64"
    by = {r["component"]: r for r in res["results"]}
    assert set(by) == {"text_encoder", "unet", "vae_decoder", "end_to_end"}
    for r in by.values():
        assert r["device"] == "qemu-user arm64 (pf-run)" and r["runner"] == "pf-run" and "emulated" in r["timing_label"]
        assert r["latency_ms"]["runs"] == 2 and r["peak_rss_mib"] > 0
    assert by["end_to_end"]["steps"] == 2
    assert any("emulated" in n for n in res["notes"])
