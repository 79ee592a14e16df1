"""``pocketfusion app build native``: the native runner ``pf-run`` (``apps/native``, C++17 on ExecuTorch's C++
runtime) built with CMake into a runnable bundle::

    DIR/bin/pf-run            RUNPATH $ORIGIN/../lib
    DIR/lib/libexecutorch*.so the executorch wheel's prebuilt runtime, kernels, XNNPACK delegate, thread pool
    DIR/bundle.json           arch, ExecuTorch version, compiler, CMake, file sizes

``x86_64`` (on an x86-64 host) links the installed ``executorch`` wheel; ``aarch64`` cross-compiles with Debian's
``g++-aarch64-linux-gnu`` against the manylinux aarch64 wheel of the same version (``--executorch DIR``, or fetched
once with ``pip download`` into ``~/.cache/pocketfusion/``). The bundle runs on an aarch64 Linux host as it is, and
here under ``qemu-aarch64 -L /usr/aarch64-linux-gnu`` (``qemu_command``). A missing CMake >= 3.28 (the wheel's
imported targets need it: ``pip install cmake``) or compiler is one ``error:`` line, exit 2.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from pocketfusion.errors import UserError

ARCHES = ("x86_64", "aarch64")
CMAKE_MIN = (3, 28)
AARCH64_PLATFORM = "manylinux_2_28_aarch64"  # the tag PyPI's executorch aarch64 wheels carry
QEMU_SYSROOT = "/usr/aarch64-linux-gnu"  # Debian's cross libc / libstdc++ for the aarch64 toolchain
COMPILERS = {"x86_64": ("c++", "g++", "clang++"), "aarch64": ("aarch64-linux-gnu-g++",)}


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def source_dir() -> Path:
    """``apps/native`` of this source checkout (the C++ sources are not part of the installed package)."""
    src = Path(__file__).resolve().parent.parent / "apps" / "native"
    if not (src / "CMakeLists.txt").is_file():
        raise UserError(f"the native runner's sources are not at {src} (build it from a pocketfusion source checkout)")
    return src


def find_cmake() -> tuple[str, tuple[int, ...]]:
    """A CMake >= 3.28: the interpreter's environment first (PyPI's ``cmake``), then PATH."""
    found = []
    for cand in (Path(sys.executable).parent / "cmake", shutil.which("cmake")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            p = subprocess.run([str(cand), "--version"], capture_output=True, text=True)
            m = re.search(r"version (\d+)\.(\d+)", p.stdout)
            if m:
                version = (int(m.group(1)), int(m.group(2)))
                if version >= CMAKE_MIN:
                    return str(cand), version
                found.append(f"{cand} is {version[0]}.{version[1]}")
    why = "; ".join(found) or "none found"
    raise UserError(f"the native build needs CMake >= {CMAKE_MIN[0]}.{CMAKE_MIN[1]} (the executorch wheel's imported targets): {why}; "
                    "install it with: pip install 'cmake>=3.28'")


def find_compiler(arch: str) -> str:
    for name in COMPILERS["x86_64"] if arch == host_arch() else COMPILERS[arch]:  # native: the host's c++
        path = shutil.which(name)
        if path:
            return path
    hint = "apt-get install g++-aarch64-linux-gnu" if arch == "aarch64" else "apt-get install g++"
    raise UserError(f"no C++ compiler for {arch} ({', '.join(COMPILERS[arch])} not on PATH); install one: {hint}")


def executorch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("executorch").split("+")[0]
    except PackageNotFoundError:
        raise UserError("the native build links the executorch wheel's libraries: pip install -e '.[executorch]'") from None


def installed_executorch() -> Path:
    """The installed wheel's ``executorch`` package folder (holds ``include/``, ``lib/``, ``share/cmake``)."""
    import importlib.util

    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the native build links the executorch wheel's libraries: pip install -e '.[executorch]'")
    root = Path(list(spec.submodule_search_locations)[0])
    if not (root / "lib" / "libexecutorch.so").is_file():
        raise UserError(f"{root} holds no lib/libexecutorch.so (this executorch wheel ships no C++ runtime)")
    return root


def cache_dir() -> Path:
    return Path(os.environ.get("POCKETFUSION_CACHE", Path.home() / ".cache" / "pocketfusion"))


