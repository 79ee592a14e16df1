"""Peers at full size: pocketfusion's export of the full-size SD-1.5 U-Net against optimum's ONNX export, in the same
onnxruntime, interleaved (``pocketfusion.benchmarks.peers_scale``; ``--help``).

    python benchmarks/peers_scale.py [--targets onnx[,tflite,executorch]] [--threads 2] [--json OUT]
"""

from pocketfusion.benchmarks.peers_scale import main

if __name__ == "__main__":
    raise SystemExit(main())
