"""``python -m pocketfusion ...``: the same as the ``pocketfusion`` console script."""

from pocketfusion.cli import entry

if __name__ == "__main__":
    entry()
