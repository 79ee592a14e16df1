"""U-Net pruning: ``prune(model, PruneConfig, out, table=..., measure=...)`` (stage ``prune``)."""

from pocketfusion.compress.prune.config import PRESETS, PruneConfig
from pocketfusion.compress.prune.stage import preset_units, prune, search, summary

__all__ = ["PRESETS", "PruneConfig", "preset_units", "prune", "search", "summary"]
