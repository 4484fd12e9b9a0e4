"""GPTQ in memory with Core ML Tools 9.0's names: `LayerwiseCompressor(model, config).compress(dataloader,
device)`, configured by `LayerwiseCompressorConfig` (`layers`, `calibration_nsamples`, and per-module
configs chosen by their `algorithm`: `gptq`, GPTQ onto RTN's uniform grid (`ModuleGPTQConfig`), or
`lut_gptq`, GPTQ's error feedback onto per-grouped-channel LUTs (`ModuleLUTGPTQConfig`, ours)).

The model is compressed one decoder block at a time (`quantization.layerwise`): the block's Linear
layers' Hessians come from the calibration samples' inputs to the block, under the compressed weights
of the blocks before it. Under `accelerate launch` the ranks share the samples and every rank ends
with the same model. The job runner (`llmpalette compress` with `algorithm: gptq`) uses the same
planning and layer maths, and checkpoints each block.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from llmpalette import distributed
from llmpalette.calibration.fisher import own_samples
from llmpalette.calibration.sums import ShardPlan
from llmpalette.config import ModuleOptimizationConfig, OptimizationConfig, module_from_dict
from llmpalette.errors import ConfigError
from llmpalette.maths.gptq import SingularHessian, output_error
from llmpalette.memory import return_freed_memory
from llmpalette.modules import WeightUnit
from llmpalette.palettization.gptq_lut import ModuleLUTGPTQConfig, gptq_palettize_weight
from llmpalette.palettization.post_training import Plan, plan_units, relative_error
from llmpalette.quantization.gptq import ModuleGPTQConfig, gptq_quantize_weight
from llmpalette.quantization.layerwise import compress_layerwise

log = logging.getLogger("llmpalette")

# A module config's `algorithm` picks its class, as in Core ML Tools' LayerwiseCompressionAlgorithmConfig registry.
LAYERWISE_ALGORITHMS: dict[str, type[ModuleOptimizationConfig]] = {"gptq": ModuleGPTQConfig, "lut_gptq": ModuleLUTGPTQConfig}


@dataclass
class LayerwiseCompressorConfig(OptimizationConfig):
    """Which Linear layers of which blocks GPTQ compresses how, and its calibration settings.

    layers: the blocks, compressed in order: regular expressions matched against whole module names
        (`model\\.layers\\.\\d+`), or the modules themselves (Python only), as in Core ML Tools. Default:
        the model's decoder blocks (its `_no_split_modules` classes, in model order); Core ML Tools'
        default, the model's children, does not fit a transformers model.
    global_config / module_type_configs / module_name_configs: per-module configs; each dictionary's
        `algorithm` (`gptq`, the default, or `lut_gptq`) chooses `ModuleGPTQConfig` or `ModuleLUTGPTQConfig`.
    input_cacher: only "default": the first block's inputs are caught by a hook, for any model.
    calibration_nsamples: calibration samples (default 128, Core ML Tools' field).
    calibration_shard_size: samples per shard, the unit ranks share; Hessians are summed shard by shard in
        shard order, so the result depends on it but not on the number of ranks (ours; default 1).
    true_sequential: measure each group of layers reading the same input (q/k/v, o_proj, gate/up,
        down_proj) after the groups before it are compressed (the GPTQ paper's order; ours, default
        True); False measures every layer of a block on the block's original inputs, as Core ML Tools does.
    """

    module_config_class: ClassVar[type] = ModuleGPTQConfig
    layers: list[Any] | None = None
    input_cacher: str = "default"
    calibration_nsamples: int = 128
    calibration_shard_size: int = 1
    true_sequential: bool = True

    def validate(self) -> None:
        if self.calibration_nsamples < 1:
            raise ConfigError("calibration_nsamples", f"must be >= 1, got {self.calibration_nsamples}")
        if self.calibration_shard_size < 1:
            raise ConfigError("calibration_shard_size", f"must be >= 1, got {self.calibration_shard_size}")
        if self.input_cacher != "default":
            raise ConfigError("input_cacher", f"only 'default' (a hook catches the first block's inputs), got {self.input_cacher!r}")
        for i, layer in enumerate(self.layers or []):
            if isinstance(layer, str):
                try:
                    re.compile(layer)
                except re.error as e:
                    raise ConfigError(f"layers[{i}]", f"not a valid regular expression ({e}): {layer!r}") from None
            elif not isinstance(layer, nn.Module):
                raise ConfigError(f"layers[{i}]", f"expected a module name (regular expression) or a module, got {layer!r}")

    def as_dict(self) -> dict[str, Any]:
        raw = super().as_dict()
        if self.layers is not None and not all(isinstance(layer, str) for layer in self.layers):
            raw["layers"] = [layer if isinstance(layer, str) else type(layer).__name__ for layer in self.layers]
        return raw

    @classmethod
    def _module_config_from_dict(cls, value: Any, field: str) -> ModuleOptimizationConfig:
        name = value.get("algorithm", "gptq") if isinstance(value, Mapping) else "gptq"
        if name not in LAYERWISE_ALGORITHMS:
            raise ConfigError(f"{field}.algorithm", f"unknown algorithm {name!r}; available: {', '.join(LAYERWISE_ALGORITHMS)}")
        return module_from_dict(LAYERWISE_ALGORITHMS[name], value, field)

    def get_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The blocks (name, module) in model order. Raises ConfigError when none is found, or when an
        entry of `layers` matches no module."""
        modules = list(model.named_modules())
        if self.layers is None:
            classes = set(getattr(model, "_no_split_modules", None) or ())
            blocks = [(n, m) for n, m in modules if type(m).__name__ in classes]
            if not blocks:
                raise ConfigError("layers", f"found no decoder blocks in {type(model).__name__} (it names no _no_split_modules); "
                                  "list them, e.g. layers: ['model\\.layers\\.\\d+']")
            return blocks
        matched: set[str] = set()
        for i, layer in enumerate(self.layers):
            found = [n for n, m in modules if (re.fullmatch(layer, n) if isinstance(layer, str) else m is layer)]
            if not found:
                shown = f"'{layer}'" if isinstance(layer, str) else repr(type(layer).__name__)  # a pattern as typed
                raise ConfigError(f"layers[{i}]", f"{shown} matches no module "
                                  f"of {type(model).__name__} (module names look like {_example_names(modules)})")
            matched.update(found)
        blocks = [(n, m) for n, m in modules if n in matched]
        for (outer, _), (inner, _) in zip(blocks, blocks[1:]):
            if inner.startswith(f"{outer}.") or not outer:
                raise ConfigError("layers", f"'{inner}' lies inside '{outer or type(model).__name__}': the blocks must not nest")
        return blocks


def _example_names(modules: list[tuple[str, nn.Module]]) -> str:
    names = [n for n, m in modules if n and len(list(m.children())) > 0]
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def plan_layerwise(model: nn.Module, config: LayerwiseCompressorConfig) -> tuple[list[tuple[str, nn.Module]], Plan]:
    """(the blocks, the plan): the Linear layers inside the blocks that the config compresses. Other
    weights (embeddings, lm_head, layers outside the blocks) are left alone, each with a log line."""
    blocks = config.get_layers(model)
    prefixes = tuple(f"{name}." for name, _ in blocks)

    def outside(unit: WeightUnit) -> str | None:
        module = model.get_submodule(unit.name)
        if not all(n.startswith(prefixes) for n in unit.names):
            return "outside the blocks GPTQ compresses (`layers`)"
        if not isinstance(module, nn.Linear) or unit.param != "weight":
            return f"GPTQ compresses Linear weights; this is a {type(module).__name__}"
        return None

    return blocks, plan_units(model, config, outside=outside)


def layerwise_plan(model: nn.Module, config: LayerwiseCompressorConfig) -> Plan:
    """The units of `plan_layerwise` (the runner's planning hook)."""
    return plan_layerwise(model, config)[1]


@dataclass(frozen=True)
class LayerResult:
    """One layer's result: its compressed weight (QuantizedWeight or PalettizedWeight), its metrics and
    the weight it decodes to (float32; not stored in a job's files)."""

    weight: Any
    metrics: dict[str, float]
    decoded: torch.Tensor | None = None


def compress_linear(weight: torch.Tensor, hessian: torch.Tensor, config: ModuleOptimizationConfig, *, seed: int = 0) -> LayerResult:
    """GPTQ (`ModuleGPTQConfig`) or LUT-GPTQ (`ModuleLUTGPTQConfig`) of one Linear weight with H = XᵀX / tokens.

    metrics: rel_sq_error (‖W − Ŵ‖² / ‖W‖²), output_rel_error (‖(W − Ŵ)Xᵀ‖² / ‖WXᵀ‖², the error GPTQ
    minimises), dampening (the fraction of mean diag H added; above the config's when H was singular),
    and for LUT-GPTQ kmeans_output_rel_error, the same error of the k-means start. A Hessian that no
    dampening makes positive definite (a layer that saw only zeros) falls back to the identity, i.e.
    round-to-nearest, with `fallback` saying why.
    """
    w = weight.detach().to("cpu", torch.float32)  # the per-layer maths runs on the CPU (its k-means is numba);
    h = hessian.to("cpu", torch.float32)          # the block forwards and Hessians run on the block's device
    try:
        return _compress_linear(w, h, config, seed)
    except SingularHessian as e:  # the documented fallback: H = I, i.e. round-to-nearest (LUTs: plain k-means)
        result = _compress_linear(w, torch.eye(w.shape[1]), config, seed)
        return LayerResult(result.weight, {**result.metrics, "fallback": f"identity Hessian (round to nearest): {e}"},
                           result.decoded)


def _compress_linear(w: torch.Tensor, h: torch.Tensor, config: ModuleOptimizationConfig, seed: int) -> LayerResult:
    energy = output_error(w, torch.zeros_like(w), h)  # ‖WXᵀ‖², what the errors are relative to
    energy = energy if energy > 0 else 1.0
    if isinstance(config, ModuleLUTGPTQConfig):
        compressed, info = gptq_palettize_weight(
            w, h, config, iterations=config.lut_iterations, dampening=config.hessian_dampening,
            act_order=config.use_activation_order_heuristic, processing_group_size=config.processing_group_size, seed=seed)
        extra = {"kmeans_output_rel_error": info.kmeans_error / energy, "dampening": info.dampening}
    else:
        compressed, info = gptq_quantize_weight(w, h, config)
        extra = {"dampening": info.dampening, "dead_columns": info.dead_columns}
    decoded = compressed.decode().to(torch.float32)
    metrics = {"rel_sq_error": relative_error(w, decoded),
               "output_rel_error": output_error(w, decoded, h) / energy, **extra}
    return LayerResult(compressed, metrics, decoded)


def model_forward(model: nn.Module, sample: object) -> object:
    """Run one calibration sample through the model: a token tensor is `input_ids`, a mapping is keyword
    arguments, a tuple / list passes its first item as `input_ids`."""
    if isinstance(sample, Mapping):
        return model(**sample, use_cache=False)
    if isinstance(sample, (tuple, list)):
        sample = sample[0]
    if isinstance(sample, torch.Tensor) and sample.dim() == 1:
        sample = sample.unsqueeze(0)
    return model(input_ids=sample, use_cache=False)


class LayerwiseCompressor:
    """GPTQ (and LUT-GPTQ) in memory: `LayerwiseCompressor(model, config).compress(dataloader, device)`
    returns the model with the decoded weights in place, as Core ML Tools does.

    After `compress()`, `compressed` maps each compressed layer's name to its `QuantizedWeight` or
    `PalettizedWeight` and `metrics` to its errors (see `compress_linear`), on every rank.

    Example:
        config = LayerwiseCompressorConfig.from_dict({
            "global_config": {"algorithm": "gptq", "weight_dtype": "int4", "granularity": "per_channel"},
            "calibration_nsamples": 16})
        model = LayerwiseCompressor(model, config).compress(token_windows, device="cpu")
    """

    def __init__(self, model: nn.Module, config: LayerwiseCompressorConfig | None = None, *, seed: int = 0):
        self._model = model
        self._config = config if config is not None else LayerwiseCompressorConfig()
        self._seed = seed
        self.compressed: dict[str, Any] = {}
        self.metrics: dict[str, dict[str, float]] = {}

    def compress(self, dataloader: Iterable, device: str | torch.device = "cpu", inplace: bool = False,
                 forward: Callable[[nn.Module, object], object] = model_forward) -> nn.Module:
        """Compress the selected layers block by block with the first `calibration_nsamples` samples of
        `dataloader` (token tensors, batches of them, or mappings of model arguments).

        Args (Core ML Tools' names):
            dataloader: an iterable of samples or batches.
            device: where each block runs while it is compressed ("cuda", "cpu"); the model stays where it is.
            inplace: modify the model passed in (True) or a deep copy (False).
            forward: `forward(model, sample)` runs the model on one sample (default `model_forward`).
        """
        return_freed_memory()
        model = self._model if inplace else copy.deepcopy(self._model)
        world = distributed.current_world()
        blocks, plan = plan_layerwise(model, self._config)
        plan.log_skipped()
        configs = {p.unit.name: p.config for p in plan}
        shards, samples = own_samples(dataloader, ShardPlan(self._config.calibration_nsamples, self._config.calibration_shard_size,
                                                            world.world_size), world.rank)

        def compress_layer(name: str, module: nn.Linear, hessian: torch.Tensor):
            result = compress_linear(module.weight, hessian, configs[name], seed=self._seed)
            return dataclasses.replace(result, decoded=None), result.decoded  # results travel between ranks: no copies

        with torch.no_grad():
            results = compress_layerwise(model, blocks, samples, shards, world, select=lambda name, m: name in configs,
                                         compress_layer=compress_layer, forward=forward,
                                         true_sequential=self._config.true_sequential, device=torch.device(device))
        mine = {name: r for block in results for name, r in block.compressed.items()}
        for part in distributed.all_gather(mine):
            for name, result in part.items():
                self.compressed[name], self.metrics[name] = result.weight, result.metrics
        return model

    def report(self) -> dict[str, dict[str, float]]:
        """Per compressed layer: its metrics (errors, dampening)."""
        return dict(self.metrics)
