"""pocketfusion.export — the ``export`` stage: ``export(model, ExportConfig, out)`` (see ``export.api``)."""

from pocketfusion.export.api import export
from pocketfusion.export.base import ExportConfig, ExportError, ParityError

__all__ = ["ExportConfig", "ExportError", "ParityError", "export"]
