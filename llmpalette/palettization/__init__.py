"""Palettization APIs named after Core ML Tools' `coremltools.optimize.torch.palettization`."""
from llmpalette.palettization.gptq_lut import ModuleLUTGPTQConfig, gptq_palettize_weight
from llmpalette.palettization.post_training import (
    ModulePostTrainingPalettizerConfig,
    PostTrainingPalettizer,
    PostTrainingPalettizerConfig,
    palettize_weight,
)
from llmpalette.palettization.sensitive_k_means import (
    ModuleSKMPalettizerConfig,
    SKMPalettizer,
    SKMPalettizerConfig,
    load_sensitivities,
    skm_palettize_weight,
)

__all__ = [
    "ModuleLUTGPTQConfig",
    "gptq_palettize_weight",
    "ModulePostTrainingPalettizerConfig",
    "ModuleSKMPalettizerConfig",
    "PostTrainingPalettizer",
    "PostTrainingPalettizerConfig",
    "SKMPalettizer",
    "SKMPalettizerConfig",
    "load_sensitivities",
    "palettize_weight",
    "skm_palettize_weight",
]
