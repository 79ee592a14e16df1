"""Images of export directories through one runtime against a reference export's, same prompts and seeds
(``pocketfusion.benchmarks.export_images``; ``--help``).

    python benchmarks/export_images.py REF_EXPORT EXPORT [EXPORT ...] [--runtime litert] [--prompts 240] [--json OUT]
"""

from pocketfusion.benchmarks.export_images import main

if __name__ == "__main__":
    raise SystemExit(main())
