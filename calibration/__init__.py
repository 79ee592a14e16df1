"""pocketfusion.calibration — calibration sets recorded from real sampling runs.

* ``capture`` — ``capture`` (record a pipeline's component inputs), ``save`` / ``load`` (the artifact,
  stage ``calibrate``), ``check_model``, the held-out split.
* ``stage``   — ``calibrate(model, CalibrationConfig, out)``; ``resolve`` (the set ``--calib`` names:
  the model's prompt suite, a prompt file, or a saved set).

Prompts reach calibration only through ``pocketfusion.suite`` (a ``PromptSuite``). Calibration imports
the core only.
"""

from pocketfusion.calibration.capture import CalibrationSet, capture, capture_steps, check_model, heldout_count, load, save
from pocketfusion.calibration.stage import DEFAULT_PROMPTS, CalibrationConfig, calibrate, resolve

__all__ = [
    "DEFAULT_PROMPTS", "CalibrationConfig", "CalibrationSet", "calibrate", "capture", "capture_steps", "check_model",
    "heldout_count", "load", "resolve", "save",
]
