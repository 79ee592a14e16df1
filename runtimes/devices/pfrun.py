"""``pf-run`` (apps/native, ExecuTorch's C++ runtime) as the device runner of ``bench --device android|qemu-arm64``.

    pocketfusion bench EXPORT_DIR --device android[:SERIAL] --runner pf-run      # or --runner BUNDLE_DIR
    pocketfusion bench EXPORT_DIR --device qemu-arm64 --runner pf-run

``--runner pf-run`` uses the aarch64 bundle of ``pocketfusion app build native --arch aarch64`` (built once into
``~/.cache/pocketfusion/pf-run-aarch64`` when absent); ``--runner DIR`` takes a bundle folder built that way
(``DIR/bundle.json`` says ``arch: aarch64``).

The bundle links glibc (it is built against the manylinux wheel of ExecuTorch), and Android's libc is bionic, so the
device copy carries its own glibc: the cross toolchain's loader, libc, libm, libdl, libpthread, libgcc_s and libstdc++
(``/usr/aarch64-linux-gnu/lib``) go into its ``lib/`` and the runner is started through that loader::

    ROOT/lib/ld-linux-aarch64.so.1 --library-path ROOT/lib ROOT/bin/pf-run bench EXPORT --json OUT --runs N ...

so nothing of the device's own libraries is used. The same self-contained layout runs here under ``qemu-aarch64``
(without ``-L``: the bundle's loader and libraries, not the host's sysroot), which is how ``--device qemu-arm64``
measures it, and how the Android command line is tested without a phone.

On Android the device copy and the export directory are pushed to ``/data/local/tmp/pocketfusion``, ``pf-run bench``
writes its ``pocketfusion.bench`` JSON there, ``adb pull`` reads it back, and the folder is removed. Every host command
is an argument list; the device-side command line is quoted piece by piece (``shlex.quote``).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from pocketfusion.errors import UserError
from pocketfusion.runtimes.devices import adb

NAME = "pf-run"
SYSROOT_LIB = Path("/usr/aarch64-linux-gnu/lib")
LOADER = "ld-linux-aarch64.so.1"
# glibc and the GCC runtime the bundle's binaries need (readelf -d: NEEDED), from the cross toolchain's sysroot
GLIBC_LIBS = (LOADER, "libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "libgcc_s.so.1", "libstdc++.so.6")
REMOTE_BUNDLE = f"{adb.REMOTE_ROOT}/pf-run"
REMOTE_JSON = f"{adb.REMOTE_ROOT}/bench.json"


def is_pfrun(runner: Path | str | None) -> bool:
    """``--runner pf-run`` or a folder holding a pf-run bundle."""
    if runner is None:
        return False
    p = Path(runner)
    return str(runner) == NAME or (p.is_dir() and (p / "bundle.json").is_file())


def default_bundle_dir() -> Path:
    from pocketfusion import app_build

    return app_build.cache_dir() / "pf-run-aarch64"


def resolve_bundle(runner: Path | str) -> Path:
    """The aarch64 bundle folder for ``runner``: a given folder, or (``pf-run``) the cached one, built when absent."""
    if str(runner) == NAME:
        bundle = default_bundle_dir()
        if not (bundle / "bundle.json").is_file():
            from pocketfusion import app_build

            app_build.build_native(bundle, arch="aarch64", jobs=1)
    else:
        bundle = Path(runner)
    info_path = bundle / "bundle.json"
    if not info_path.is_file():
        raise UserError(f"--runner {runner}: {bundle} holds no pf-run bundle (pocketfusion app build native --arch aarch64 -o DIR)")
    info = json.loads(info_path.read_text())
    if info.get("schema") != "pocketfusion.native-bundle" or info.get("arch") != "aarch64":
        raise UserError(f"--runner {runner}: the bundle is for {info.get('arch')!r}; devices need the aarch64 one "
                        "(pocketfusion app build native --arch aarch64 -o DIR)")
    if not (bundle / "bin" / "pf-run").is_file():
        raise UserError(f"--runner {runner}: {bundle}/bin/pf-run is missing")
    return bundle


def stage_device_bundle(bundle: Path, dest: Path, sysroot_lib: Path = SYSROOT_LIB) -> Path:
    """Copy ``bundle`` to ``dest`` with the glibc runtime it needs, so it runs where the libc is not glibc."""
    missing = [n for n in GLIBC_LIBS if not (sysroot_lib / n).exists()]
    if missing:
        raise UserError(f"the aarch64 glibc runtime is not at {sysroot_lib} (missing {', '.join(missing)}; "
                        "apt-get install g++-aarch64-linux-gnu)")
    shutil.copytree(bundle, dest, dirs_exist_ok=True)
    for n in GLIBC_LIBS:
        shutil.copy2(sysroot_lib / n, dest / "lib" / n, follow_symlinks=True)
    (dest / "lib" / LOADER).chmod(0o755)
    (dest / "bin" / "pf-run").chmod(0o755)
    return dest


def bench_args(*, runs: int, warmup: int, threads: int | None, steps: int | None, end_to_end: bool) -> list[str]:
    args = ["--runs", str(runs), "--warmup", str(warmup)]
    if threads:
        args += ["--threads", str(threads)]
    if steps:
        args += ["--steps", str(steps)]
    if not end_to_end:
        args.append("--no-end-to-end")
    return args


def device_argv(root: str, export: str, json_out: str, args: list[str]) -> list[str]:
    """pf-run's command line on the target, started through the bundle's own glibc loader."""
    return [f"{root}/lib/{LOADER}", "--library-path", f"{root}/lib", f"{root}/bin/pf-run", "bench", export, "--json", json_out, *args]


# ---------------------------------------------------------------------------------------------------- android


def push_cmds(local_bundle: Path, export_dir: Path, serial: str | None) -> list[list[str]]:
    """Stage the device copy of the bundle and the export directory under ``REMOTE_ROOT``."""
    base = adb.adb_base(serial)
    if local_bundle.name != "pf-run":
        raise ValueError("the staged bundle folder must be named pf-run")
    return [
        base + ["shell", "rm", "-rf", adb.REMOTE_ROOT],
        base + ["shell", "mkdir", "-p", adb.REMOTE_ROOT],
        # into an existing folder, "adb push DIR REMOTE" makes REMOTE/<DIR's name>: the staged copy is named pf-run
        base + ["push", str(local_bundle), adb.REMOTE_ROOT],
        base + ["shell", "chmod", "755", f"{REMOTE_BUNDLE}/bin/pf-run", f"{REMOTE_BUNDLE}/lib/{LOADER}"],
        base + ["push", str(export_dir.resolve()), adb.REMOTE_ROOT],
    ]


def run_cmd(export_dir: Path, serial: str | None, args: list[str]) -> list[str]:
    """Host command that runs ``pf-run bench`` on the device and prints its exit status."""
    argv = device_argv(REMOTE_BUNDLE, f"{adb.REMOTE_ROOT}/{export_dir.resolve().name}", REMOTE_JSON, args)
    script = " ".join(shlex.quote(a) for a in argv) + "; echo POCKETFUSION_EXIT=$?"
    return adb.adb_base(serial) + ["shell", script]


def pull_cmd(local_json: Path, serial: str | None) -> list[str]:
    return adb.adb_base(serial) + ["pull", REMOTE_JSON, str(local_json)]


def exit_status(text: str) -> int | None:
    for line in reversed(text.splitlines()):
        if line.startswith("POCKETFUSION_EXIT="):
            return int(line.split("=", 1)[1])
    return None


def attached_device(serial: str | None) -> str:
    """The serial to use; UserError when no device (or not ``serial``) is attached."""
    attached = adb.devices()
    if not attached:
        raise UserError("no Android device attached ('adb devices' lists none); connect one with USB debugging enabled")
    if serial and serial not in attached:
        raise UserError(f"device {serial} is not attached (attached: {', '.join(attached)})")
    return serial or attached[0]


def bench_android(bundle: Path, export_dir: Path, *, serial: str | None, args: list[str]) -> dict:
    """Push, run, pull, clean up; returns pf-run's ``pocketfusion.bench`` results. UserError without a device."""
    device = attached_device(serial)
    with tempfile.TemporaryDirectory(prefix="pf-run-device-") as tmp:
        local = stage_device_bundle(bundle, Path(tmp) / "pf-run")
        try:
            for cmd in push_cmds(local, export_dir, serial):
                subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
            out = subprocess.run(run_cmd(export_dir, serial, args), capture_output=True, text=True, timeout=7200)
            text = out.stdout + out.stderr
            if exit_status(text) != 0:
                raise UserError(f"pf-run bench failed on the device: {last_line(text)}")
            subprocess.run(pull_cmd(Path(tmp) / "bench.json", serial), check=True, capture_output=True, text=True, timeout=300)
            res = json.loads((Path(tmp) / "bench.json").read_text())
        finally:
            subprocess.run(adb.adb_base(serial) + ["shell", "rm", "-rf", adb.REMOTE_ROOT], capture_output=True, text=True, timeout=60)
    return label(res, f"android {device}", None)


