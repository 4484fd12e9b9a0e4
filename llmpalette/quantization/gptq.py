"""GPTQ onto a uniform grid for one Linear weight: `ModuleGPTQConfig` (Core ML Tools 9.0's names) and
`gptq_quantize_weight`, which returns the same linear-quantized kind of the format as RTN, so a GPTQ
layer is stored, decoded, reported and exported exactly like an RTN one.

The grid is RTN's (`maths.uniform`, Core ML Tools' `PostTrainingQuantizer` conventions: the same
integer ranges, zero points and decode rule), with two choices of ours: each block's range comes from the
clipping search (`clipping_search`, default on: the shrink of the range, 1 down to 0.81, that minimises
the block's rounding error weighted by H's diagonal, `maths.uniform.clipped_grid`; off: the full range,
RTN's own scale), and each scale is rounded to a float16 value (`float16_exact`); GPTQ then chooses the
integers (`maths.gptq`). Per-channel grids are set from the original weight; per-block grids from the
error-corrected weights when their block starts (GPTQ's groups), or, with
`use_activation_order_heuristic`, from the original weight beforehand (static groups, so the columns
may be visited in any order and the result is still one scale per block). Core ML Tools' own GPTQ uses a
different grid from its RTN for the same dtype (`layerwise_compression/_quant.py`: [0, 2^n − 1] with a
mid zero point, 16 levels for 4 bits where the symmetric int4 grid has 15); ours keeps RTN's
conventions, so RTN and GPTQ results are the same kind and compare directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpalette.errors import ConfigError
from llmpalette.layout.quantized import QuantizedWeight
from llmpalette.maths.gptq import gptq
from llmpalette.maths.uniform import UniformColumns, clipped_grid, quant_range, uniform_grid
from llmpalette.quantization.post_training import ModulePostTrainingQuantizerConfig


@dataclass
class ModuleGPTQConfig(ModulePostTrainingQuantizerConfig):
    """GPTQ for one module: the grid fields of `ModulePostTrainingQuantizerConfig` plus Core ML Tools'
    `hessian_dampening` (fraction of the mean diagonal added to H; raised 10x at a time when H stays
    singular, and reported), `use_activation_order_heuristic` (columns in order of decreasing diag H),
    `processing_group_size` (columns updated lazily together) and `enable_normal_float` (not offered:
    refused), plus ours: `clipping_search` (default on): each scale from the range shrink (1 down to
    0.81) that minimises the block's rounding error weighted by H's diagonal (`maths.uniform.clipped_grid`),
    instead of the full range (off: RTN's grid)."""

    weight_dtype: str = "uint8"  # Core ML Tools' GPTQ default (its RTN's is int8)
    hessian_dampening: float = 0.01
    use_activation_order_heuristic: bool = False
    processing_group_size: int = 128
    enable_normal_float: bool = False
    clipping_search: bool = True
    algorithm: str = "gptq"

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.hessian_dampening < 1:
            raise ConfigError("hessian_dampening", f"must be a number in [0, 1), got {self.hessian_dampening!r}")
        if self.processing_group_size < 1:
            raise ConfigError("processing_group_size", f"must be a positive integer, got {self.processing_group_size!r}")
        if self.enable_normal_float:
            raise ConfigError("enable_normal_float", "normal-float grids are not offered; use the uniform grid (false)")
        if self.algorithm != "gptq":
            raise ConfigError("algorithm", f"must be 'gptq', got {self.algorithm!r}")


@dataclass(frozen=True)
class GPTQInfo:
    """The loss GPTQ minimised, the dampening it used and the dead (never-active) input columns."""

    loss: float
    dampening: float
    dead_columns: int


def float16_exact(scale: torch.Tensor) -> torch.Tensor:
    """Scales rounded to the nearest float16 value (kept > 0), in float32. Core ML stores scales in float16
    and dequantizes in float16: with float16 scales its weights are the job's decoded weights bit for bit,
    as `constexpr_blockwise_shift_scale` (an RTN job's float32 scales, bit-exact with Core ML Tools' RTN,
    need a per-block LUT in the export when they are not float16 values). GPTQ then fits the integers to
    these scales, so the rounding costs nothing it could not correct."""
    tiny = torch.finfo(torch.float16).tiny
    return scale.to(torch.float16).to(torch.float32).clamp(min=tiny)


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, config: ModuleGPTQConfig) -> tuple[QuantizedWeight, GPTQInfo]:
    """GPTQ of a Linear weight [out, in] with H = XᵀX / tokens [in, in] onto the config's uniform grid."""
    w = weight.detach().to(torch.float32)
    if w.dim() != 2:
        raise ValueError(f"GPTQ takes a Linear weight [out, in], got shape {list(w.shape)}")
    block_sizes = config.block_sizes_for(tuple(w.shape))
    n_bits, signed, scheme = config.weight_n_bits, config.signed, config.quantization_scheme
    qmin, qmax = quant_range(n_bits, signed, scheme)
    importance = torch.diagonal(hessian).to(torch.float32).clamp(min=0).unsqueeze(0)  # [1, columns]

    def grid(weights: torch.Tensor, sizes: tuple[int, int], columns: slice):
        if config.clipping_search:
            return clipped_grid(weights, sizes, n_bits, signed, scheme, importance[:, columns])
        return uniform_grid(weights, sizes, n_bits, signed, scheme)

    scale, zero_point = grid(w, block_sizes, slice(None))
    scale = float16_exact(scale)
    per_block = block_sizes[1] < w.shape[1]
    act_order = config.use_activation_order_heuristic
    quantize = UniformColumns(scale, zero_point, block_sizes, qmin, qmax, w.shape[1])

    def refit(columns: torch.Tensor, j0: int) -> None:
        block = j0 // block_sizes[1]
        s, zp = grid(columns, (block_sizes[0], columns.shape[1]), slice(j0, j0 + columns.shape[1]))
        scale[:, block] = float16_exact(s[:, 0])
        if zero_point is not None:
            zero_point[:, block] = zp[:, 0]
        quantize.set_block(block, scale[:, block], None if zero_point is None else zero_point[:, block])

    result = gptq(w, hessian, quantize, dampening=config.hessian_dampening, act_order=act_order,
                  processing_group_size=config.processing_group_size,
                  block_size=block_sizes[1] if per_block and not act_order else None,
                  refit=refit if per_block and not act_order else None)
    quantized = QuantizedWeight.from_integers(quantize.integers, scale, zero_point, n_bits=n_bits, signed=signed, block_sizes=block_sizes)
    return quantized, GPTQInfo(result.loss, result.dampening, result.dead_columns)
