"""Scale: export the full-size SD-1.5-architecture U-Net, each target in its own process: wall time,
peak RAM, sizes (``pocketfusion.benchmarks.scale``; ``--help``).

    python benchmarks/scale.py [--targets onnx,executorch,tflite,coreml] [--family sd15] [--json out.json]
    python benchmarks/scale.py --quant w4 [--group-size 32] ...   # sizes of the quantized files at full scale
"""

from pocketfusion.benchmarks.scale import main

if __name__ == "__main__":
    raise SystemExit(main())
