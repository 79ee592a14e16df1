"""How LiteRT runs a weight-only grid: the kernel path chosen at export, by measurement under a quality floor.

The file holds the grid's integers either way (``export.quant_tflite``); what differs is what consumes them:

* ``dequantize`` - ``INT8 / INT4 -> DEQUANTIZE [-> layout ops] -> CONV_2D / FULLY_CONNECTED``: the op sees the fp32
  weight ``q * scale`` and runs its fp32 kernel: exactly the on-grid model's numbers. XNNPACK folds an int8
  DEQUANTIZE of a constant at delegation; int4 DEQUANTIZE and a group-wise layer's RESHAPE / TRANSPOSE it does not
  take, so a 4-bit model runs those on LiteRT's reference kernels every call, in many delegate partitions;
* ``dynamic``    - every integer weight feeds a CONV_2D / FULLY_CONNECTED directly (``make_dynamic``): LiteRT's
  XNNPACK delegate quantizes the op's input activations to int8 on every call, per row, and runs int8 x int8 (int8
  weights: ``qd8-f32-qc8w``) or int8 x int4 dot products (per channel ``qd8-f32-qc4w``, group-wise ``qd8-f32-qb4w``
  with the grid's group scales as LiteRT's block scales); VNNI / dot-product instructions where the CPU has them.
  A convolution with int4 weights runs as a FULLY_CONNECTED (over im2col patches when it is k x k or strided):
  XNNPACK has no dynamic int4 convolution. The integers and scales are still the grid's; the activations' rounding
  is the path's only error.

``choose`` builds both, times them round robin on a golden input (one thread) and measures each one's output SNR on
the calibration set's held-out feeds against the fp32 model; ``dynamic`` is kept when it is faster *and* its SNR is at
least ``snr_floor`` of the exact path's. The manifest records the choice, why, and the figures; ``--tflite-weights``
forces one.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PATHS = ("dequantize", "dynamic")
# The dynamic path's U-Net output SNR on the calibration set's held-out feeds (real sampling inputs) against the fp32
# model's outputs, that ``auto`` requires. The W8 floor is image PSNR >= 35 dB against fp32; measured on
# this floor's two cases (2-core AMD EPYC with AVX-512 VNNI, LiteRT, images against the fp32 export's, same seeds):
# the 50-step teacher (CFG 4), held-out SNR 31.9 dB -> images 54.4 dB mean, 44.9 dB min (64 prompts); the 4-step
# student demo-mobile, 42.4 dB -> 54.0 / 45.4 dB (240 prompts). 30 dB keeps the images about 10 dB above the floor.
SNR_FLOOR_DB = 30.0
MAX_LOSS_DB = 1.0
_OPS = ("CONV_2D", "FULLY_CONNECTED")
# XNNPACK's delegate (ai-edge-litert 2.3) took CONCATENATION of 4 inputs and not of 9 (then each im2col ran outside it:
# 19 partitions on the demo U-Net instead of 3); its block-wise kernels take blocks of a multiple of 32.
MAX_CONCAT = 4
# About how long ``measure`` may take (seconds) before it uses fewer feeds and timed calls: the demo U-Net's full
# measurement takes about 1 s; a full-size SD-1.5 U-Net on one thread takes ~20 s a call.
MEASURE_BUDGET_S = 60.0
BLOCK_MULTIPLE = 32


def snr_floor(exact_snr_db: float) -> float:
    """The dynamic path's least output SNR, given the exact (``dequantize``) path's on the same feeds:
    ``SNR_FLOOR_DB``, or where the grid's own error is already near it (4-bit grids: the demo U-Net's W4 grid is at
    36.9 dB), no more than ``MAX_LOSS_DB`` below the exact path."""
    return min(SNR_FLOOR_DB, exact_snr_db - MAX_LOSS_DB)


def make_dynamic(src: Path, dst: Path, factors: dict[str, float] | None = None) -> dict:
    """Write ``src`` (a lowered weight-only model) to ``dst`` with every integer weight fed to its op directly:

    * ``INT8 -> DEQUANTIZE -> CONV_2D / FULLY_CONNECTED``: the op takes the int8 tensor (XNNPACK ``qd8-f32-qc8w``);
    * INT4 (per channel, or group-wise rows + DEQUANTIZE / RESHAPE / TRANSPOSE): the integers become one
      ``FULLY_CONNECTED`` weight, per channel (``qd8-f32-qc4w``) or block-wise with the group scales as LiteRT's
      block scales (``qd8-f32-qb4w``); a convolution becomes that ``FULLY_CONNECTED`` over its input (1x1, stride 1)
      or over im2col patches (``_im2col``). XNNPACK has no dynamic int4 convolution: a CONV_2D fed int4 weights
      runs on LiteRT's reference kernel.

    ``factors``: {integer tensor name: constant the converter folded into that weight} (``quant_tflite``'s
    ``scale_factors``); a group-wise layer's block scales must be exact in fp16, so such a constant is applied to
    the op's input by a MUL and the grid's own scales are stored. Returns ``{"int8", "int4", "grouped",
    "convs_as_fc", "im2col", "input_factors": {tensor: factor}, "kept": {tensor: why}}``."""
    from pocketfusion.export import quant_tflite as qt

    model = qt.read_model(Path(src))
    g = qt._Graph.of(model)
    S = qt._schema()
    rep: dict = {"int8": 0, "int4": 0, "grouped": 0, "convs_as_fc": 0, "im2col": 0, "input_factors": {}, "kept": {}}
    drop: set[int] = set()
    before: dict[int, list] = {}
    for i, op in enumerate(g.sg.operators):
        if g.op(i) != "DEQUANTIZE":
            continue
        qten = g.sg.tensors[op.inputs[0]]
        if qten.type == S.TensorType.INT8:
            uses = g.consumers.get(op.outputs[0], [])
            if uses and all(k == 1 and g.op(j) in _OPS for j, k in uses):
                for j, _ in uses:
                    g.sg.operators[j].inputs[1] = op.inputs[0]
                drop.add(i)
                rep["int8"] += 1
        elif qten.type == S.TensorType.INT4:
            found = _weight_chain(g, op.outputs[0])
            if found is None:
                continue
            j, chain = found
            name = qten.name.decode(errors="replace")
            done = _int4_to_fc(g, i, j, (factors or {}).get(name, 1.0))
            if isinstance(done, str):
                rep["kept"][name] = done
                continue
            ops, kind = done
            before.setdefault(id(g.sg.operators[j]), []).extend(ops)
            drop.update([i, *chain])
            rep["int4"] += 1
            rep["grouped"] += kind["grouped"]
            rep["convs_as_fc"] += kind["conv"]
            rep["im2col"] += kind["im2col"]
            if kind["factor"] != 1.0:
                rep["input_factors"][name] = kind["factor"]
    g.sg.operators = [x for i, op in enumerate(g.sg.operators) if i not in drop for x in (*before.get(id(op), ()), op)]
    qt.write_model(model, Path(dst))
    return rep


def _weight_chain(g, t: int) -> tuple[int, list[int]] | None:
    """From a DEQUANTIZE's output ``t`` through RESHAPE / TRANSPOSE to the one CONV_2D / FULLY_CONNECTED that takes
    it as its weight: ``(that op, the layout ops)``, or None."""
    chain = []
    while True:
        uses = g.consumers.get(t, [])
        if len(uses) != 1:
            return None
        j, k = uses[0]
        if g.op(j) in ("RESHAPE", "TRANSPOSE") and k == 0:
            chain.append(j)
            t = g.sg.operators[j].outputs[0]
        elif g.op(j) in _OPS and k == 1:
            return j, chain
        else:
            return None


def _int4_to_fc(g, deq: int, j: int, factor: float):
    """Feed the INT4 integers behind DEQUANTIZE ``deq`` to op ``j`` as a FULLY_CONNECTED weight (module docstring):
    rewrites the integer tensor in place (same name: the layer map still holds) and op ``j``; returns the ops to run
    before it and what was done, or why the layer keeps its DEQUANTIZE."""
    from pocketfusion.export import quant_tflite as qt

    S = qt._schema()
    qten = g.sg.tensors[g.sg.operators[deq].inputs[0]]
    op, kind = g.sg.operators[j], g.op(j)
    w = g.sg.tensors[op.inputs[1]]  # the fp32 weight the chain makes: OHWI / (O, I)
    o = int(w.shape[0])
    kh, kw, i = (int(w.shape[1]), int(w.shape[2]), int(w.shape[3])) if kind == "CONV_2D" else (1, 1, int(w.shape[-1]))
    if kind == "CONV_2D":
        opts = op.builtinOptions
        if (opts.dilationHFactor, opts.dilationWFactor) != (1, 1):
            return "dilated convolution"
        if g.sg.tensors[op.inputs[0]].shape[3] != i:
            return "grouped convolution"
    scale = np.asarray(qten.quantization.scale, dtype=np.float32)
    q = qt._unpack4(g.model.buffers[qten.buffer].data, int(np.prod(qten.shape)))
    qp = S.QuantizationParametersT()
    qp.quantizedDimension = 0
    grouped = len(scale) != o
    if grouped:
        groups = len(scale) // o
        gs = i // groups
        if gs % BLOCK_MULTIPLE:
            return f"group of {gs}: XNNPACK's block-wise kernels take blocks of a multiple of {BLOCK_MULTIPLE}"
        # rows (O * I/g, kh*kw*g), in (o, group, tap, g) order -> (O, kh*kw*I) in (o, tap, channel) order: OHWI flat
        q = q.reshape(o, groups, kh * kw, gs).transpose(0, 2, 1, 3)
        h = (scale.astype(np.float64) / factor).astype(np.float16)  # the grid's scales (x factor when folded)
        if not np.array_equal((h.astype(np.float64) * factor).astype(np.float32), scale):
            return "group scales not exact in fp16 (LiteRT stores block scales as fp16)"
        blocks = np.tile(h.reshape(o, 1, groups), (1, kh * kw, 1)).reshape(o, kh * kw * groups)
        st = g.add_tensor(qten.name.decode(errors="replace") + ".scales", blocks.shape, S.TensorType.FLOAT16, g.add_buffer(blocks))
        bw = S.BlockwiseQuantizationT()
        bw.scales, bw.zeroPoints, bw.blockSize = st, -1, gs  # no zero points: symmetric
        qp.detailsType, qp.details = S.QuantizationDetails.BlockwiseQuantization, bw
    else:
        factor = 1.0  # a per-channel scale is fp32: the folded constant stays in it
        qp.scale, qp.zeroPoint = scale, np.zeros(o, dtype=np.int64)
    q = np.ascontiguousarray(q.reshape(o, kh * kw * i))
    qten.shape, qten.quantization = [o, kh * kw * i], qp
    g.model.buffers[qten.buffer].data = qt._pack(q, 4)
    op.inputs[1] = g.sg.operators[deq].inputs[0]
    tag = qten.name.decode(errors="replace").removesuffix(qt.Q_SUFFIX)
    ops = []
    if factor != 1.0:
        x = g.sg.tensors[op.inputs[0]]
        c = g.add_tensor(tag + ".input.factor", [1], S.TensorType.FLOAT32, g.add_buffer(np.asarray([factor], np.float32)))
        xs = g.add_tensor(tag + ".input.scaled", list(x.shape), S.TensorType.FLOAT32)
        ops.append(g.make_op(S.BuiltinOperator.MUL, [op.inputs[0], c], [xs], S.BuiltinOptions.MulOptions, S.MulOptionsT()))
        op.inputs[0] = xs
    patches = False
    if kind == "CONV_2D":
        opts = op.builtinOptions
        if (kh, kw, opts.strideH, opts.strideW) != (1, 1, 1, 1):
            more, op.inputs[0] = _im2col(g, op, kh, kw, tag)
            ops += more
            patches = True
        fc = S.FullyConnectedOptionsT()
        fc.fusedActivationFunction, fc.keepNumDims = opts.fusedActivationFunction, True
        op.opcodeIndex = g.opcode(S.BuiltinOperator.FULLY_CONNECTED)
        op.builtinOptionsType, op.builtinOptions = S.BuiltinOptions.FullyConnectedOptions, fc
    return ops, {"grouped": grouped, "conv": kind == "CONV_2D", "im2col": patches, "factor": float(factor)}


def _im2col(g, op, kh: int, kw: int, tag: str) -> tuple[list, int]:
    """The ops that turn CONV_2D ``op``'s NHWC input into its (N, Ho, Wo, kh*kw*C) patches (tap-major: the order of
    an OHWI weight flattened), and the patches tensor. Taps are static SLICEs of the padded input; a strided conv's
    input is first reshaped to (N, H/s, s, W/s, s, C) so every tap is a stride-1 slice (XNNPACK's delegate takes
    stride-1 slices only); the taps are joined by CONCATENATIONs of at most ``MAX_CONCAT`` inputs."""
    from pocketfusion.export import quant_tflite as qt

    S = qt._schema()
    B, F32 = S.BuiltinOperator, S.TensorType.FLOAT32
    o = op.builtinOptions
    x = g.sg.tensors[op.inputs[0]]
    n, h, w, c = (int(v) for v in x.shape)
    _, ho, wo, _ = (int(v) for v in g.sg.tensors[op.outputs[0]].shape)
    sh, sw = int(o.strideH), int(o.strideW)
    ph = max((ho - 1) * sh + kh - h, 0) if o.padding == S.Padding.SAME else 0
    pw = max((wo - 1) * sw + kw - w, 0) if o.padding == S.Padding.SAME else 0
    # total extent, a multiple of the stride, that holds every tap's last row / column
    hq, wq = max(-(-(h + ph) // sh), (kh - 1) // sh + ho), max(-(-(w + pw) // sw), (kw - 1) // sw + wo)
    ops, src = [], op.inputs[0]
    pads = [[0, 0], [ph // 2, hq * sh - h - ph // 2], [pw // 2, wq * sw - w - pw // 2], [0, 0]]
    if any(v for p in pads for v in p):
        padded = g.add_tensor(tag + ".im2col.padded", [n, hq * sh, wq * sw, c], F32)
        ops.append(g.make_op(B.PAD, [src, g.const_i32(tag + ".im2col.pads", pads)], [padded], S.BuiltinOptions.PadOptions, S.PadOptionsT()))
        src = padded
    strided = (sh, sw) != (1, 1)
    if strided:
        shape6 = [n, hq, sh, wq, sw, c]
        r6 = g.add_tensor(tag + ".im2col.phases", shape6, F32)
        ops.append(qt._reshape(g, src, r6, shape6, tag + ".im2col.phases.shape"))
        src = r6
    taps = []
    for a in range(kh):
        for b in range(kw):
            name = f"{tag}.im2col.tap{a}{b}"
            if strided:
                begin, size = [0, a // sh, a % sh, b // sw, b % sw, 0], [n, ho, 1, wo, 1, c]
            else:
                begin, size = [0, a, b, 0], [n, ho, wo, c]
            t = g.add_tensor(name + (".6d" if strided else ""), size, F32)
            ops.append(g.make_op(B.SLICE, [src, g.const_i32(name + ".begin", begin), g.const_i32(name + ".size", size)], [t],
                                 S.BuiltinOptions.SliceOptions, S.SliceOptionsT()))
            if strided:
                t4 = g.add_tensor(name, [n, ho, wo, c], F32)
                ops.append(qt._reshape(g, t, t4, [n, ho, wo, c], name + ".shape"))
                t = t4
            taps.append((t, c))
    level = 0
    while len(taps) > 1:
        joined = []
        for k in range(0, len(taps), MAX_CONCAT):
            part = taps[k:k + MAX_CONCAT]
            if len(part) == 1:
                joined.append(part[0])
                continue
            width = sum(channels for _, channels in part)
            t = g.add_tensor(f"{tag}.im2col.cat{level}.{k}", [n, ho, wo, width], F32)
            opts = S.ConcatenationOptionsT()
            opts.axis = 3
            ops.append(g.make_op(B.CONCATENATION, [p for p, _ in part], [t], S.BuiltinOptions.ConcatenationOptions, opts))
            joined.append((t, width))
        taps, level = joined, level + 1
    return ops, taps[0][0]


def measure(paths: dict[str, Path], spec, *, rounds: int = 5, runs: int = 5, budget_s: float = MEASURE_BUDGET_S) -> dict[str, dict]:
    """Per-call ms of each model in ``paths`` (one thread, round robin on the first golden input) and its output
    SNR against the fp32 model's on (at most 64 of) the spec's held-out feeds; without held-out feeds, against the
    ``dequantize`` model's on the golden inputs. Every model needs its ``.io.json`` beside it.

    A first call of each model (the warm-up) sizes the job: where ``rounds`` x ``runs`` calls and 64 feeds would
    not fit in about ``budget_s`` (a full-size U-Net takes seconds a call), fewer feeds (at least 4) and fewer
    timed calls (at least 2 rounds of one) are used; ``feeds`` and ``timed_calls`` say how many."""
    import time

    from pocketfusion.export.components import heldout_pairs, session_output_error
    from pocketfusion.runtimes.litert import LiteRTSession
    from pocketfusion.runtimes.timing import interleaved_latency

    sessions = {n: LiteRTSession(p, threads=1) for n, p in paths.items()}
    feed = spec.golden[0]
    every = 0.0  # one call of every model
    for s in sessions.values():
        t0 = time.perf_counter()
        s.run(feed)
        every += time.perf_counter() - t0
    calls = int(budget_s / 2 / max(every, 1e-9))  # half the budget for the error, half for the timing
    warmup = 3
    if rounds * runs > calls:
        rounds, runs, warmup = max(2, calls), 1, 0
    max_feeds = max(4, min(64, calls))
    if spec.heldout:  # the same feeds and measure as export.api.measured_versus_fp32: the manifest's held-out SNR
        pairs, against = heldout_pairs(spec, max_feeds), "fp32 model, held-out feeds"
    else:
        pairs, against = [(f, sessions["dequantize"].run(f)) for f in spec.golden[:max_feeds]], "dequantize path, golden inputs"
    out = {n: {"snr_db": round(session_output_error(s, pairs)["snr_db"], 2), "against": against, "feeds": len(pairs),
               "delegate_partitions": s.delegate_partitions, "timed_calls": rounds * runs} for n, s in sessions.items()}
    lat = interleaved_latency({n: (lambda s=s: s.run(feed)) for n, s in sessions.items()}, runs=runs, rounds=rounds, warmup=warmup)
    for n in out:
        out[n]["median_ms"] = round(lat[n]["median_ms"], 4)
    return out


def choose(path: Path, spec, wanted: str, float_path: Path | None = None, factors: dict[str, float] | None = None) -> dict:
    """Rewrite the lowered model at ``path`` (its ``.io.json`` beside it) into the path ``wanted`` (``dequantize`` /
    ``dynamic``), or for ``auto`` the faster one that holds the floor. Returns the manifest's record: ``chosen``,
    ``why``, ``dynamic_weights`` and, when measured, the figures. With ``float_path`` (the converted float model, its
    ``.io.json`` beside it) the float model is timed in the same round robin: ``versus_float`` is the chosen path's
    speed against it, and a quantized model slower than its float source is logged as a warning. ``factors``: as
    ``make_dynamic``'s; ``dynamic`` in the record is its report."""
    path = Path(path)
    dyn = path.with_name(path.name + ".dynamic")
    made = make_dynamic(path, dyn, factors) if wanted != "dequantize" else None
    n = made["int8"] + made["int4"] if made else 0
    rec: dict = {"dynamic_weights": n}
    if made:
        rec["dynamic"] = made
    try:
        chosen = None
        if wanted != "auto" or n == 0:
            chosen = wanted if n else "dequantize"
            rec["why"] = (f"forced (--tflite-weights {wanted})" if wanted != "auto"
                          else "no integer CONV_2D / FULLY_CONNECTED weight to feed its op: nothing to run dynamically")
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
            snr, floor = ms["dynamic"]["snr_db"], snr_floor(ms["dequantize"]["snr_db"])
            chosen = "dynamic" if speed > 1.0 and snr >= floor else "dequantize"
            rec.update(snr_floor_db=round(floor, 2),
                       why=f"measured at export (one thread): dynamic {speed:.2f}x the speed of dequantize, output SNR "
                           f"{snr:.1f} dB against the {ms['dynamic']['against']} (floor {floor:.1f} dB)")
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
