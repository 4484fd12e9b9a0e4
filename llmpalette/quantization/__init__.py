"""Quantization APIs named after Core ML Tools' `coremltools.optimize.torch.quantization`."""
from llmpalette.quantization.post_training import (
    ModulePostTrainingQuantizerConfig,
    PostTrainingQuantizer,
    PostTrainingQuantizerConfig,
    rtn_compress_unit,
    rtn_quantize_weight,
)

__all__ = [
    "ModulePostTrainingQuantizerConfig",
    "PostTrainingQuantizer",
    "PostTrainingQuantizerConfig",
    "rtn_compress_unit",
    "rtn_quantize_weight",
]
