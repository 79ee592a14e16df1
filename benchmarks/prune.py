"""Pruned U-Nets against their original on one runtime (interleaved), with the search's frontier and the
BK-SDM presets on one plot (``pocketfusion.benchmarks.prune``; ``--help``).

    python benchmarks/prune.py --model searched=DIR --model bk-sdm-small=DIR [--runtime onnxruntime] [--json OUT] [--html OUT]
"""

from pocketfusion.benchmarks.prune import main

if __name__ == "__main__":
    raise SystemExit(main())
