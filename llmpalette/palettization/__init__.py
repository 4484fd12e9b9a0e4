"""Palettization APIs named after Core ML Tools' `coremltools.optimize.torch.palettization`."""
from llmpalette.palettization.post_training import (
    ModulePostTrainingPalettizerConfig,
    PostTrainingPalettizer,
    PostTrainingPalettizerConfig,
    palettize_weight,
)

__all__ = [
    "ModulePostTrainingPalettizerConfig",
    "PostTrainingPalettizer",
    "PostTrainingPalettizerConfig",
    "palettize_weight",
]
