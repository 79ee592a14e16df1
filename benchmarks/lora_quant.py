"""The demo LoRA merged, then quantized to W8 and W4: concept and base accuracy after each
(``pocketfusion.benchmarks.lora_quant``; ``--help``).

    OMP_NUM_THREADS=1 python benchmarks/lora_quant.py [--json OUT]
"""

from pocketfusion.benchmarks.lora_quant import main

if __name__ == "__main__":
    raise SystemExit(main())
