"""Android over adb: push an artifact and a benchmark runner, run it, pull timings and peak memory.

The runner is the target's own benchmark binary, built for the phone's ABI (the pip wheels ship
none):

* ExecuTorch ``.pte`` — ``executor_runner`` built from ExecuTorch's sources with its Android
  CMake preset (``cmake --preset android-arm64-v8a`` then ``cmake --build``; see the ExecuTorch
  "Building from source" docs), or
* TFLite ``.tflite`` — LiteRT's ``benchmark_model`` (the prebuilt Android arm64 binary LiteRT
  publishes, or ``bazel build -c opt --config=android_arm64 //tflite/tools/benchmark:benchmark_model``).

Every command is an argument list handed to ``subprocess`` (never a shell string on the host);
the device-side command line is quoted with ``shlex.quote`` piece by piece. Peak memory is read
from the runner's ``/proc/<pid>/status`` VmHWM on the device, sampled by a small sh loop while it
runs.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pocketfusion.errors import UserError

logger = logging.getLogger(__name__)

REMOTE_ROOT = "/data/local/tmp/pocketfusion"
RUNNERS = ("executor_runner", "benchmark_model")


@dataclass(frozen=True)
class AdbJob:
    artifact: Path  # .pte or .tflite on the host
    runner: Path  # executor_runner or benchmark_model on the host, built for the device
    serial: str | None = None
    runs: int = 20
    warmup: int = 3
    threads: int = 4

    def __post_init__(self) -> None:
        if self.artifact.suffix not in (".pte", ".tflite"):
            raise UserError(f"adb bench takes a .pte or .tflite file, got {self.artifact.name}")
        if not self.artifact.is_file():
            raise UserError(f"artifact {self.artifact} does not exist")
        if not self.runner.is_file():
            raise UserError(
                f"runner {self.runner} does not exist "
                "(build executor_runner or benchmark_model for the device; see pocketfusion.runtimes.devices.adb)"
            )
        kind = runner_kind(self.runner)
        if (kind == "executor_runner") != (self.artifact.suffix == ".pte"):
            raise UserError(f"{self.runner.name} cannot run {self.artifact.name}: executor_runner runs .pte, benchmark_model runs .tflite")


def runner_kind(runner: Path) -> str:
    name = runner.name
    for k in RUNNERS:
        if name.startswith(k):
            return k
    raise UserError(f"unknown runner {name!r}; expected one of {', '.join(RUNNERS)}")


def adb_base(serial: str | None) -> list[str]:
    exe = shutil.which("adb")
    if exe is None:
        raise UserError("adb is not installed (Debian: apt-get install adb)")
    return [exe] + (["-s", serial] if serial else [])


def push_cmds(job: AdbJob) -> list[list[str]]:
    """The host commands that stage the runner and the artifact on the device."""
    base = adb_base(job.serial)
    remote_runner = f"{REMOTE_ROOT}/{job.runner.name}"
    return [
        base + ["shell", "mkdir", "-p", REMOTE_ROOT],
        base + ["push", str(job.runner), remote_runner],
        base + ["shell", "chmod", "755", remote_runner],
        base + ["push", str(job.artifact), f"{REMOTE_ROOT}/{job.artifact.name}"],
    ]


def runner_argv(job: AdbJob) -> list[str]:
    """The runner's own argument list on the device."""
    model = f"{REMOTE_ROOT}/{job.artifact.name}"
    runner = f"{REMOTE_ROOT}/{job.runner.name}"
    if runner_kind(job.runner) == "benchmark_model":
        return [runner, f"--graph={model}", f"--num_runs={job.runs}", f"--warmup_runs={job.warmup}",
                f"--num_threads={job.threads}", "--use_xnnpack=true"]
    return [runner, f"--model_path={model}", f"--num_executions={job.runs + job.warmup}", f"--cpu_threads={job.threads}"]


def run_cmd(job: AdbJob) -> list[str]:
    """Host command that runs the runner on the device, sampling its VmHWM while it runs."""
    inner = " ".join(shlex.quote(a) for a in runner_argv(job))
    # Start the runner, poll its status file for the high-water mark, print it when it exits.
    script = (f"{inner} & p=$!; h=0; while kill -0 $p 2>/dev/null; do "
              f"v=$(grep VmHWM /proc/$p/status 2>/dev/null | tr -s ' ' | cut -d' ' -f2); "
              f"[ -n \"$v\" ] && h=$v; sleep 0.05; done; wait $p; echo POCKETFUSION_VMHWM_KB=$h")
    return adb_base(job.serial) + ["shell", script]


def cleanup_cmd(job: AdbJob) -> list[str]:
    return adb_base(job.serial) + ["shell", "rm", "-rf", REMOTE_ROOT]


def devices() -> list[str]:
    """Serials of attached devices in the 'device' state."""
    out = subprocess.run(adb_base(None) + ["devices"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise UserError(f"adb devices failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    serials = []
    for line in out.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1] == "device":
            serials.append(parts[0])
    return serials


def parse_output(kind: str, text: str) -> dict:
    """Latency (ms) and peak memory (MiB) from a runner's output."""
    res: dict = {}
    m = re.search(r"POCKETFUSION_VMHWM_KB=(\d+)", text)
    if m and int(m.group(1)) > 0:
        res["peak_rss_mib"] = int(m.group(1)) / 1024
    if kind == "benchmark_model":
        # "Inference timings in us: Init: 1234, First inference: 567, Warmup (avg): 456, Inference (avg): 400"
        m = re.search(r"Inference \(avg\): ([\d.e+]+)", text)
        if m:
            res["latency_ms_avg"] = float(m.group(1)) / 1e3
        m = re.search(r"Init: ([\d.e+]+)", text)
        if m:
            res["load_ms"] = float(m.group(1)) / 1e3
    else:
        # executor_runner: "Model executed successfully N time(s) in X ms."
        m = re.search(r"executed successfully (\d+) time\(s\) in ([\d.]+) ms", text)
        if m:
            res["latency_ms_avg"] = float(m.group(2)) / int(m.group(1))
    if "latency_ms_avg" not in res:
        raise UserError(f"could not read a latency from {kind}'s output: {text.strip().splitlines()[-1] if text.strip() else '(empty)'}")
    return res


def bench_on_device(job: AdbJob) -> dict:
    """Stage, run, parse and clean up. Raises UserError when no device is attached."""
    attached = devices()
    if not attached:
        raise UserError("no Android device attached ('adb devices' lists none); connect one with USB debugging enabled")
    if job.serial and job.serial not in attached:
        raise UserError(f"device {job.serial} is not attached (attached: {', '.join(attached)})")
    try:
        for cmd in push_cmds(job):
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
        out = subprocess.run(run_cmd(job), capture_output=True, text=True, timeout=3600)
        res = parse_output(runner_kind(job.runner), out.stdout + out.stderr)
    finally:
        subprocess.run(cleanup_cmd(job), capture_output=True, text=True, timeout=60)
    res.update(device=f"android {job.serial or attached[0]}", runner=job.runner.name, artifact=job.artifact.name)
    return res
