"""Single-file checkpoint loading against the equivalent diffusers folder: load time and peak RAM of a full-size
SD-1.5-layout model with random weights (``pocketfusion.benchmarks.single_file``; ``--help``).

    OMP_NUM_THREADS=1 python benchmarks/single_file.py [--dtype fp16|fp32] [--rounds 2] [--json OUT]
"""

from pocketfusion.benchmarks.single_file import main

if __name__ == "__main__":
    raise SystemExit(main())
