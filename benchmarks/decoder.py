"""The compact VAE decoder against the original: decoder latency on onnxruntime, ExecuTorch and LiteRT, interleaved
(``pocketfusion.benchmarks.decoder``; ``--help``).

    python benchmarks/decoder.py [MODEL] [--reference demo] [--threads N] [--record]
"""

from pocketfusion.benchmarks.decoder import main

if __name__ == "__main__":
    raise SystemExit(main())
