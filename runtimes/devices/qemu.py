"""An ARM64 target that really runs: a Debian arm64 userland under qemu-user.

    rootfs = prepare_rootfs(Path("~/.cache/pocketfusion/arm64"))   # once: debootstrap + arm64 wheels
    result = run_component(rootfs, export_dir, "unet", "onnxruntime")

* ``debootstrap --foreign --arch=arm64`` unpacks a minimal Debian bookworm userland with Python
  (the first stage needs no emulation, so no binfmt_misc registration is needed);
* the runtimes' own **arm64 wheels** (onnxruntime, ai-edge-litert, numpy) are installed into it by
  the host's pip with ``--platform manylinux2014_aarch64 --only-binary=:all:``;
* the component runs under ``qemu-aarch64-static -L ROOTFS`` on the artifact's golden input; its
  output is compared with the host's PyTorch reference stored in the artifact.

Emulated timings are labelled as such: they measure the emulator, not a phone. The memory figure is
the emulated process's resident high-water mark (qemu included).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from pocketfusion.errors import UserError

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "python3.11", "libpython3.11-stdlib", "libstdc++6", "libgomp1")
WHEELS = {"onnxruntime": ["onnxruntime==1.32.0", "numpy==2.3.5"], "litert": ["ai-edge-litert==2.3.0", "numpy==2.3.5"]}
SITE = "/opt/pocketfusion/site"
_MARKER = ".pocketfusion-rootfs"

_RUNNER = r"""
import json, sys, time
sys.path.insert(0, "/opt/pocketfusion/site")
import numpy as np
job = json.load(open(sys.argv[1]))
feeds = {k: np.load(v) for k, v in job["feeds"].items()}
t0 = time.perf_counter()
if job["runtime"] == "onnxruntime":
    import onnxruntime as ort
    s = ort.InferenceSession(job["model"], providers=["CPUExecutionProvider"])
    run = lambda: s.run(None, feeds)[0]
else:
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=job["model"])
    r = it.get_signature_runner()
    names = job["tflite_inputs"]
    run = lambda: list(r(**{n: feeds[k] for n, k in names.items()}).values())[0]
load_ms = (time.perf_counter() - t0) * 1e3
out = run()
lat = []
for _ in range(job["runs"]):
    t = time.perf_counter(); run(); lat.append((time.perf_counter() - t) * 1e3)
np.save(job["out"], np.asarray(out))
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")]
import platform
print("RESULT " + json.dumps({"machine": platform.machine(), "load_ms": load_ms, "latencies_ms": lat,
      "peak_rss_mib": int(hwm[0].split()[1]) / 1024 if hwm else None}))
"""


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UserError(f"{name} is not installed (Debian: apt-get install {package})")
    return path


def prepare_rootfs(root: Path, runtimes: tuple[str, ...] = ("onnxruntime",)) -> Path:
    """Create (or reuse) an arm64 Debian userland at ``root`` with the runtimes' arm64 wheels."""
    import sys

    root = Path(root).expanduser()
    if not (root / _MARKER).is_file():
        debootstrap = _tool("debootstrap", "debootstrap")
        tmp = root.with_name(root.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        cmd = [debootstrap, "--foreign", "--arch=arm64", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(tmp), MIRROR]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise UserError(f"debootstrap failed: {(p.stderr or p.stdout).strip().splitlines()[-1]}")
        # The first stage unpacks only the essential set; the rest waits for a second stage that needs
        # arm64 execution (binfmt_misc). Unpacking the remaining debs with the host's dpkg-deb gives
        # the same files without running maintainer scripts, which a Python runtime does not need.
        dpkg_deb = _tool("dpkg-deb", "dpkg")
        for deb in sorted((tmp / "var" / "cache" / "apt" / "archives").glob("*.deb")):
            subprocess.run([dpkg_deb, "-x", str(deb), str(tmp)], check=True, capture_output=True)
        _write_cpuinfo(tmp)
        (tmp / _MARKER).write_text(json.dumps({"suite": SUITE, "packages": PACKAGES}))
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    site = root / SITE.lstrip("/")
    for rt in runtimes:
        stamp = site / f".installed-{rt}"
        if stamp.is_file():
            continue
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:", "--platform", "manylinux2014_aarch64",
               "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_27_aarch64", "--python-version", "3.11",
               "--implementation", "cp", "--target", str(site), "--upgrade"] + WHEELS[rt] + _deps(rt)
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise UserError(f"installing arm64 wheels for {rt} failed: {p.stderr.strip().splitlines()[-1]}")
        stamp.write_text("ok")
    return root


