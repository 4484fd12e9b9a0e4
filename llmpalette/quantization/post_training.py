"""Data-free post-training linear quantization: round-to-nearest (RTN) onto a uniform grid.

Mirrors `coremltools.optimize.torch.quantization.PostTrainingQuantizer` and its configs, with the
same scales, zero points and integers on the same float32 weight (the grid is
`llmpalette.maths.uniform`'s). `rtn_quantize_weight` is the whole algorithm for one tensor (pure:
tensor in, `QuantizedWeight` out); `PostTrainingQuantizer` applies it to the modules a config
selects, in memory, with no files; `rtn_compress_unit` is the same step with the signature a job
stage calls.
"""
from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from llmpalette.config import ModuleOptimizationConfig, OptimizationConfig
from llmpalette.errors import ConfigError
from llmpalette.layout.quantized import QuantizedWeight
from llmpalette.maths.uniform import quant_range, quantize_blocks, uniform_grid
from llmpalette.modules import get_weight, set_weight
from llmpalette.palettization.post_training import UNSUPPORTED_TYPE, Plan, plan_units

log = logging.getLogger("llmpalette")

Granularity = Literal["per_tensor", "per_channel", "per_block"]
QuantizationScheme = Literal["symmetric", "affine"]

# weight_dtype -> (n_bits, signed). Core ML Tools' PostTrainingQuantizer takes int8, uint8, int4 and
# uint4; the other widths are llmpalette's (int3 / uint3 for GPTQ comparisons, ...).
WEIGHT_DTYPES: dict[str, tuple[int, bool]] = {
    **{f"int{n}": (n, True) for n in range(2, 9)},
    **{f"uint{n}": (n, False) for n in range(2, 9)},
}
_CORE_ML_TOOLS_DTYPES = ("int8", "uint8", "int4", "uint4")
_TORCH_DTYPES = {torch.int8: "int8", torch.uint8: "uint8"}
_REFUSED_DTYPES = {
    "float32": "leaves a module unquantized in Core ML Tools' documentation, but its code quantizes it to "
    "int32; to leave a module alone give it the config null",
    "float16": "is not a quantization; to leave a module alone give it the config null",
    "fp8_e4m3": "Core ML Tools quantizes fp8 weight_dtypes as symmetric int8 (its integer range from the dtype's "
    "bit width); write int8",
    "fp8_e4m3fn": "Core ML Tools quantizes fp8 weight_dtypes as symmetric int8; write int8",
    "fp8_e5m2": "Core ML Tools quantizes fp8 weight_dtypes as symmetric int8; write int8",
}


