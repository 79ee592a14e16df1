"""How LiteRT runs a W8 weight-only grid: the kernel path chosen at export, by measurement under a quality floor.

The file holds the grid's integers either way (``export.quant_tflite``); what differs is what consumes them:

* ``dequantize`` - ``INT8 -> DEQUANTIZE -> CONV_2D / FULLY_CONNECTED``: the op sees the fp32 weight ``q * scale``
  (a constant XNNPACK folds at delegation) and runs its fp32 kernel: exactly the on-grid model's numbers;
* ``dynamic``    - the int8 per-channel weight feeds the op directly (TFLite's "dynamic range" form): LiteRT's
  XNNPACK delegate quantizes the op's input activations to int8 on every call, per row (``qd8-f32-qc8w``
  kernels: int8 x int8 dot products, VNNI / dot-product instructions where the CPU has them). The integers and
  scales are still the grid's; the activations' rounding is the path's only error.

Group-wise int4 layers keep their DEQUANTIZE in both (XNNPACK has no dynamic form of a per-axis re-laid-out block).
``choose`` builds both, times them round robin on a golden input (one thread) and measures each one's output SNR on
the calibration set's held-out feeds against the fp32 model; ``dynamic`` is kept when it is faster *and* its SNR is at
least ``SNR_FLOOR_DB``. The manifest records the choice, why, and the figures; ``--tflite-weights`` forces one.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

PATHS = ("dequantize", "dynamic")
# The dynamic path's U-Net output SNR on the calibration set's held-out feeds (real sampling inputs) against the fp32
# model's outputs, that ``auto`` requires. The W8 floor is image PSNR >= 35 dB against fp32; measured on
# this floor's two cases (2-core AMD EPYC with AVX-512 VNNI, LiteRT, images against the fp32 export's, same seeds):
# the 50-step teacher (CFG 4), held-out SNR 31.9 dB -> images 54.4 dB mean, 44.9 dB min (64 prompts); the 4-step
# student demo-mobile, 42.4 dB -> 54.0 / 45.4 dB (240 prompts). 30 dB keeps the images about 10 dB above the floor.
SNR_FLOOR_DB = 30.0
_OPS = ("CONV_2D", "FULLY_CONNECTED")


def make_dynamic(src: Path, dst: Path) -> int:
    """Write ``src`` (a lowered weight-only model) to ``dst`` with every ``INT8 -> DEQUANTIZE`` whose output is only
    a CONV_2D / FULLY_CONNECTED weight removed and the op fed the int8 tensor itself. Returns how many weights."""
    from pocketfusion.export import quant_tflite as qt

    model = qt.read_model(Path(src))
    g = qt._Graph.of(model)
    int8 = qt._schema().TensorType.INT8
    drop = set()
    for i, op in enumerate(g.sg.operators):
        if g.op(i) != "DEQUANTIZE" or g.sg.tensors[op.inputs[0]].type != int8:
            continue
        uses = g.consumers.get(op.outputs[0], [])
        if uses and all(k == 1 and g.op(j) in _OPS for j, k in uses):
            for j, _ in uses:
                g.sg.operators[j].inputs[1] = op.inputs[0]
            drop.add(i)
    g.sg.operators = [op for i, op in enumerate(g.sg.operators) if i not in drop]
    qt.write_model(model, Path(dst))
    return len(drop)


def measure(paths: dict[str, Path], spec, *, rounds: int = 5, runs: int = 5) -> dict[str, dict]:
    """Per-call ms of each model in ``paths`` (one thread, round robin on the first golden input) and its output
    SNR against the fp32 model's on (at most 64 of) the spec's held-out feeds; without held-out feeds, against the
    ``dequantize`` model's on the golden inputs. Every model needs its ``.io.json`` beside it."""
    from pocketfusion.export.components import heldout_pairs, session_output_error
    from pocketfusion.runtimes.litert import LiteRTSession
    from pocketfusion.runtimes.timing import interleaved_latency

    sessions = {n: LiteRTSession(p, threads=1) for n, p in paths.items()}
    if spec.heldout:  # the same feeds and measure as export.api.measured_versus_fp32: the manifest's held-out SNR
        pairs, against = heldout_pairs(spec), "fp32 model, held-out feeds"
    else:
        pairs, against = [(f, sessions["dequantize"].run(f)) for f in spec.golden], "dequantize path, golden inputs"
    out = {n: {"snr_db": round(session_output_error(s, pairs)["snr_db"], 2), "against": against, "feeds": len(pairs),
               "delegate_partitions": s.delegate_partitions} for n, s in sessions.items()}
    feed = spec.golden[0]
    lat = interleaved_latency({n: (lambda s=s: s.run(feed)) for n, s in sessions.items()}, runs=runs, rounds=rounds)
    for n in out:
        out[n]["median_ms"] = round(lat[n]["median_ms"], 4)
    return out


