"""pocketfusion.compress — see README.md for the stage this package holds."""
