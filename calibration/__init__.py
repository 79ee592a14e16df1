"""pocketfusion.calibration — see README.md for the stage this package holds."""
