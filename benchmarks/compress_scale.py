"""Full-size ``compress model.safetensors --quant w8|w4`` and ``export``: wall time and peak RAM per step
(``pocketfusion.benchmarks.compress_scale``; ``--help``).

    OMP_NUM_THREADS=2 python benchmarks/compress_scale.py [--work runs/compress-scale] [--method w4=rtn] [--json OUT]
"""

from pocketfusion.benchmarks.compress_scale import main

if __name__ == "__main__":
    raise SystemExit(main())
