"""Loading models and text: where a model or a text comes from, and turning text into token windows."""

from llmpalette.sources.models import (
    DEFAULT_MODEL,
    ModelSource,
    load_model,
    load_tokenizer,
    quiet_libraries,
    resolve_model,
)
from llmpalette.sources.text import (
    DEFAULT_TEXT,
    HELD_OUT_EVERY,
    TextWindows,
    build_windows,
    is_held_out,
    iter_documents,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TEXT",
    "HELD_OUT_EVERY",
    "ModelSource",
    "TextWindows",
    "build_windows",
    "is_held_out",
    "iter_documents",
    "load_model",
    "load_tokenizer",
    "quiet_libraries",
    "resolve_model",
]