@dataclass
class ModulePostTrainingQuantizerConfig(ModuleOptimizationConfig):
    """How one module's weight is quantized (Core ML Tools' names, plus `weight_threshold`).

    Args:
        weight_dtype: the integers: int8, uint8, int4, uint4 (Core ML Tools' choices; `torch.int8` and
            `torch.uint8` are accepted), or int2..int7 / uint2..uint7 (llmpalette's).
        granularity: per_tensor (one scale), per_channel (one scale per output channel, axis 0) or
            per_block (see `block_size`).
        quantization_scheme: symmetric (the grid is symmetric about 0: no zero point for signed
            integers, the constant 2**(n-1) - 1 for unsigned ones) or affine (the grid spans
            [min(w, 0), max(w, 0)] with an integer zero point per block).
        block_size: per_block only. An integer b: one scale per output channel and per b consecutive
            input elements (axis 1). A list `[b_out, b_in, ...]`: blocks of b_out output channels by
            b_in inputs; a size of 0 (or at least the axis) does not split that axis, except that
            the output axis is per channel whenever the input axis is split (Core ML Tools' rule).
            Axes past the second (convolution kernels) are never split: 0 or their full length.
        weight_threshold: only weights with more elements than this are quantized (default 0: every
            supported layer; a list of configs for one module type picks its entry by it).

    Example:
        >>> ModulePostTrainingQuantizerConfig.from_dict(
        ...     {"weight_dtype": "int4", "granularity": "per_block", "block_size": 32}).block_sizes_for((64, 128))
        (1, 32)
    """

    weight_dtype: str = "int8"
    granularity: Granularity = "per_channel"
    quantization_scheme: QuantizationScheme = "symmetric"
    block_size: Any = None
    weight_threshold: int = 0

    def _normalize(self, name: str, value: Any) -> Any:
        if isinstance(value, Enum):  # Core ML Tools' QuantizationGranularity / QuantizationScheme
            return value.value
        if name == "weight_dtype":
            if isinstance(value, torch.dtype):
                return _TORCH_DTYPES.get(value, str(value).removeprefix("torch."))
            if isinstance(value, str):
                return value.removeprefix("torch.").lower()
        if name == "block_size" and isinstance(value, list):
            return tuple(value)
        return value

    def validate(self) -> None:
        if self.weight_dtype in _REFUSED_DTYPES:
            raise ConfigError("weight_dtype", f"{self.weight_dtype} {_REFUSED_DTYPES[self.weight_dtype]}")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ConfigError(
                "weight_dtype",
                f"expected one of {', '.join(_CORE_ML_TOOLS_DTYPES)} (Core ML Tools') or another width "
                f"int2..int8 / uint2..uint8, got {self.weight_dtype!r}",
            )
        if self.weight_threshold < 0:
            raise ConfigError("weight_threshold", f"must be >= 0, got {self.weight_threshold}")
        if self.granularity != "per_block":
            if self.block_size is not None:
                raise ConfigError("block_size", f"only applies to granularity per_block, not {self.granularity}")
            return
        if self.block_size is None:
            raise ConfigError("block_size", "is required with granularity per_block")
        self._check_block_size()

    def _check_block_size(self) -> None:
        size = self.block_size
        if isinstance(size, int) and not isinstance(size, bool):
            if size < 1:
                raise ConfigError("block_size", f"must be a positive integer, got {size}")
            return
        if (
            not isinstance(size, tuple)
            or not size
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in size)
        ):
            raise ConfigError(
                "block_size", f"must be a positive integer or a list of non-negative integers, got {size!r}"
            )

    @property
    def weight_n_bits(self) -> int:
        """Bits per integer (Core ML Tools' attribute of the same name)."""
        return WEIGHT_DTYPES[self.weight_dtype][0]

    @property
    def signed(self) -> bool:
        return WEIGHT_DTYPES[self.weight_dtype][1]

    def block_sizes_for(self, shape: tuple[int, ...], name: str | None = None) -> tuple[int, ...]:
        """The elements per block along each axis of a weight of `shape` (see `QuantizedWeight`).

        Raises `ConfigError` naming the layer (`name`) where Core ML Tools would skip it with a
        warning: a block size that does not divide its axis, or that splits no axis.
        """
        where = f"layer '{name}'" if name else "weight"
        if len(shape) < 2:
            raise ConfigError("granularity", f"{where}: weight of shape {list(shape)} has no input axis; Core ML Tools "
                              "quantizes weights of 2 or more dimensions")
        if self.granularity == "per_tensor":
            return tuple(shape)
        if self.granularity == "per_channel":
            return (1, *shape[1:])
        return self._per_block_sizes(tuple(shape), where)

    def _per_block_sizes(self, shape: tuple[int, ...], where: str) -> tuple[int, ...]:
        """Core ML Tools' `ConfigValidator.sanitize_quantization_block_size`, raising where it skips."""
        sizes = (self.block_size,) if isinstance(self.block_size, int) else self.block_size
        if len(sizes) > len(shape):
            raise ConfigError("block_size", f"{where}: {list(sizes)} has more entries than its shape {list(shape)}")
        for axis in range(2, len(sizes)):
            if sizes[axis] not in (0, shape[axis]):
                raise ConfigError("block_size", f"{where}: axis {axis} of shape {list(shape)} cannot be split "
                                  f"(block size {sizes[axis]}); give 0 or {shape[axis]}")
        out_size, in_size = sizes[:2] if len(sizes) >= 2 else (0, sizes[0])
        split_out, split_in = 0 < out_size < shape[0], 0 < in_size < shape[1]
        if not (split_out or split_in):
            raise ConfigError(
                "block_size",
                f"{where}: block_size {self.block_size!r} splits neither axis of shape {list(shape)} (each block "
                "would be a whole channel or the whole tensor); use granularity per_channel or per_tensor, or give "
                "this layer its own config in module_name_configs",
            )
        for axis, size, split in ((0, out_size, split_out), (1, in_size, split_in)):
            if split and shape[axis] % size:
                raise ConfigError(
                    "block_size",
                    f"{where}: block size {size} does not divide its {shape[axis]} elements along axis {axis} "
                    f"(shape {list(shape)}); choose a divisor or give this layer its own config in module_name_configs",
                )
        if not split_in and in_size not in (0, shape[1]):
            raise ConfigError("block_size", f"{where}: block size {in_size} along axis 1 does not divide its "
                              f"{shape[1]} elements (shape {list(shape)})")
        return (out_size if split_out else (1 if split_in else shape[0]), in_size if split_in else shape[1], *shape[2:])

    def check_weight(self, shape: tuple[int, ...], name: str) -> None:
        """Reject, naming the layer, a config this weight's shape cannot take."""
        self.block_sizes_for(shape, name)


@dataclass
class PostTrainingQuantizerConfig(OptimizationConfig):
    """Which modules are quantized how: global_config, module_type_configs, module_name_configs.

    As in Core ML Tools, an empty config quantizes every supported module to int8, per channel, symmetric.
    """

    module_config_class: ClassVar[type] = ModulePostTrainingQuantizerConfig


