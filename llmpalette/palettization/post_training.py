"""Data-free post-training palettization: exact k-means of each weight group into a LUT.

Mirrors `coremltools.optimize.torch.palettization.PostTrainingPalettizer` and its configs.
`palettize_weight` is the whole algorithm for one tensor (pure: tensor in, `PalettizedWeight` out);
`PostTrainingPalettizer` applies it to the modules a config selects, in memory, with no files.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import numba
import torch
from torch import nn

from llmpalette.config import ModuleOptimizationConfig, OptimizationConfig, freeze_config
from llmpalette.errors import ConfigError
from llmpalette.layout.palettized import OUTLIER_VALUE_DTYPE, PalettizedWeight, group_view
from llmpalette.maths.assign import nearest
from llmpalette.maths.kmeans1d import kmeans_1d
from llmpalette.maths.kmeans_vector import kmeans_vector
from llmpalette.maths.lut import dequantize_lut, quantize_lut
from llmpalette.memory import return_freed_memory
from llmpalette.modules import SUPPORTED_MODULES, WeightUnit, get_weight, set_weight, weight_units

log = logging.getLogger("llmpalette")
UNSUPPORTED_TYPE = "type not supported"  # SkippedModule.reason of a module palettization cannot take

Granularity = Literal["per_tensor", "per_channel", "per_grouped_channel"]
LutDtype = Literal["float32", "float16", "int8", "uint8"]

_LUT_DTYPE_SPELLINGS = {
    "f32": "float32", "fp32": "float32", "float32": "float32",
    "f16": "float16", "fp16": "float16", "float16": "float16",
    "i8": "int8", "int8": "int8", "u8": "uint8", "uint8": "uint8",
}
_TORCH_LUT_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int8: "int8", torch.uint8: "uint8"}


@dataclass
class ModulePostTrainingPalettizerConfig(ModuleOptimizationConfig):
    """How one module's weight is palettized (Core ML Tools' names, plus `enforce_zero` and `weight_threshold`).

    n_bits: 1..8; the LUT has 2**n_bits entries.
    granularity: per_tensor (one LUT), per_channel (one LUT per channel along `channel_axis`),
        per_grouped_channel (one LUT per `group_size` consecutive channels along `channel_axis`).
    channel_axis: 0 (output channels) or 1 (input channels).
    cluster_dim: entries per LUT row (vector palettization); as in Core ML Tools, a vector is
        `cluster_dim` consecutive channels along `channel_axis` (output channels by default), and
        `cluster_dim` must divide the channels each LUT serves.
    enable_per_channel_scale: divide each output channel by its max |w| before clustering and keep
        the scale (decoded weight = LUT value * scale). Scalar LUTs only.
    enforce_zero: the LUT entry nearest to zero is set to exactly 0.
    lut_dtype: LUT storage: float32, float16, or int8 / uint8 (the LUT itself quantized, with a scale
        per LUT; Core ML Tools' `lut_dtype`). torch dtypes and 'f16'/'i8'/'u8' spellings are accepted.
    weight_threshold: only weights with more elements than this are palettized (default 0: every
        supported layer, as Core ML Tools' PostTrainingPalettizer does; a list of configs for one
        module type picks its entry by this threshold).
    """

    n_bits: int = 4
    granularity: Granularity = "per_tensor"
    group_size: int | None = None
    channel_axis: int = 0
    cluster_dim: int | None = None
    enable_per_channel_scale: bool = False
    enforce_zero: bool = False
    lut_dtype: LutDtype = "float32"
    weight_threshold: int = 0

    _rejected_fields: ClassVar[dict[str, str]] = {
        "enable_fast_kmeans_mode": "not needed: llmpalette's k-means is exact on the raw weights and fast; remove it",
        "rounding_precision": "not needed: llmpalette does not round weights before k-means; remove it",
        "num_kmeans_workers": "not a config field here: llmpalette's k-means kernel uses every core; remove it",
    }

    def _normalize(self, name, value):
        if name == "lut_dtype":
            if value is None:
                return "float32"
            if isinstance(value, torch.dtype):
                return _TORCH_LUT_DTYPES.get(value, str(value))
            if isinstance(value, str):
                return _LUT_DTYPE_SPELLINGS.get(value.removeprefix("torch."), value)
        return value

    def validate(self) -> None:
        if not 1 <= self.n_bits <= 8:
            raise ConfigError("n_bits", f"must be between 1 and 8, got {self.n_bits}")
        if self.channel_axis not in (0, 1):
            raise ConfigError("channel_axis", f"must be 0 or 1, got {self.channel_axis}")
        if self.granularity == "per_grouped_channel":
            if self.group_size is None:
                raise ConfigError("group_size", "is required with granularity per_grouped_channel")
            if self.group_size < 1:
                raise ConfigError("group_size", f"must be a positive integer, got {self.group_size}")
        elif self.group_size is not None:
            raise ConfigError("group_size", f"only applies to granularity per_grouped_channel, not {self.granularity}")
        if self.cluster_dim is not None and self.cluster_dim < 1:
            raise ConfigError("cluster_dim", f"must be a positive integer, got {self.cluster_dim}")
        if self.vector_size > 1 and self.enable_per_channel_scale:
            raise ConfigError("enable_per_channel_scale", "is not supported with cluster_dim > 1")
        if self.weight_threshold < 0:
            raise ConfigError("weight_threshold", f"must be >= 0, got {self.weight_threshold}")

    @property
    def vector_size(self) -> int:
        return self.cluster_dim or 1

    def channels_per_lut(self, shape: tuple[int, ...]) -> int:
        if self.granularity == "per_tensor":
            return shape[self.channel_axis]
        if self.granularity == "per_channel":
            return 1
        return self.group_size

    def check_weight(self, shape: tuple[int, ...], name: str) -> None:
        """Reject, naming the layer, a config this weight's shape cannot take."""
        if len(shape) < 2:
            raise ConfigError("channel_axis", f"layer '{name}': weight of shape {list(shape)} has no channel axis")
        channels = shape[self.channel_axis]
        if self.granularity == "per_grouped_channel" and channels % self.group_size:
            raise ConfigError(
                "group_size",
                f"layer '{name}': group_size {self.group_size} does not divide its {channels} channels along axis "
                f"{self.channel_axis}; choose a divisor or give this layer its own config in module_name_configs",
            )
        if self.vector_size > 1:
            per_lut = self.channels_per_lut(shape)
            if per_lut % self.vector_size:
                raise ConfigError(
                    "cluster_dim",
                    f"layer '{name}': cluster_dim {self.vector_size} does not divide the {per_lut} channels along axis "
                    f"{self.channel_axis} that each LUT serves (vectors run along channel_axis, as in Core ML Tools)",
                )


@dataclass
class PostTrainingPalettizerConfig(OptimizationConfig):
    """Which modules are palettized how: global_config, module_type_configs, module_name_configs."""

    module_config_class: ClassVar[type] = ModulePostTrainingPalettizerConfig


def vector_axis(channel_axis: int) -> int:
    """Vectors (cluster_dim > 1) run along the channel axis, as in Core ML Tools (its `vector_axis`
    metadata and iOS18's `constexpr_lut_to_dense`)."""
    return channel_axis


def palettize_weight(
    weight: torch.Tensor,
    config: ModulePostTrainingPalettizerConfig,
    *,
    seed: int = 0,
    importance: torch.Tensor | None = None,
    outliers: torch.Tensor | None = None,
) -> PalettizedWeight:
    """Palettize one weight tensor: the optimal LUT per group (exact 1-D k-means; Lloyd for vectors) and indices.

    importance: per-weight weights of the k-means (Fisher sensitivities, shape of `weight`, >= 0):
        each LUT minimises sum importance * (w - w_hat)^2 over its group (exactly for scalar LUTs;
        a vector weighs by the sum of its elements' importance). None: plain k-means.
    outliers: bool mask (shape of `weight`) of weights kept exactly in the sparse part
        (dense-and-sparse); they take no part in fitting the LUTs.
    """
    w = weight.detach().to(torch.float32)
    imp = None if importance is None else importance.detach().to(device=w.device, dtype=torch.float32)
    if outliers is not None and not bool(outliers.any()):
        outliers = None
    if outliers is not None:
        outliers = outliers.to(w.device)
        imp = (torch.ones_like(w) if imp is None else imp).masked_fill(outliers, 0.0)
    channel_scale = None
    if config.enable_per_channel_scale:
        kept = w.abs() if outliers is None else w.abs().masked_fill(outliers, 0.0)  # outliers do not set the scale
        channel_scale = kept.amax(dim=tuple(range(1, w.dim())))  # [out]
        channel_scale = torch.where(channel_scale > 0, channel_scale, torch.ones_like(channel_scale))
        view = channel_scale.view(-1, *([1] * (w.dim() - 1)))
        w = w / view
        if imp is not None:
            imp = imp * view.square()  # the error in the unscaled weight: imp * s^2 * (w' - w_hat')^2
    d = config.vector_size
    axis_v = vector_axis(config.channel_axis) if d > 1 else None
    group_size = config.channels_per_lut(tuple(w.shape))
    groups = group_view(w, config.channel_axis, group_size, d, axis_v)  # [G, n, d]
    group_weights = None if imp is None else group_view(imp, config.channel_axis, group_size, d, axis_v).sum(dim=-1)
    group_outliers = None
    if outliers is not None and d > 1:
        # A vector holding an outlier takes no part in the LUT; it is assigned by its other elements alone.
        group_outliers = group_view(outliers, config.channel_axis, group_size, d, axis_v)  # [G, n, d]
        group_weights = group_weights.masked_fill(group_outliers.any(dim=-1), 0.0)
    k = 2**config.n_bits
    if d == 1:
        centroids, _ = kmeans_1d(groups[..., 0], k, group_weights)
        lut = centroids.unsqueeze(-1)  # [G, K, 1]
    else:
        lut, _ = kmeans_vector(groups, k, group_weights, seed=seed)
    if config.enforce_zero:
        lut = _pin_zero(lut)
    lut_q, lut_scale, lut_zero_point = _store_lut(lut, config.lut_dtype)
    decoded = lut_q.to(torch.float32) if lut_scale is None else dequantize_lut(lut_q, lut_scale, lut_zero_point)
    labels = nearest(groups, decoded)
    if group_outliers is not None:
        _assign_around_outliers(labels, groups, decoded, group_outliers)
    elif outliers is not None:  # the index under a scalar outlier is never read: 0, whatever the outlier's value
        labels.masked_fill_(group_view(outliers, config.channel_axis, group_size, 1, None)[..., 0], 0)
    positions = values = None
    if outliers is not None:
        positions = outliers.detach().flatten().nonzero().flatten()
        values = weight.detach().flatten()[positions].to(OUTLIER_VALUE_DTYPE)
        positions = positions.to(torch.int32)
    return PalettizedWeight.from_assignment(
        lut_q,
        labels,
        shape=tuple(weight.shape),
        n_bits=config.n_bits,
        channel_axis=config.channel_axis,
        group_size=group_size,
        cluster_dim=d,
        vector_axis=axis_v,
        lut_scale=lut_scale,
        lut_zero_point=lut_zero_point,
        channel_scale=channel_scale,
        outlier_positions=positions,
        outlier_values=values,
    )


def _assign_around_outliers(labels: torch.Tensor, groups: torch.Tensor, lut: torch.Tensor, mask: torch.Tensor) -> None:
    """Relabel, in place, each vector holding an outlier by the distance over its other elements only."""
    g, i = mask.any(dim=-1).nonzero(as_tuple=True)
    if g.numel():
        keep = (~mask[g, i]).unsqueeze(1)  # [m, 1, d]
        diff = (groups[g, i].unsqueeze(1) - lut[g]) * keep  # [m, K, d]
        labels[g, i] = diff.to(torch.float64).square().sum(dim=-1).argmin(dim=-1)


def _pin_zero(lut: torch.Tensor) -> torch.Tensor:
    """Set each LUT's entry nearest the origin to exactly zero. lut [G, K, d]."""
    nearest_zero = lut.norm(dim=-1).argmin(dim=1)  # [G]
    pinned = lut.clone()
    pinned[torch.arange(lut.shape[0]), nearest_zero] = 0
    return pinned


def _store_lut(lut: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if dtype == "float32":
        return lut.to(torch.float32), None, None
    if dtype == "float16":
        return lut.to(torch.float16), None, None
    return quantize_lut(lut.to(torch.float32), dtype)


def relative_error(weight: torch.Tensor, decoded: torch.Tensor, importance: torch.Tensor | None = None) -> float:
    """||W - W_hat||^2 / ||W||^2, the per-layer reconstruction error the reports show; with
    `importance` F, the Fisher-weighted sum F (W - W_hat)^2 / sum F W^2."""
    w = weight.detach().to(torch.float64)
    f = torch.ones_like(w) if importance is None else importance.detach().to(torch.float64)
    denom = float((f * w.square()).sum())
    return float((f * (w - decoded.detach().to(torch.float64)).square()).sum()) / denom if denom > 0 else 0.0


@dataclass(frozen=True)
class PlannedUnit:
    """A weight unit and the config that compresses it."""

    unit: WeightUnit
    config: ModulePostTrainingPalettizerConfig


@dataclass(frozen=True)
class SkippedModule:
    """A module with weights that is left alone, and why (for the log and the report)."""

    names: tuple[str, ...]
    module_type: str
    reason: str


MANY_SKIPPED = 8  # more modules left alone for one reason than this: one log line with their count


class Plan(list):
    """The units to compress, in model order (a list of PlannedUnit), and `skipped`: what is left alone."""

    def __init__(self, units: list[PlannedUnit], skipped: list[SkippedModule]):
        super().__init__(units)
        self.skipped = skipped

    def log_skipped(self) -> None:
        """One log line per supported module left alone (one line with a count for a reason shared by more
        than MANY_SKIPPED modules, e.g. the blocks outside a GPTQ `layers`), one per unsupported type."""
        by_reason: dict[str, list[SkippedModule]] = {}
        for s in self.skipped:
            if s.reason != UNSUPPORTED_TYPE:
                by_reason.setdefault(s.reason, []).append(s)
        for reason, modules in by_reason.items():
            if len(modules) > MANY_SKIPPED:
                names = ", ".join(" = ".join(s.names) for s in modules[:2])
                log.info("left alone: %d modules (%s, ...): %s", len(modules), names, reason)
                continue
            for s in modules:
                log.info("left alone: %s (%s): %s", " = ".join(s.names), s.module_type, s.reason)
        by_type = Counter(s.module_type for s in self.skipped if s.reason == UNSUPPORTED_TYPE)
        for module_type, count in by_type.items():
            log.info("left alone: %d %s module(s): a type this algorithm does not compress", count, module_type)


class PostTrainingPalettizer:
    """Palettize a model's weights in memory: `PostTrainingPalettizer(model, config).compress()`.

    After `compress()`, `compressed` maps each unit's module name to its `PalettizedWeight`, and the
    returned model's weights are exactly those weights decoded. Tied weights are compressed once; a
    config that would treat the names of one tied tensor differently is rejected, naming them all.
    """

    def __init__(self, model: nn.Module, config: PostTrainingPalettizerConfig | None = None, *, seed: int = 0):
        self._model = model
        self._config = config if config is not None else PostTrainingPalettizerConfig()
        self._seed = seed
        self.compressed: dict[str, PalettizedWeight] = {}

    def plan(self, model: nn.Module | None = None) -> Plan:
        """The units to compress and their configs, validated before any work; `.skipped` says what is left alone."""
        return plan_units(model if model is not None else self._model, self._config)

    def compress(self, num_kmeans_workers: int | None = None, inplace: bool = False) -> nn.Module:
        """Palettize every module the config selects; returns the model with the decoded weights.

        Args:
            num_kmeans_workers: CPU threads for the k-means (Core ML Tools' parameter, in its place);
                None uses every core. The result does not depend on it.
            inplace: modify the model passed in (True) or a deep copy of it (False, the default).
        """
        return_freed_memory()
        model = self._model if inplace else copy.deepcopy(self._model)
        self.compressed = {}
        plan = self.plan(model)
        plan.log_skipped()
        with kmeans_threads(num_kmeans_workers):
            for planned in plan:
                weight = get_weight(model, planned.unit)
                palettized = palettize_weight(weight, planned.config, seed=self._seed)
                set_weight(model, planned.unit, palettized.decode())
                self.compressed[planned.unit.name] = palettized
        return model

    def report(self) -> dict[str, dict]:
        """Per compressed module: LUT shape, bits, cluster dim, parameter count and compressed bytes."""
        return {name: weight_summary(p) for name, p in self.compressed.items()}


def weight_summary(p: PalettizedWeight) -> dict:
    """One compressed weight as the palettizers' `report()` shows it."""
    return {
        "n_bits": p.n_bits,
        "cluster_dim": p.cluster_dim,
        "group_size": p.group_size,
        "lut_shape": list(p.lut.shape),
        "num_params": int(torch.Size(p.shape).numel()),
        "nbytes": p.nbytes,
    }


@contextlib.contextmanager
def kmeans_threads(workers: int | None) -> Iterator[None]:
    """Cap the threads of the k-means kernels (numba and torch) at `workers`; None leaves them as they are."""
    if workers is None:
        yield
        return
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError("num_kmeans_workers", f"must be a positive integer or None, got {workers!r}")
    before_numba, before_torch = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(min(workers, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(workers)
    try:
        yield
    finally:
        numba.set_num_threads(before_numba)
        torch.set_num_threads(before_torch)


def plan_units(model: nn.Module, config: OptimizationConfig,
               outside: Callable[[WeightUnit], str | None] | None = None) -> Plan:
    """Resolve the config for every weight unit of `model`; tied names must agree. Raises ConfigError.

    Returns the units to compress; `plan.skipped` lists every module with a weight that is left alone
    and why (config None, weight_threshold, or a type palettization does not support).
    outside(unit): why an algorithm cannot take this unit at all (e.g. not a Linear of a decoder block
    for GPTQ), or None; such units are skipped with that reason before their config is checked.
    """
    config.check_model(model)
    planned, skipped = [], []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not isinstance(module, SUPPORTED_MODULES):
            skipped.append(SkippedModule((name,), type(module).__name__, UNSUPPORTED_TYPE))
    for unit in weight_units(model):
        reason = outside(unit) if outside is not None else None
        if reason is not None:
            skipped.append(SkippedModule(unit.names, unit.module_type, reason))
            continue
        resolved = {name: config.resolve(name, model.get_submodule(name)) for name in unit.names}
        configs = {name: chosen for name, (chosen, _) in resolved.items()}
        distinct = {freeze_config(c) for c in configs.values()}
        if len(distinct) > 1:
            listing = ", ".join(f"{n} -> {'skip' if c is None else 'compress'}" for n, c in configs.items())
            raise ConfigError(
                "module_name_configs",
                f"{' and '.join(unit.names)} share one tensor (tied weights) but the config treats them differently "
                f"({listing}); give all of them the same config, e.g. null for each",
            )
        chosen = configs[unit.name]
        if chosen is None:
            skipped.append(SkippedModule(unit.names, unit.module_type, f"config null ({resolved[unit.name][1]})"))
            continue
        numel = get_weight(model, unit).numel()
        if numel <= chosen.weight_threshold:
            skipped.append(SkippedModule(unit.names, unit.module_type, f"{numel} elements <= weight_threshold {chosen.weight_threshold}"))
            continue
        try:
            chosen.check_weight(unit.shape, unit.name)
        except ConfigError as e:  # name the entry the field sits in: global_config.block_size, ...
            raise ConfigError(f"{resolved[unit.name][1]}.{e.field}" if e.field else resolved[unit.name][1], e.message) from None
        planned.append(PlannedUnit(unit, chosen))
    return Plan(planned, skipped)
