"""Pruning at full size: the latency table of a full-size SD-1.5 U-Net on this host and KD recovery steps on it
(``pocketfusion.benchmarks.prune_scale``; ``--help``).

    python benchmarks/prune_scale.py [--parts table,kd] [--runtime onnxruntime] [--iterations 2] [--json OUT]
"""

from pocketfusion.benchmarks.prune_scale import main

if __name__ == "__main__":
    raise SystemExit(main())
