"""Step distillation compared: students by method at 1, 2 and 4 steps against the 50-step CFG teacher;
JSON and an HTML page with accuracy against steps per method (``pocketfusion.benchmarks.distill``; ``--help``).

    python benchmarks/distill.py --student regression=DIR --student lcm=DIR [--steps 1,2,4] [--json OUT] [--html OUT]
"""

from pocketfusion.benchmarks.distill import main

if __name__ == "__main__":
    raise SystemExit(main())
