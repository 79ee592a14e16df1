"""Fixtures of the native-runner tests: the pf-run bundle, built once per session (skipped, with the reason, where
CMake >= 3.28 or a C++ compiler is missing). The mini pipelines and their exports are in ``tests/conftest.py``."""

from __future__ import annotations

import pytest


def _bundle(tmp_path_factory, arch: str):
    from pocketfusion import app_build
    from pocketfusion.errors import UserError

    try:
        app_build.find_cmake()
        app_build.find_compiler(arch)
        if arch == "aarch64" and app_build.host_arch() != "aarch64" and app_build.find_qemu() is None:
            pytest.skip("no qemu-aarch64 (apt-get install qemu-user-static)")
        et = app_build.installed_executorch() if arch == app_build.host_arch() else app_build.aarch64_executorch()
    except UserError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp(f"bundle-{arch}") / "pf"
    app_build.build_native(out, arch=arch, executorch=et if arch != app_build.host_arch() else None, jobs=1)
    return out


@pytest.fixture(scope="session")
def native_bundle(tmp_path_factory):
    """``pocketfusion app build native`` for this host, once per session."""
    from pocketfusion import app_build

    return _bundle(tmp_path_factory, app_build.host_arch())


@pytest.fixture(scope="session")
def aarch64_bundle(tmp_path_factory):
    """The aarch64 bundle (cross-compiled), with the command prefix that runs it here (qemu-user)."""
    from pocketfusion import app_build

    out = _bundle(tmp_path_factory, "aarch64")
    prefix = [str(out / "bin" / "pf-run")] if app_build.host_arch() == "aarch64" else app_build.qemu_command(out)
    return out, prefix
