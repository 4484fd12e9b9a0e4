"""A layer file: one compressed weight in a safetensors file, as a job writes it and everyone reads it.

The weight is either kind of the compressed-weight format: palettized (`PalettizedWeight`: tensors
`PARAM.lut`, `PARAM.indices`, ...) or linear-quantized (`QuantizedWeight`: `PARAM.data`,
`PARAM.scale`, `PARAM.zero_point`). The file holds the weight's tensors (`to_tensors`) and exactly
one metadata key, `PARAM.__palettized__` or `PARAM.__quantized__`: the layout as JSON (`metadata`)
plus the module it belongs to (`module`) and the modules that share the tensor (`aliases`, tied
weights). The key's suffix says the kind, so a plain reader gets the weight back with

    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    PalettizedWeight.from_tensors(load_file(path), metadata, "weight")   # or QuantizedWeight

One metadata key keeps the bytes reproducible: safetensors orders several keys differently from run
to run. `layer_file_bytes` writes the format and `read_layer_file` is its one reader.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from llmpalette.layout.palettized import PalettizedWeight
from llmpalette.layout.quantized import METADATA_SUFFIX as QUANTIZED_SUFFIX
from llmpalette.layout.quantized import QuantizedWeight

CompressedWeight = PalettizedWeight | QuantizedWeight
METADATA_SUFFIX = ".__palettized__"
KINDS: dict[str, type[PalettizedWeight] | type[QuantizedWeight]] = {
    METADATA_SUFFIX: PalettizedWeight,
    QUANTIZED_SUFFIX: QuantizedWeight,
}  # metadata key suffix -> the kind it announces


@dataclass(frozen=True)
class LayerFile:
    """What a layer file holds: the weight (either kind), its parameter name, its module and the tied aliases."""

    module: str
    param: str
    aliases: tuple[str, ...]
    weight: CompressedWeight

    @property
    def names(self) -> tuple[str, ...]:
        return (self.module, *self.aliases)


def layer_file_bytes(layer: LayerFile) -> bytes:
    """The safetensors bytes of a layer file; the same layer gives the same bytes in any process."""
    extra = {"module": layer.module, "aliases": list(layer.aliases)}
    tensors = layer.weight.to_tensors(layer.param)
    return safetensors_bytes(tensors, metadata=layer.weight.metadata(layer.param, extra))


def read_layer_file(path: str | Path) -> LayerFile:
    """Read a layer file. Raises ValueError naming the file when it is not one (or is damaged)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    keys = [(key, suffix) for key in metadata for suffix in KINDS if key.endswith(suffix)]
    if len(keys) != 1:
        expected = " or ".join(f"'*{suffix}'" for suffix in KINDS)
        raise ValueError(f"{path}: expected one {expected} metadata key, found {sorted(metadata)}")
    key, suffix = keys[0]
    param = key[: -len(suffix)]
    info = json.loads(metadata[key])
    try:
        weight = KINDS[suffix].from_tensors(tensors, metadata, param)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return LayerFile(module=str(info.get("module", "")), param=param, aliases=tuple(info.get("aliases", ())), weight=weight)