def _write_cpuinfo(root: Path) -> None:
    """An arm64 ``/proc/cpuinfo`` inside the rootfs (qemu -L looks there first).

    qemu-user 7.2 passes the host's x86 /proc/cpuinfo through; the runtimes' CPU detection
    (pytorch/cpuinfo, in onnxruntime and LiteRT) then crashes on load. This file describes the
    CPU qemu emulates (an Armv8.2 core with the features of ``-cpu max`` that XNNPACK probes).
    """
    entry = ("processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp "
             "cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\n"
             "CPU part\t: 0xd0c\nCPU revision\t: 1\n")
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc" / "cpuinfo").write_text("\n".join(entry.format(i=i) for i in range(2)))


def _deps(rt: str) -> list[str]:
    # Runtime dependencies the wheels import at load time (no resolver across platforms: pinned here).
    if rt == "onnxruntime":
        return ["flatbuffers", "packaging", "protobuf", "sympy", "mpmath", "coloredlogs", "humanfriendly"]
    return ["flatbuffers", "typing-extensions"]


def run_component(root: Path, export_dir: Path, component: str, runtime: str = "onnxruntime", runs: int = 3) -> dict:
    """Run one exported component inside the arm64 userland; compare with the host reference."""
    from pocketfusion import artifact

    qemu = _tool("qemu-aarch64-static", "qemu-user-static")
    root = Path(root).expanduser()
    if not (root / _MARKER).is_file():
        raise UserError(f"{root} is not a prepared arm64 rootfs (run prepare_rootfs first)")
    m = artifact.load_manifest(export_dir)
    target = {"onnxruntime": "onnx", "litert": "tflite"}[runtime]
    entry = m.find(component, target)
    if entry is None:
        raise UserError(f"{export_dir} has no {target} export of {component}")
    job_dir = root / "opt" / "pocketfusion" / "job"
    shutil.rmtree(job_dir, ignore_errors=True)
    job_dir.mkdir(parents=True)
    src = artifact.resolve_path(export_dir, entry.path)
    for f in src.parent.glob(src.name + "*"):
        shutil.copy2(f, job_dir / f.name)
    inputs, outputs = artifact.read_golden(artifact.resolve_path(export_dir, entry.golden))
    feeds = {}
    for name, v in inputs.items():
        np.save(job_dir / f"{name}.npy", v)
        feeds[name] = f"/opt/pocketfusion/job/{name}.npy"
    ref = next(iter(outputs.values()))
    job = {"runtime": runtime, "model": f"/opt/pocketfusion/job/{src.name}", "feeds": feeds, "runs": runs,
           "out": "/opt/pocketfusion/job/out.npy"}
    if runtime == "litert":
        io = json.loads((src.parent / (src.name + ".io.json")).read_text())
        job["tflite_inputs"] = {tfl: ours for ours, tfl in io.get("input_map", {n: n for n in io["inputs"]}).items()}
    (job_dir / "job.json").write_text(json.dumps(job))
    (job_dir / "out.npy").touch()  # qemu -L maps only paths that already exist in the rootfs
    (job_dir / "runner.py").write_text(_RUNNER)
    python = "/usr/bin/python3.11"
    t0 = time.perf_counter()
    p = subprocess.run([qemu, "-L", str(root), str(root) + python, "/opt/pocketfusion/job/runner.py", "/opt/pocketfusion/job/job.json"],
                       capture_output=True, text=True, env={"PYTHONHOME": str(root / "usr"), "PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    wall = time.perf_counter() - t0
    res = None
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
    if p.returncode != 0 or res is None:
        raise UserError(f"arm64 run failed: {(p.stderr.strip().splitlines() or ['no output'])[-1]}")
    out = np.load(job_dir / "out.npy").reshape(ref.shape)
    err = float(np.abs(out.astype(np.float64) - ref).max())
    res.update(component=component, runtime=runtime, wall_seconds=wall, max_abs_err_vs_host_torch=err,
               rel_max=err / max(float(np.abs(ref).max()), 1e-12), timing_label="emulated (qemu-user), not a device timing",
               latency_ms_median=float(np.median(res["latencies_ms"])))
    return res
