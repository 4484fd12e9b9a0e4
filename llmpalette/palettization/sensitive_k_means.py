"""Sensitive K-Means (SqueezeLLM): k-means weighted by each weight's Fisher sensitivity, with optional
dense-and-sparse outliers.

Mirrors `coremltools.optimize.torch.palettization.SKMPalettizer`, `SKMPalettizerConfig` and
`ModuleSKMPalettizerConfig` (Core ML Tools 9.0): the same fields and the same `compress(dataloader,
loss_fn, sensitivity_path, num_kmeans_workers, num_sensitivity_workers, inplace, ...)`. The
differences: the clustering is the exact weighted 1-D k-means (the optimum of sum F (w - c)^2 per
group, in O(n) memory per group); sensitivities are per sample (a batch is split into samples);
they are not rescaled or clipped (weighted k-means does not care about their scale, and a weight
with zero sensitivity does not pull a centroid); outliers (`outlier_fraction`) are llmpalette's.
`skm_palettize_weight` is the whole algorithm for one tensor; sensitivities come from
`llmpalette.calibration.fisher`.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from llmpalette import distributed
from llmpalette.calibration.fisher import LossFn, ShardPlan, causal_lm_loss, fisher_sums, own_samples
from llmpalette.calibration.sharded import fisher_sums_sharded, fsdp_requested
from llmpalette.config import OptimizationConfig
from llmpalette.errors import ConfigError
from llmpalette.layout.palettized import PalettizedWeight
from llmpalette.memory import return_freed_memory
from llmpalette.modules import get_weight, set_weight
from llmpalette.palettization.post_training import (
    ModulePostTrainingPalettizerConfig,
    Plan,
    kmeans_threads,
    palettize_weight,
    plan_units,
    relative_error,
    weight_summary,
)

log = logging.getLogger("llmpalette")

OutlierSelection = Literal["sensitivity", "magnitude", "sensitivity_and_magnitude"]


@dataclass
class ModuleSKMPalettizerConfig(ModulePostTrainingPalettizerConfig):
    """How one module's weight is palettized by Sensitive K-Means: every field of
    `ModulePostTrainingPalettizerConfig` (Core ML Tools' n_bits, lut_dtype, granularity, group_size,
    channel_axis, cluster_dim, enable_per_channel_scale; plus enforce_zero and weight_threshold), and:

    outlier_fraction: the fraction of the weight (0 <= f < 0.5, e.g. 0.005 for SqueezeLLM's 0.5%) kept
        exactly as a sparse part beside the LUT; those weights take no part in fitting the LUT.
    outlier_selection: which weights are kept: the most sensitive (`sensitivity`, largest Fisher
        value), the largest (`magnitude`, largest |w|), or half each (`sensitivity_and_magnitude`:
        the larger half of the budget by magnitude first, the rest by sensitivity).
    """

    outlier_fraction: float = 0.0
    outlier_selection: OutlierSelection = "sensitivity"

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.outlier_fraction < 0.5:
            raise ConfigError("outlier_fraction", f"must be in [0, 0.5), got {self.outlier_fraction}")


@dataclass
class SKMPalettizerConfig(OptimizationConfig):
    """Which modules Sensitive K-Means palettizes how, and its calibration settings.

    calibration_nsamples: calibration samples for the sensitivities (Core ML Tools' field, default 128).
    calibration_shard_size: samples per shard (default 1): shards are the units that ranks share and
        that a job checkpoints, and their sums are added in shard order (so the result depends on this
        value, and not on the number of ranks). Larger shards mean fewer exchanges between ranks; with 1,
        a single process needs no buffer beside the sums.
    gradient_checkpointing: recompute activations in the backward pass (for long sequences); the
        sensitivities do not change.
    """

    module_config_class: ClassVar[type] = ModuleSKMPalettizerConfig
    calibration_nsamples: int = 128
    calibration_shard_size: int = 1
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        if self.calibration_nsamples < 1:
            raise ConfigError("calibration_nsamples", f"must be >= 1, got {self.calibration_nsamples}")
        if self.calibration_shard_size < 1:
            raise ConfigError("calibration_shard_size", f"must be >= 1, got {self.calibration_shard_size}")


def outlier_mask(
    weight: torch.Tensor, sensitivity: torch.Tensor | None, fraction: float, selection: OutlierSelection = "sensitivity"
) -> torch.Tensor | None:
    """Bool mask of the `floor(fraction * numel)` weights to keep exactly (None when there are none).

    Ties are broken by position (the first wins), so the mask is deterministic.
    """
    count = int(fraction * weight.numel())
    if count == 0:
        return None
    if selection != "magnitude" and sensitivity is None:
        raise ValueError(f"outlier_selection '{selection}' needs sensitivities")
    flat = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    by_magnitude = count if selection == "magnitude" else (count + 1) // 2 if selection == "sensitivity_and_magnitude" else 0
    if by_magnitude:
        flat[_top(weight.detach().abs().flatten(), by_magnitude)] = True
    if count - by_magnitude:
        score = sensitivity.detach().to(torch.float32).flatten().masked_fill(flat, -1.0)
        flat[_top(score, count - by_magnitude)] = True
    return flat.view(weight.shape)


def _top(score: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the `count` largest scores; among equal scores the first positions win (no full sort)."""
    threshold = torch.topk(score, count, sorted=False).values.min()
    above = (score > threshold).nonzero().flatten()
    equal = (score == threshold).nonzero().flatten()[: count - above.numel()]
    return torch.cat([above, equal])


def skm_palettize_weight(
    weight: torch.Tensor, config: ModuleSKMPalettizerConfig, *, sensitivity: torch.Tensor, seed: int = 0
) -> PalettizedWeight:
    """Sensitive K-Means of one tensor: outliers (if configured) kept exactly, the rest clustered by
    k-means weighted with `sensitivity` (the Fisher sums, shape of `weight`)."""
    if tuple(sensitivity.shape) != tuple(weight.shape):
        raise ValueError(f"sensitivity of shape {list(sensitivity.shape)} does not match the weight's {list(weight.shape)}")
    mask = outlier_mask(weight, sensitivity, config.outlier_fraction, config.outlier_selection)
    return palettize_weight(weight, config, seed=seed, importance=sensitivity, outliers=mask)


def sensitivity_key(unit) -> str:
    """The name a unit's sensitivity is stored under: its parameter's full name (Core ML Tools' key)."""
    return f"{unit.name}.{unit.param}" if unit.name else unit.param


class SKMPalettizer:
    """Sensitive K-Means palettization in memory: `SKMPalettizer(model, config).compress(dataloader, loss_fn)`.

    Launched with several processes (`accelerate launch`, `torchrun`), the ranks share the samples
    (each computes its shards) and every rank ends with the same model. After `compress()`,
    `compressed` maps each unit's module name to its `PalettizedWeight` and `sensitivities` maps
    parameter names to their Fisher sums.
    """

    def __init__(self, model: nn.Module, config: SKMPalettizerConfig | None = None, *, seed: int = 0):
        self._model = model
        self._config = config if config is not None else SKMPalettizerConfig()
        self._seed = seed
        self.compressed: dict[str, PalettizedWeight] = {}
        self.sensitivities: Mapping[str, torch.Tensor] = {}
        self.errors: dict[str, dict[str, float]] = {}

    def plan(self, model: nn.Module | None = None) -> Plan:
        return plan_units(model if model is not None else self._model, self._config)

    def compute_sensitivity(
        self,
        dataloader: Iterable,
        loss_fn: LossFn | None = None,
        sensitivity_path: str | None = None,
        num_sensitivity_workers: int = 1,
        fsdp_auto_wrap_policy=None,
        *,
        model: nn.Module | None = None,
    ) -> dict[str, torch.Tensor]:
        """Fisher sums of the weights the config compresses, over the first `calibration_nsamples`
        samples of `dataloader` (batches are split into samples). `loss_fn(model, batch)` returns the
        loss (default: causal-LM cross-entropy of a token window). Saved to `sensitivity_path`
        (safetensors) when given.

        The workers are the processes of an `accelerate launch` (`num_sensitivity_workers` is accepted
        for Core ML Tools compatibility). Under several processes, `fsdp_auto_wrap_policy` (Core ML Tools'
        `ModuleWrapPolicy`, or module classes) or an Accelerate FSDP launch shards a copy of the model
        with FSDP for this pass (`calibration.sharded`); the sums are the same bits either way.
        """
        return_freed_memory()
        model = model if model is not None else self._model
        if num_sensitivity_workers > 1 and distributed.current_world().world_size == 1:
            log.warning("num_sensitivity_workers=%d: llmpalette's workers are the processes of `accelerate launch`; "
                        "running in this one process", num_sensitivity_workers)
        if dataloader is None:
            raise ConfigError("dataloader", "is required to compute sensitivities (or pass sensitivity_path)")
        world = distributed.current_world()
        plan = self.plan(model)
        params = {sensitivity_key(p.unit): get_weight(model, p.unit) for p in plan}
        sharded = world.world_size > 1 and (fsdp_auto_wrap_policy is not None or fsdp_requested())
        shards, samples = own_samples(dataloader, ShardPlan(self._config.calibration_nsamples, self._config.calibration_shard_size,
                                                            world.world_size), world.rank, sharded)
        owners = distributed.owners_by_size({n: p.numel() for n, p in params.items()}, world.world_size)
        options = {"wrap": fsdp_auto_wrap_policy} if sharded else {}
        totals = (fisher_sums_sharded if sharded else fisher_sums)(
            model, samples, loss_fn or causal_lm_loss, params, shards, world, owners=owners,
            gradient_checkpointing=self._config.gradient_checkpointing, **options)
        sensitivities = {name: distributed.broadcast_tensor(totals.get(name), params[name], owners[name]) for name in params}
        if sensitivity_path is not None and world.is_main:
            from safetensors.torch import save_file

            save_file({k: v.cpu().contiguous() for k, v in sensitivities.items()}, sensitivity_path)
        self.sensitivities = sensitivities
        return sensitivities

    def compress(
        self,
        dataloader: Iterable | None = None,
        loss_fn: LossFn | None = None,
        sensitivity_path: str | None = None,
        num_kmeans_workers: int | None = None,
        num_sensitivity_workers: int = 1,
        inplace: bool = False,
        fsdp_auto_wrap_policy=None,
    ) -> nn.Module:
        """Palettize every module the config selects with Sensitive K-Means; returns the model with
        the decoded weights.

        Args (Core ML Tools' names and order):
            dataloader: an iterable of batches (or samples); needed unless `sensitivity_path` is given.
            loss_fn: `loss_fn(model, batch) -> loss`; default: causal-LM loss of a token window.
            sensitivity_path: read the sensitivities from this file (safetensors, or Core ML Tools'
                torch-saved dict) instead of computing them.
            num_kmeans_workers: CPU threads for the k-means (None: every core); the result does not change.
            num_sensitivity_workers: see `compute_sensitivity`.
            inplace: modify the model passed in (True) or a deep copy of it (False).
        """
        return_freed_memory()
        model = self._model if inplace else copy.deepcopy(self._model)
        plan = self.plan(model)
        if sensitivity_path is not None:
            self.sensitivities = load_sensitivities(sensitivity_path)
        else:
            self.compute_sensitivity(dataloader, loss_fn, None, num_sensitivity_workers, fsdp_auto_wrap_policy, model=model)
        plan.log_skipped()
        self.compressed, self.errors = {}, {}
        with kmeans_threads(num_kmeans_workers):
            for planned in plan:
                key = sensitivity_key(planned.unit)
                if key not in self.sensitivities:
                    raise ConfigError("sensitivity_path", f"has no sensitivity for '{key}'")
                weight = get_weight(model, planned.unit)
                sensitivity = self.sensitivities[key].to(weight.device)
                palettized = skm_palettize_weight(weight, planned.config, sensitivity=sensitivity, seed=self._seed)
                decoded = palettized.decode()
                self.errors[planned.unit.name] = {"rel_sq_error": relative_error(weight, decoded),
                                                  "fisher_rel_sq_error": relative_error(weight, decoded, sensitivity)}
                set_weight(model, planned.unit, decoded)
                self.compressed[planned.unit.name] = palettized
        return model

    def report(self) -> dict[str, dict]:
        """Per compressed module: LUT shape, bits, outliers, compressed bytes and both errors."""
        return {name: {**weight_summary(p), "outliers": p.n_outliers, **self.errors.get(name, {})}
                for name, p in self.compressed.items()}


def load_sensitivities(path: str | Path) -> Mapping[str, torch.Tensor]:
    """Sensitivities saved by `compute_sensitivity` (safetensors), by Core ML Tools (torch.save of a dict),
    or a job's finished checkpoint folder (`JOB/stats/0-fisher/sNNNNN/`, one `MODULE.safetensors` per layer).
    Safetensors are read one tensor at a time when asked for, and a torch-saved dict is memory-mapped, so
    clustering holds one layer's sensitivities, not the model's."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ConfigError("sensitivity_path", f"folder {path} holds no .safetensors files")
        return _LazyTensors({f"{file.stem}.weight": (file, "fisher") for file in files})
    if not path.is_file():
        raise ConfigError("sensitivity_path", f"no such file {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return _LazyTensors({key: (path, key) for key in f.keys()})
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        return torch.load(str(path), map_location="cpu", weights_only=True)


class _LazyTensors(Mapping):
    """name -> tensor, each read from its safetensors file when asked for."""

    def __init__(self, where: dict[str, tuple[Path, str]]):
        self._where = where

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file, key = self._where[name]
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
