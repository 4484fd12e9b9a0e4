"""The errors a user can act on. The CLI prints them as one line and exits non-zero.

Below every floor of the house: any module may raise them.
"""


class LlmpaletteError(Exception):
    """Base class for expected, user-facing errors (bad input, missing files, offline hub)."""


class ConfigError(LlmpaletteError, ValueError):
    """A configuration value is wrong. `field` is its dotted path, e.g. `global_config.group_size`."""

    def __init__(self, field: str, message: str, source: str | None = None):
        self.field = field
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {message}" if field else f"{where}{message}")

    def in_file(self, source: str, prefix: str = "") -> "ConfigError":
        """The same error, located in a file and under a parent field."""
        field = f"{prefix}.{self.field}" if prefix and self.field else (prefix or self.field)
        return ConfigError(field, self.message, source)


class SourceError(LlmpaletteError):
    """A model or text source cannot be found or loaded."""


class JobError(LlmpaletteError):
    """A job directory cannot be used as asked (changed recipe on resume, missing manifest, ...)."""
