"""Quantization APIs named after Core ML Tools' `coremltools.optimize.torch.quantization` (and its
`layerwise_compression`); `ModuleLUTGPTQConfig` (LUT-GPTQ, a `LayerwiseCompressor` algorithm that writes
LUTs) lives in `llmpalette.palettization` and is re-exported here beside `ModuleGPTQConfig`."""
from llmpalette.palettization.gptq_lut import ModuleLUTGPTQConfig
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
    "ModuleLUTGPTQConfig",
    "gptq_quantize_weight",
    "ModulePostTrainingQuantizerConfig",
    "PostTrainingQuantizer",
    "PostTrainingQuantizerConfig",
    "rtn_compress_unit",
    "rtn_quantize_weight",
]
