"""Quantization comparison: pocketfusion's W8 / W4 against optimum-quanto, torchao, onnxruntime,
ai-edge-quantizer and coremltools on one U-Net (``pocketfusion.benchmarks.quant``; ``--help``).

    python benchmarks/quant.py [--model DIR] [--prompts N] [--steps S] [--json OUT] [--skip WHAT,...]
"""

from pocketfusion.benchmarks.quant import main

if __name__ == "__main__":
    raise SystemExit(main())
