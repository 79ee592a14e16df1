"""Distillation at full size: seconds per iteration and peak RAM of both methods on a full-size
SD-1.5-architecture U-Net with gradient checkpointing (``pocketfusion.benchmarks.distill_scale``; ``--help``).

    python benchmarks/distill_scale.py [--methods regression,lcm] [--iterations 2] [--json OUT]
"""

from pocketfusion.benchmarks.distill_scale import main

if __name__ == "__main__":
    raise SystemExit(main())
