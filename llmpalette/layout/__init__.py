"""The compressed-weight format: palettized weights (LUTs + packed indices), linear-quantized weights
(packed integers + per-block scales), their layer files, and bit packing."""

from llmpalette.layout.layer_file import CompressedWeight, LayerFile, layer_file_bytes, read_layer_file
from llmpalette.layout.packing import pack_bits, packed_size, unpack_bits
from llmpalette.layout.palettized import PalettizedWeight, group_view, ungroup_view
from llmpalette.layout.quantized import QuantizedWeight

__all__ = [
    "CompressedWeight",
    "LayerFile",
    "PalettizedWeight",
    "QuantizedWeight",
    "layer_file_bytes",
    "read_layer_file",
    "group_view",
    "pack_bits",
    "packed_size",
    "ungroup_view",
    "unpack_bits",
]
