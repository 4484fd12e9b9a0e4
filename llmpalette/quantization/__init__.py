"""Quantization APIs named after Core ML Tools' `coremltools.optimize.torch.quantization`."""
from llmpalette.quantization.gptq import ModuleGPTQConfig, gptq_quantize_weight
from llmpalette.quantization.layerwise_compressor import LayerwiseCompressor, LayerwiseCompressorConfig
from llmpalette.quantization.post_training import (
    ModulePostTrainingQuantizerConfig,
    PostTrainingQuantizer,
    PostTrainingQuantizerConfig,
    rtn_compress_unit,
    rtn_quantize_weight,
)

__all__ = [
    "LayerwiseCompressor",
    "LayerwiseCompressorConfig",
    "ModuleGPTQConfig",
    "gptq_quantize_weight",
    "ModulePostTrainingQuantizerConfig",
    "PostTrainingQuantizer",
    "PostTrainingQuantizerConfig",
    "rtn_compress_unit",
    "rtn_quantize_weight",
]
