"""Where a U-Net call's time goes in onnxruntime, per operator type, against the host's GEMM / conv roofline
(``pocketfusion.benchmarks.unet_profile``; ``--help``).

    python benchmarks/unet_profile.py EXPORT_DIR [EXPORT_DIR ...] [--threads 1] [--runs 50] [--json OUT]
"""

from pocketfusion.benchmarks.unet_profile import main

if __name__ == "__main__":
    raise SystemExit(main())
