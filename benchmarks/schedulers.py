"""Each runtime scheduler against diffusers' own, end to end: PSNR of the runtime pipeline's images on an export
against diffusers' pipeline on its source model (``pocketfusion.benchmarks.schedulers``; ``--help``).

    python benchmarks/schedulers.py [EXPORT_DIR] [--models demo,sd21] [--runtime onnx,executorch,tflite] [--steps 20]
                                    [--prompts 4] [--json OUT]
"""

from pocketfusion.benchmarks.schedulers import main

if __name__ == "__main__":
    raise SystemExit(main())