def aarch64_executorch(version: str | None = None) -> Path:
    """The aarch64 wheel's ``executorch`` folder (include/, lib/, share/), fetched once with pip into the cache."""
    version = version or executorch_version()
    root = cache_dir() / f"executorch-{version}-aarch64"
    pkg = root / "executorch"
    if (pkg / "lib" / "libexecutorch.so").is_file():
        return pkg
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = f"executorch-{version}-*{AARCH64_PLATFORM}.whl"
    if not list(wheels.glob(pattern)):
        py = f"{sys.version_info.major}{sys.version_info.minor}"
        cmd = [sys.executable, "-m", "pip", "download", "-q", f"executorch=={version}", "--platform", AARCH64_PLATFORM,
               "--python-version", py, "--implementation", "cp", "--only-binary=:all:", "--no-deps", "-d", str(wheels)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0 or not list(wheels.glob(pattern)):
            last = (p.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise UserError(f"fetching the aarch64 executorch {version} wheel failed ({last}); pass --executorch DIR")
    wheel = sorted(wheels.glob(pattern))[-1]
    tmp = root.with_name(root.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp, [n for n in z.namelist() if n.startswith(("executorch/include/", "executorch/lib/", "executorch/share/"))])
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return pkg


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
        raise UserError(f"{what} failed (exit {p.returncode}):\n{tail}")


def build_native(out: str | Path, *, arch: str | None = None, executorch: str | Path | None = None, jobs: int = 1,
                 build_dir: str | Path | None = None) -> dict:
    """Configure, build and install ``pf-run`` for ``arch`` into the bundle folder ``out`` (written atomically).

    Returns the bundle's ``bundle.json`` (arch, ExecuTorch version, compiler, CMake, sizes in bytes).

    Raises:
        UserError: an unknown arch, CMake < 3.28, no compiler for the arch, no executorch package, or a failed build.
    """
    from pocketfusion import artifact

    arch = arch or host_arch()
    if arch not in ARCHES:
        raise UserError(f"unknown arch {arch!r}; choose {' or '.join(ARCHES)}")
    cmake, cmake_version = find_cmake()
    compiler = find_compiler(arch)
    src = source_dir()
    cross = arch != host_arch()
    if cross and arch != "aarch64":
        raise UserError(f"cross-compiling for {arch} from {host_arch()} is not supported (aarch64 only)")
    if executorch is not None:
        et_root = Path(executorch)
        if (et_root / "executorch" / "lib").is_dir():
            et_root = et_root / "executorch"
        if not (et_root / "lib" / "libexecutorch.so").is_file():
            raise UserError(f"--executorch {executorch}: no lib/libexecutorch.so there (give a wheel's executorch/ folder)")
    else:
        et_root = aarch64_executorch() if cross else installed_executorch()
    out = Path(out)
    build = Path(build_dir) if build_dir else out.parent / f".{out.name}.build-{arch}"
    cfg = [cmake, "-S", str(src), "-B", str(build), f"-DEXECUTORCH_ROOT={et_root}", "-DCMAKE_BUILD_TYPE=Release"]
    if cross:
        cfg.append(f"-DCMAKE_TOOLCHAIN_FILE={src / 'cmake' / 'aarch64-linux-gnu.cmake'}")
    else:
        cfg.append(f"-DCMAKE_CXX_COMPILER={compiler}")
    _run(cfg, "cmake configure")
    _run([cmake, "--build", str(build), "-j", str(max(1, jobs))], "cmake build")
    with artifact.staged_dir(out) as tmp:
        _run([cmake, "--install", str(build), "--prefix", str(tmp)], "cmake install")
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        info = {
            "schema": "pocketfusion.native-bundle", "arch": arch, "runner": "bin/pf-run",
            "executorch": executorch_version() if executorch is None else str(et_root), "executorch_root": str(et_root),
            "compiler": compiler, "cmake": ".".join(map(str, cmake_version)), "files": files, "size_bytes": sum(files.values()),
            "run": (f"qemu-aarch64 -L {QEMU_SYSROOT} bin/pf-run ..." if cross else "bin/pf-run ..."),
        }
        (tmp / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")
    if build_dir is None:
        shutil.rmtree(build, ignore_errors=True)
    return info


def find_qemu() -> str | None:
    return shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")


def qemu_command(bundle: str | Path) -> list[str]:
    """The command prefix that runs an aarch64 bundle's ``pf-run`` on this host (qemu-user with the cross sysroot)."""
    qemu = find_qemu()
    if qemu is None:
        raise UserError("no qemu-aarch64 on PATH (apt-get install qemu-user-static)")
    return [qemu, "-L", QEMU_SYSROOT, str(Path(bundle) / "bin" / "pf-run")]


# ------------------------------------------------------------------------------------------------ apps/web

ORT_WEB_VERSION = "1.30.0"
# what the page loads from onnxruntime-web's dist/: the wasm-only ES module and its single-threaded-capable runtime
ORT_WEB_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
WEB_FILES = ("index.html", "pf.js")


def web_source_dir() -> Path:
    src = Path(__file__).resolve().parent.parent / "apps" / "web"
    if not (src / "index.html").is_file():
        raise UserError(f"the web page's sources are not at {src} (build it from a pocketfusion source checkout)")
    return src


def ort_web_dist(version: str = ORT_WEB_VERSION, package: str | Path | None = None) -> Path:
    """onnxruntime-web's ``dist/``: from ``package`` (an unpacked npm package or its dist/), or fetched once with
    ``npm pack onnxruntime-web@VERSION`` into ``~/.cache/pocketfusion/onnxruntime-web-VERSION``."""
    if package is not None:
        p = Path(package)
        dist = p / "dist" if (p / "dist").is_dir() else p
        missing = [f for f in ORT_WEB_FILES if not (dist / f).is_file()]
        if missing:
            raise UserError(f"--ort-web {package}: no {', '.join(missing)} there (give onnxruntime-web's package or dist/ folder)")
        return dist
    root = cache_dir() / f"onnxruntime-web-{version}"
    dist = root / "package" / "dist"
    if all((dist / f).is_file() for f in ORT_WEB_FILES):
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise UserError("the web page vendors onnxruntime-web from npm, and npm is not installed (apt-get install npm; "
                        "or pass --ort-web DIR with an unpacked onnxruntime-web package)")
    tmp = root.with_name(root.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    p = subprocess.run([npm, "pack", f"onnxruntime-web@{version}", "--silent"], capture_output=True, text=True, cwd=tmp)
    tgz = sorted(tmp.glob("onnxruntime-web-*.tgz"))
    if p.returncode != 0 or not tgz:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"npm pack onnxruntime-web@{version} failed: {(p.stderr.strip().splitlines() or ['no package'])[-1]}")
    import tarfile

    with tarfile.open(tgz[0]) as t:
        t.extractall(tmp, members=[m for m in t.getmembers() if m.name in {f"package/dist/{f}" for f in ORT_WEB_FILES}
                                   or m.name in ("package/package.json", "package/LICENSE")], filter="data")
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return dist


def build_web(out: str | Path, *, export: str | Path | None = None, ort_web: str | Path | None = None) -> dict:
    """The static page in ``out``: ``index.html``, ``pf.js``, ``vendor/`` (onnxruntime-web's wasm build: nothing is
    fetched from a CDN at run time) and, with ``export``, ``export/`` (the export's manifest, tokenizer, scheduler and
    ONNX networks). Serve ``out`` with any static server (``python -m http.server -d OUT``)."""
    from pocketfusion import artifact

    src = web_source_dir()
    dist = ort_web_dist(package=ort_web)
    manifest = None
    if export is not None:
        manifest = artifact.load_manifest(export)
        comps = [c for c in manifest.components if c.target == "onnx"]
        names = {c.name for c in comps}
        if not {"text_encoder", "unet", "vae_decoder"} <= names or manifest.sampler is None:
            raise UserError(f"{export} has no ONNX text_encoder, unet and vae_decoder with a sampler "
                            f"(pocketfusion export MODEL --target onnx); ONNX components there: {', '.join(sorted(names)) or 'none'}")
    out = Path(out)
    with artifact.staged_dir(out) as tmp:
        for f in WEB_FILES:
            shutil.copy2(src / f, tmp / f)
        (tmp / "vendor").mkdir()
        for f in ORT_WEB_FILES:
            shutil.copy2(dist / f, tmp / "vendor" / f)
        if (dist.parent / "LICENSE").is_file():
            shutil.copy2(dist.parent / "LICENSE", tmp / "vendor" / "LICENSE.onnxruntime-web")
        if manifest is not None:
            ex = Path(export)
            dst = tmp / "export"
            dst.mkdir()
            shutil.copy2(ex / artifact.MANIFEST, dst / artifact.MANIFEST)
            for folder in {manifest.sampler.tokenizer or "tokenizer", manifest.sampler.scheduler or "scheduler"}:
                shutil.copytree(artifact.resolve_path(ex, folder), dst / folder)
            for c in comps:
                path = artifact.resolve_path(ex, c.path)
                (dst / c.path).parent.mkdir(parents=True, exist_ok=True)
                for f in path.parent.glob(path.name + "*"):  # the graph and any external-data file beside it
                    shutil.copy2(f, (dst / c.path).parent / f.name)
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        info = {"schema": "pocketfusion.web-bundle", "onnxruntime_web": ORT_WEB_VERSION if ort_web is None else str(dist),
                "export": str(Path(export).resolve()) if export is not None else None, "files": files,
                "size_bytes": sum(files.values()), "serve": f"python -m http.server -d {out} 8000"}
        (tmp / "web-bundle.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
