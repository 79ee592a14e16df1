"""Every row of the comparison, in table order, and making them."""

from __future__ import annotations

from pocketfusion import backends
from pocketfusion.benchmarks.quant import peers_coreml, peers_onnx, peers_pytorch, peers_tflite, pocketfusion_rows
from pocketfusion.benchmarks.quant.measure import torch_runner
from pocketfusion.benchmarks.quant.rows import Planned, Row, planned
from pocketfusion.benchmarks.quant.targets import fp32_target_row

# The peer tools that quantize an exported file, by the target whose file they take.
FILE_PEERS = {"onnx": peers_onnx.rows, "tflite": peers_tflite.rows, "coreml": peers_coreml.rows}
BITS = (8, 4)


def fp32_torch_row(b) -> Planned:
    def make(r: Row):
        r.size_bytes, r.size_kind, r.fp32_bytes = b.fp32_state_bytes, "torch.save", b.fp32_state_bytes
        r.run, r.generate = torch_runner(b.unet), b.torch_generate(b.unet)

    return planned("fp32 PyTorch", "fp32", "pytorch", 32, {"fp32", "pytorch"}, make)


def plan(b) -> list[Planned]:
    """fp32 references (PyTorch, every target), then per bit width: pocketfusion and the peers in
    PyTorch, then per target of the backend registry pocketfusion's export and the peers on that file."""
    rows = [fp32_torch_row(b)] + [fp32_target_row(b, t) for t in backends.TARGETS]
    for bits in BITS:
        rows += pocketfusion_rows.pytorch_rows(b, bits)
        rows += peers_pytorch.rows(b, bits)
        for target in backends.TARGETS:
            rows.append(pocketfusion_rows.target_row(b, bits, target))
            if target in FILE_PEERS:
                rows += FILE_PEERS[target](b, bits)
    return rows


def make_rows(b, progress: bool) -> None:
    """Make and measure every row ``--skip`` leaves (in table order within each bit group)."""
    from tqdm import tqdm

    todo = [p for p in plan(b) if not p.tags & b.skip]
    with tqdm(total=len(todo), desc="rows", disable=not progress, unit="row") as bar:
        for p in todo:
            b.add(p, progress=bar)
            bar.update(1)