def rtn_quantize_weight(weight: torch.Tensor, config: ModulePostTrainingQuantizerConfig) -> QuantizedWeight:
    """Round every element of `weight` to the nearest point of its block's uniform grid.

    Computed in float32 (a float16 or bfloat16 weight is widened exactly first); the scales, zero
    points and integers are Core ML Tools' for the same float32 weight. Raises `ConfigError` when
    the config does not fit the weight's shape, `ValueError` when the weight is not finite.
    """
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"weight of shape {list(w.shape)} holds NaN or infinite values; it cannot be quantized")
    block_sizes = config.block_sizes_for(tuple(w.shape))
    n_bits, signed, scheme = config.weight_n_bits, config.signed, config.quantization_scheme
    scale, zero_point = uniform_grid(w, block_sizes, n_bits, signed, scheme)
    q = quantize_blocks(w, scale, zero_point, block_sizes, *quant_range(n_bits, signed, scheme))
    return QuantizedWeight.from_integers(q, scale, zero_point, n_bits=n_bits, signed=signed, block_sizes=block_sizes)


def rtn_compress_unit(
    weight: torch.Tensor,
    config: ModulePostTrainingQuantizerConfig,
    *,
    seed: int,
    sensitivity: torch.Tensor | None = None,
) -> QuantizedWeight:
    """A job stage's step for one weight: `rtn_quantize_weight`. RTN is deterministic and data-free, so
    `seed` changes nothing, and sensitivities are refused rather than ignored."""
    del seed
    if sensitivity is not None:
        raise ValueError("rtn is data-free: it takes no sensitivities (its stage must declare no statistic)")
    return rtn_quantize_weight(weight, config)


class PostTrainingQuantizer:
    """Quantize a model's weights in memory: `PostTrainingQuantizer(model, config).compress()`.

    As in Core ML Tools, the returned model holds the weights quantized and dequantized (float
    values on the grid). `compressed` maps each unit's module name to its `QuantizedWeight`, whose
    `decode()` is exactly the weight the model holds. Tied weights are quantized once; a config
    that would treat the names of one tied tensor differently is rejected, naming them all.

    Args:
        model: the module to quantize.
        config: which modules, how; None: every supported module, int8 per channel symmetric.

    Example:
        >>> config = PostTrainingQuantizerConfig.from_dict({"global_config": {"weight_dtype": "int4",
        ...     "granularity": "per_block", "block_size": 32}, "module_name_configs": {"lm_head": None}})
        >>> quantized = PostTrainingQuantizer(model, config).compress()  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, config: PostTrainingQuantizerConfig | None = None):
        self._model = model
        self._config = config if config is not None else PostTrainingQuantizerConfig()
        self.compressed: dict[str, QuantizedWeight] = {}
        self._summaries: dict[str, dict] = {}

    def plan(self, model: nn.Module | None = None) -> Plan:
        """The units to quantize and their configs, validated before any work; `.skipped` says what is left alone."""
        return plan_units(model if model is not None else self._model, self._config)

    def compress(self, inplace: bool = False) -> nn.Module:
        """Quantize every module the config selects; returns the model with the dequantized weights.

        Args:
            inplace: modify the model passed in (True) or a deep copy of it (False, the default).
        """
        model = self._model if inplace else copy.deepcopy(self._model)
        self.compressed, self._summaries = {}, {}
        plan = self.plan(model)
        _log_skipped(plan)
        for planned in plan:
            weight = get_weight(model, planned.unit)
            quantized = rtn_quantize_weight(weight, planned.config)
            decoded = quantized.decode()
            error = float((decoded - weight.detach().to(torch.float32)).square().mean().sqrt())
            set_weight(model, planned.unit, decoded)
            self.compressed[planned.unit.name] = quantized
            self._summaries[planned.unit.name] = {
                **quantized_summary(quantized, planned.config),
                "tied_names": list(planned.unit.aliases),
                "error": error,
            }
        return model

    def report(self) -> dict[str, dict]:
        """Per quantized module: dtype, scheme, granularity, block sizes, parameter count, compressed bytes,
        and `error`, the root mean square of (dequantized - original) (Core ML Tools' report's `error`)."""
        return {name: dict(summary) for name, summary in self._summaries.items()}


def quantized_summary(q: QuantizedWeight, config: ModulePostTrainingQuantizerConfig) -> dict:
    """One quantized weight as `PostTrainingQuantizer.report()` shows it."""
    return {
        "weight_dtype": config.weight_dtype,
        "n_bits": q.n_bits,
        "quantization_scheme": config.quantization_scheme,
        "granularity": q.granularity,
        "block_sizes": list(q.block_sizes),
        "scale_shape": list(q.scale_shape),
        "num_params": q.numel,
        "nbytes": q.nbytes,
    }


def _log_skipped(plan: Plan) -> None:
    """One log line per supported module left alone, one per unsupported type (with a count)."""
    for skipped in plan.skipped:
        if skipped.reason != UNSUPPORTED_TYPE:
            log.info("left alone: %s (%s): %s", " = ".join(skipped.names), skipped.module_type, skipped.reason)
    by_type = Counter(s.module_type for s in plan.skipped if s.reason == UNSUPPORTED_TYPE)
    for module_type, count in by_type.items():
        log.info("left alone: %d %s module(s): type not supported by quantization", count, module_type)