def choose(path: Path, spec, wanted: str, float_path: Path | None = None) -> dict:
    """Rewrite the lowered model at ``path`` (its ``.io.json`` beside it) into the path ``wanted`` (``dequantize`` /
    ``dynamic``), or for ``auto`` the faster one that holds the floor. Returns the manifest's record: ``chosen``,
    ``why``, ``dynamic_weights`` and, when measured, the figures. With ``float_path`` (the converted float model, its
    ``.io.json`` beside it) the float model is timed in the same round robin: ``versus_float`` is the chosen path's
    speed against it, and a quantized model slower than its float source is logged as a warning."""
    path = Path(path)
    dyn = path.with_name(path.name + ".dynamic")
    n = make_dynamic(path, dyn) if wanted != "dequantize" else 0
    rec: dict = {"dynamic_weights": n}
    try:
        chosen = None
        if wanted != "auto" or n == 0:
            chosen = wanted if n else "dequantize"
            rec["why"] = (f"forced (--tflite-weights {wanted})" if wanted != "auto"
                          else "no int8 per-channel CONV_2D / FULLY_CONNECTED weight: nothing to run dynamically")
        elif not spec.golden:
            chosen = "dequantize"
            rec["why"] = "no golden inputs to measure on: the exact weight-only path kept"
        paths = {"dequantize": path}
        if n:
            shutil.copyfile(str(path) + ".io.json", str(dyn) + ".io.json")
            paths["dynamic"] = dyn
        if float_path is not None and spec.golden:
            paths["float"] = Path(float_path)
        ms = measure(paths, spec) if spec.golden and (chosen is None or "float" in paths) else {}
        if chosen is None:
            speed = ms["dequantize"]["median_ms"] / ms["dynamic"]["median_ms"]
            snr = ms["dynamic"]["snr_db"]
            chosen = "dynamic" if speed > 1.0 and snr >= SNR_FLOOR_DB else "dequantize"
            rec.update(snr_floor_db=SNR_FLOOR_DB,
                       why=f"measured at export (one thread): dynamic {speed:.2f}x the speed of dequantize, output SNR "
                           f"{snr:.1f} dB against the {ms['dynamic']['against']} (floor {SNR_FLOOR_DB:g} dB)")
        rec["chosen"] = chosen
        if ms:
            rec["measured"] = ms
        if "float" in ms:
            f, q = ms["float"], ms[chosen]
            speed = f["median_ms"] / q["median_ms"]
            rec["versus_float"] = {
                "speed": round(speed, 3), "float_ms": f["median_ms"], "quantized_ms": q["median_ms"],
                "delegate_partitions": {"float": f["delegate_partitions"], "quantized": q["delegate_partitions"]},
                "note": "one thread, round robin at export on this host",
            }
            if speed < 1.0:
                logger.warning("litert: the quantized %s runs at %.2fx its float model's speed here (%.3f vs %.3f ms a call; %d XNNPACK "
                               "partitions against %d)", spec.name, speed, q["median_ms"], f["median_ms"],
                               q["delegate_partitions"], f["delegate_partitions"])
        if chosen == "dynamic":
            dyn.replace(path)
        logger.info("litert weights: %s (%s)", chosen, rec["why"])
        return rec
    finally:
        for p in (dyn, Path(str(dyn) + ".io.json")):
            p.unlink(missing_ok=True)
