"""Floor 6: a finished job turned into files a device or hub can use. Reads the job; never recomputes a LUT."""
from llmpalette.export.errors import ExportError

__all__ = ["ExportError"]
