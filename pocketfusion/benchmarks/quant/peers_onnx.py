"""Peers on pocketfusion's fp32 ONNX U-Net: onnxruntime ``quantize_dynamic`` and ``MatMulNBitsQuantizer``."""

from __future__ import annotations

from pathlib import Path

from pocketfusion.benchmarks.quant.measure import quiet
from pocketfusion.benchmarks.quant.rows import Planned, Row, planned
from pocketfusion.benchmarks.quant.targets import artifact_peer

QUANTIZED_OPS = ("MatMulNBits", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "DequantizeLinear")


def peer_ort_dynamic(onnx_path: Path, out: Path, *, per_channel: bool) -> Path:
    """onnxruntime ``quantize_dynamic`` int8 (after ``quant_pre_process``, as its docs say)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + ".pre.onnx")
    with quiet():
        quant_pre_process(str(onnx_path), str(pre))
        quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
    pre.unlink()
    return out


def peer_ort_nbits(onnx_path: Path, out: Path, *, block_size: int = 32) -> Path:
    """onnxruntime ``MatMulNBitsQuantizer`` 4-bit (symmetric, block 32): MatMul nodes only."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + ".pre.onnx")
    with quiet():
        quant_pre_process(str(onnx_path), str(pre))
        q = MatMulNBitsQuantizer(onnx.load(str(pre)), block_size=block_size, is_symmetric=True)
        q.process()
        q.model.save_model_to_file(str(out), False)
    pre.unlink()
    return out


def onnx_op_counts(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def note_ops(r: Row, path: Path) -> None:
    """Record the file's op counts (JSON) and its quantized ops (a note)."""
    ops = onnx_op_counts(path)
    r.extra["ops"] = ops
    q_ops = {k: v for k, v in ops.items() if k in QUANTIZED_OPS}
    r.notes.append("quantized ops: " + (", ".join(f"{k} {v}" for k, v in q_ops.items()) or "none"))


def rows(b, bits: int) -> list[Planned]:
    """onnxruntime's rows at ``bits``: dynamic int8 (per tensor, per channel) at 8, MatMulNBits at 4."""
    tags = {"peers", "ort", "onnx"}
    if bits == 8:
        return [
            planned("ORT quantize_dynamic int8", "onnxruntime", "onnx", 8, tags,
                    artifact_peer(b, "onnx", lambda s, o: peer_ort_dynamic(s, o, per_channel=False), "dyn", note_ops)),
            planned("ORT quantize_dynamic int8 per-channel", "onnxruntime", "onnx", 8, tags,
                    artifact_peer(b, "onnx", lambda s, o: peer_ort_dynamic(s, o, per_channel=True), "dyn-pc", note_ops)),
        ]
    return [planned("ORT MatMulNBits 4-bit b32", "onnxruntime", "onnx", 4, tags,
                    artifact_peer(b, "onnx", lambda s, o: peer_ort_nbits(s, o, block_size=32), "nbits", note_ops))]
