import shutil
from pathlib import Path

import pytest

from pocketfusion.runtimes.devices import qemu


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("debootstrap") is None or shutil.which("qemu-aarch64-static") is None,
                    reason="needs Debian's debootstrap and qemu-user-static")
def test_onnx_and_litert_components_run_on_emulated_arm64(tiny_onnx_export, tmp_path_factory):
    """Debootstraps an arm64 userland (~3 min, network to Debian's mirror) and runs the U-Net there."""
    root = qemu.prepare_rootfs(Path(tmp_path_factory.mktemp("arm64")) / "rootfs", ("onnxruntime",))
    r = qemu.run_component(root, tiny_onnx_export, "unet", "onnxruntime", runs=2)
    assert r["machine"] == "aarch64"
    assert r["rel_err"] < 1e-4
    assert "emulated" in r["timing_label"] and r["peak_rss_mib"] > 0


def test_cpuinfo_written(tmp_path):
    qemu._write_cpuinfo(tmp_path)
    text = (tmp_path / "proc" / "cpuinfo").read_text()
    assert text.count("processor") == 2 and "CPU implementer\t: 0x41" in text
