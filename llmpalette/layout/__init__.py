"""The compressed-weight format: palettized weights (LUTs + packed indices) and bit packing."""

from llmpalette.layout.layer_file import LayerFile, layer_file_bytes, read_layer_file
from llmpalette.layout.packing import pack_bits, packed_size, unpack_bits
from llmpalette.layout.palettized import PalettizedWeight, group_view, ungroup_view

__all__ = [
    "LayerFile",
    "PalettizedWeight",
    "layer_file_bytes",
    "read_layer_file",
    "group_view",
    "pack_bits",
    "packed_size",
    "ungroup_view",
    "unpack_bits",
]
