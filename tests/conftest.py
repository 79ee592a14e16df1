import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A complete tiny SD-1.5-family diffusers folder with random weights (built once per run)."""
    from pocketfusion.testing.fixtures import save_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny") / "sd15"
    save_tiny_pipeline(path, "sd15")
    return path


@pytest.fixture(scope="session")
def tiny_onnx_export(tiny_sd, tmp_path_factory):
    """The tiny pipeline exported to ONNX (all three components), once per run."""
    pytest.importorskip("onnxruntime")
    from pocketfusion.checkpoint import load_model
    from pocketfusion.export.api import export
    from pocketfusion.export.base import ExportConfig

    out = tmp_path_factory.mktemp("onnx") / "exp"
    export(load_model(tiny_sd), ExportConfig(targets=("onnx",)), out, progress=False)
    return out


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("torch_one_thread")``): on a shared
    2-core machine, two spinning OpenMP threads make tiny calls up to 100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