# ---------------------------------------------------------------------------------------------------- qemu-user


def qemu_argv(local_bundle: Path, export_dir: Path, json_out: Path, args: list[str]) -> list[str]:
    from pocketfusion import app_build

    qemu = app_build.find_qemu()
    if qemu is None:
        raise UserError("no qemu-aarch64 on PATH (apt-get install qemu-user-static)")
    return [qemu, *device_argv(str(local_bundle), str(export_dir), str(json_out), args)]


def bench_qemu(bundle: Path, export_dir: Path, *, args: list[str]) -> dict:
    """The device copy (its own glibc) under qemu-aarch64 on this host; pf-run's results, labelled as emulated."""
    with tempfile.TemporaryDirectory(prefix="pf-run-qemu-") as tmp:
        local = stage_device_bundle(bundle, Path(tmp) / "pf-run")
        out = Path(tmp) / "bench.json"
        p = subprocess.run(qemu_argv(local, export_dir.resolve(), out, args), capture_output=True, text=True, timeout=7200)
        if p.returncode != 0 or not out.is_file():
            raise UserError(f"pf-run bench under qemu-aarch64 failed (exit {p.returncode}): {last_line(p.stdout + p.stderr)}")
        res = json.loads(out.read_text())
    return label(res, "qemu-user arm64", "emulated (qemu-user), not a device timing")


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if not ln.startswith("POCKETFUSION_EXIT=")]
    return lines[-1] if lines else "(no output)"


def label(res: dict, device: str, timing_label: str | None) -> dict:
    """pf-run's results with the device named: ``device`` the target, ``runtime_detail`` what pf-run reported."""
    if res.get("schema") != "pocketfusion.bench":
        raise UserError(f"pf-run wrote no pocketfusion.bench results (schema {res.get('schema')!r})")
    for r in res.get("results", []):
        r["runtime_detail"] = r.get("device")
        r["device"] = f"{device} (pf-run)"
        if timing_label:
            r["timing_label"] = timing_label
    return res
