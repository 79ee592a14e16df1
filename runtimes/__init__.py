"""pocketfusion.runtimes — see README.md for the stage this package holds."""
