"""GPTQ onto LUTs for one weight: per-grouped-channel scalar LUTs fitted to the layer's output error.

1. Initial LUTs: the exact weighted k-means of each group (the SKM machinery), each weight weighted by
   its input channel's diagonal Hessian entry (the error of column j costs about H_jj per unit²).
2. GPTQ's error feedback with "nearest entry of the row's LUT" as the quantizer (`maths.gptq`,
   `maths.lut_gptq.NearestLUTEntry`).
3. GANQ's closed-form LUT update for the indices GPTQ chose (`maths.lut_gptq.refit_luts`), then
   GPTQ again with the new LUTs; `iterations` times; and a last refit to the last pass's indices (for
   fixed indices the refit is the optimum, so it never makes that pass worse). The LUTs and indices
   with the lowest output error ‖(W − Ŵ)Xᵀ‖² seen along the way are kept.
4. Columns in activation order (decreasing H diagonal) by default, as GPTQ's heuristic: the LUTs are
   per group of rows, so the column order changes only which errors are fed forward.

The result is an ordinary `PalettizedWeight` (per_grouped_channel, float32 LUT), so it is stored,
reported, loaded and exported like any k-means result. A Linear weight [out, in]: LUTs are shared by
`group_size` consecutive output channels, columns are input channels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpalette.errors import ConfigError
from llmpalette.layout.palettized import PalettizedWeight
from llmpalette.maths.gptq import gptq, output_error
from llmpalette.maths.lut_gptq import NearestLUTEntry, refit_luts
from llmpalette.palettization.post_training import ModulePostTrainingPalettizerConfig, palettize_weight


@dataclass
class ModuleLUTGPTQConfig(ModulePostTrainingPalettizerConfig):
    """LUT-GPTQ for one Linear module (`algorithm: lut_gptq` in a `LayerwiseCompressorConfig`): the LUT
    fields of `ModulePostTrainingPalettizerConfig` (scalar float LUTs along the output channels) plus
    GPTQ's `hessian_dampening`, `use_activation_order_heuristic` (default true here, false in
    `ModuleGPTQConfig` as in Core ML Tools: on the default model it takes 4-bit g16 from 1.098x to 1.072x
    the float perplexity) and `processing_group_size` (as in `ModuleGPTQConfig`) and `lut_iterations`, the
    GANQ refits of the LUTs to the indices GPTQ chose."""

    hessian_dampening: float = 0.01
    use_activation_order_heuristic: bool = True
    processing_group_size: int = 128
    lut_iterations: int = 2
    algorithm: str = "lut_gptq"

    def validate(self) -> None:
        super().validate()
        for name, ok, why in [
            ("cluster_dim", self.vector_size == 1, "LUT-GPTQ fits scalar LUTs: cluster_dim must be 1 (or absent)"),
            ("channel_axis", self.channel_axis == 0, "LUT-GPTQ shares LUTs along the output channels: channel_axis must be 0"),
            ("enable_per_channel_scale", not self.enable_per_channel_scale, "is not supported by LUT-GPTQ"),
            ("lut_dtype", self.lut_dtype == "float32", "LUT-GPTQ writes float32 LUTs"),
            ("enforce_zero", not self.enforce_zero, "is not kept by LUT-GPTQ's LUT refits; use algorithm kmeans for it"),
            ("hessian_dampening", 0 <= self.hessian_dampening < 1, f"must be a number in [0, 1), got {self.hessian_dampening!r}"),
            ("processing_group_size", self.processing_group_size >= 1, f"must be a positive integer, got {self.processing_group_size!r}"),
            ("lut_iterations", self.lut_iterations >= 0, f"must be >= 0, got {self.lut_iterations!r}"),
            ("algorithm", self.algorithm == "lut_gptq", f"must be 'lut_gptq', got {self.algorithm!r}"),
        ]:
            if not ok:
                raise ConfigError(name, why)


@dataclass(frozen=True)
class LUTGPTQInfo:
    """How the LUT-GPTQ of one weight went: the output error of the k-means start, of the result, which
    pass gave the result (0: the first GPTQ pass), and the dampening GPTQ used."""

    kmeans_error: float
    error: float
    best_pass: int
    dampening: float


def gptq_palettize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: ModulePostTrainingPalettizerConfig,
    *,
    iterations: int = 2,
    dampening: float = 0.01,
    act_order: bool = True,
    processing_group_size: int = 128,
    seed: int = 0,
) -> tuple[PalettizedWeight, LUTGPTQInfo]:
    """LUT-GPTQ of a Linear weight [out, in] with H = XᵀX / tokens [in, in]; see the module docstring.

    config: scalar LUTs along the output channels (per_tensor, per_channel or per_grouped_channel,
        channel_axis 0, cluster_dim 1, float LUT, no per-channel scale).
    """
    if weight.dim() != 2:
        raise ValueError(f"LUT-GPTQ takes a Linear weight [out, in], got shape {tuple(weight.shape)}")
    if config.vector_size != 1 or config.channel_axis != 0 or config.enable_per_channel_scale or config.lut_dtype not in (None, "fp32", "float32"):
        raise ValueError("LUT-GPTQ supports scalar float LUTs along the output channels (cluster_dim 1, channel_axis 0, "
                         "no enable_per_channel_scale, no lut_dtype)")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    w = weight.detach().to(torch.float32)
    h = hessian.detach().to(torch.float32)
    rows, columns = w.shape
    group_size = config.channels_per_lut(tuple(w.shape))
    importance = torch.diagonal(h).clamp(min=0).expand(rows, columns)
    start = palettize_weight(w, config, seed=seed, importance=importance)
    luts = start.lut[..., 0].to(torch.float32)  # [groups, K]
    kmeans_error = output_error(w, start.decode(), h)
    best = None
    damp_used = dampening
    for step in range(iterations + 1):
        quantizer = NearestLUTEntry(luts, group_size, columns)
        result = gptq(w, h, quantizer, dampening=dampening, act_order=act_order, processing_group_size=processing_group_size)
        damp_used = result.dampening
        candidates = [(luts, quantizer.indices)]
        luts = refit_luts(w, quantizer.indices, h, luts, group_size)  # after the last pass too: never worse
        candidates.append((luts, quantizer.indices))  # the refit alone, same indices
        for lut, indices in candidates:
            error = output_error(w, lut.repeat_interleave(group_size, 0).gather(1, indices), h)
            if best is None or error < best[0]:
                best = (error, lut.clone(), indices.clone(), step)
    error, lut, indices, best_pass = best
    if kmeans_error <= error:  # GPTQ did not help this layer (tiny or degenerate): keep the k-means start
        return start, LUTGPTQInfo(kmeans_error, kmeans_error, -1, damp_used)
    palettized = PalettizedWeight.from_assignment(
        lut.unsqueeze(-1), indices.reshape(rows // group_size, group_size * columns),
        shape=(rows, columns), n_bits=config.n_bits, channel_axis=0, group_size=group_size)
    return palettized, LUTGPTQInfo(kmeans_error, error, best_pass, damp_used)
