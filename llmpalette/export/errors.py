"""The error an export raises when a job cannot become the asked-for file (unsupported architecture,
settings the model cannot take, a package that fails its checks). The CLI prints it as one line."""
from llmpalette.errors import LlmpaletteError


class ExportError(LlmpaletteError):
    """A finished job cannot be exported as asked, or an exported package fails verification."""
