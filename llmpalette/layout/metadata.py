"""The JSON layout a layer file keeps in its one metadata key, read and checked the same way for every
kind of compressed weight."""
from __future__ import annotations

import json


def read_layout(metadata: dict[str, str], key: str, prefix: str, kind: str, fields: tuple[str, ...],
                version: int) -> dict[str, object]:
    """The JSON object under `key`, checked for presence, JSON syntax, format `version` and `fields`;
    ValueError naming `prefix` otherwise (`kind`: what the key marks, e.g. "palettized weight")."""
    if key not in metadata:
        raise ValueError(f"{prefix}: missing metadata key {key!r}; not a {kind}")
    try:
        layout = json.loads(metadata[key])
    except json.JSONDecodeError as error:
        raise ValueError(f"{prefix}: metadata {key!r} is not valid JSON: {error}") from error
    if not isinstance(layout, dict):
        raise ValueError(f"{prefix}: metadata {key!r} must be a JSON object")
    found = layout.get("format_version")
    if found != version:
        raise ValueError(f"{prefix}: format_version {found!r} is not supported (this llmpalette reads {version})")
    missing = [field for field in fields if field not in layout]
    if missing:
        raise ValueError(f"{prefix}: metadata {key!r} lacks {missing}")
    return layout
