"""pocketfusion.calibration — calibration sets recorded from real sampling runs (``capture``).

See ``pocketfusion.calibration.capture`` for the recorded inputs and the saved layout.
"""

from pocketfusion.calibration.capture import (
    DEFAULT_PROMPTS,
    CalibrationSet,
    capture,
    check_model,
    demo_prompts,
    heldout_count,
    is_demo_compatible,
    load,
    read_prompts,
    resolve,
    save,
)

__all__ = [
    "DEFAULT_PROMPTS", "CalibrationSet", "capture", "check_model", "demo_prompts", "heldout_count", "is_demo_compatible",
    "load", "read_prompts", "resolve", "save",
]
