"""The errors a user can act on. The CLI prints them as one line and exits non-zero.

Below every floor of the house: any module may raise them.
"""
import difflib


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


def unknown_field(field: str, name: str, known, owner: str = "") -> ConfigError:
    """The error for a field `name` (at dotted path `field`) that is not one of `known`: it lists them and
    suggests the closest spelling, e.g. "unknown field of X; did you mean 'n_bits'? known fields: ..."."""
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    where = f" of {owner}" if owner else ""
    return ConfigError(field, f"unknown field{where}; {hint}known fields: {', '.join(known)}")


class SourceError(LlmpaletteError):
    """A model or text source cannot be found or loaded."""


class JobError(LlmpaletteError):
    """A job directory cannot be used as asked (changed recipe on resume, missing manifest, ...)."""
