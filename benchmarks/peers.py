"""Peer comparison: per-call U-Net latency of pocketfusion's exports vs optimum's ONNX and PyTorch eager
(``pocketfusion.benchmarks.peers``; ``--help``).

    python benchmarks/peers.py [--model DIR] [--runs 30] [--rounds 5] [--threads 2] [--json out.json]
"""

from pocketfusion.benchmarks.peers import main

if __name__ == "__main__":
    raise SystemExit(main())
