"""The YAML recipe as a typed object, validated once; every error names the file and the field.

```yaml
model: default                  # or a hub id, a folder, a .gguf file
tokenizer: null                 # optional: where the tokenizer is when the model has none
data: {text: default, seq_len: 512}  # the text stages calibrate on (never its held-out part)
stages:
  - algorithm: kmeans
    config:                     # exactly Core ML Tools' PostTrainingPalettizerConfig dictionary
      global_config: {n_bits: 4, granularity: per_grouped_channel, group_size: 16}
      module_name_configs: {lm_head: null, model.embed_tokens: null}
evaluate: {windows: 16, seq_len: 512}
export:                         # optional, run by `llmpalette compress` after the stages and the report
  coreml: {path: model.mlpackage, context_length: 512, prefill_length: 64}   # path relative to the job dir
```
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from llmpalette.config import OptimizationConfig
from llmpalette.errors import ConfigError, unknown_field
from llmpalette.palettization.post_training import Plan, PostTrainingPalettizerConfig, palettize_weight, plan_units
from llmpalette.palettization.sensitive_k_means import SKMPalettizerConfig, skm_palettize_weight
from llmpalette.quantization.layerwise_compressor import LayerwiseCompressorConfig, layerwise_plan
from llmpalette.quantization.post_training import PostTrainingQuantizerConfig, rtn_compress_unit


@dataclass(frozen=True)
class Algorithm:
    """What a stage's `algorithm:` name means, all the runner needs to run it.

    config_class: the Core ML Tools-shaped config its `config:` dictionary is read into.
    compress_unit: `fn(weight, module_config, *, seed, **statistics) -> compressed weight`, pure; None
        for a layerwise algorithm, whose layers are compressed inside the block loop.
    statistic: what the stage computes from calibration text before its units (`"sensitivity"`: the
        Fisher sums, passed to `compress_unit` as `sensitivity=`; `"hessian"`: each layer's input
        Hessian, block by block), or None for a data-free stage.
    plan: `fn(model, config) -> Plan`, the units the stage compresses and what it leaves alone.
    layerwise: the stage runs decoder block by decoder block (`jobs.layerwise`), not unit by unit.
    lazy_weights: the stage needs one unit's (or one block's) weights at a time, so a job reads them from
        the model's files when it can instead of loading the whole model.
    """

    config_class: type[OptimizationConfig]
    compress_unit: Callable[..., Any] | None = None
    statistic: str | None = None
    plan: Callable[..., Plan] = plan_units
    layerwise: bool = False
    lazy_weights: bool = False

    @property
    def needs_text(self) -> bool:
        return self.statistic is not None


ALGORITHMS: dict[str, Algorithm] = {
    "kmeans": Algorithm(PostTrainingPalettizerConfig, palettize_weight, lazy_weights=True),
    "skm": Algorithm(SKMPalettizerConfig, skm_palettize_weight, statistic="sensitivity"),
    "rtn": Algorithm(PostTrainingQuantizerConfig, rtn_compress_unit, lazy_weights=True),
    "gptq": Algorithm(LayerwiseCompressorConfig, statistic="hessian", plan=layerwise_plan, layerwise=True, lazy_weights=True),
}
# Stage config fields that do not change the compressed bytes (tested): a resumed job may change them,
# e.g. turn gradient checkpointing on after running out of memory.
RUNTIME_FIELDS = ("gradient_checkpointing",)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # recipe `dtype` -> load dtype


@dataclass(frozen=True)
class DataSpec:
    text: str = "default"        # "default" (pydoc topics), a local file/folder, or a hub dataset name
    samples: int = 0             # must be 0: a stage's own calibration_nsamples says how many samples it reads
    seq_len: int = 512


@dataclass(frozen=True)
class EvaluateSpec:
    windows: int = 16            # held-out windows for perplexity (0: no evaluation)
    seq_len: int = 512
    batch_size: int = 4


@dataclass(frozen=True)
class CoreMLExportSpec:
    path: str = "model.mlpackage"  # relative paths are inside the job directory
    context_length: int = 512
    prefill_length: int = 64


@dataclass(frozen=True)
class ExportSpec:
    """What `llmpalette compress` exports after the stages; not part of what decides the compressed bytes."""

    coreml: CoreMLExportSpec | None = None


@dataclass(frozen=True)
class Stage:
    algorithm: str
    config: OptimizationConfig
    raw_config: Mapping[str, Any] = field(compare=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm, "config": _plain(self.raw_config)}

    def normalized(self) -> dict[str, Any]:
        """The stage as the typed config reads it: defaults filled in, spellings made canonical, and
        without the settings that change how it runs but not what it computes (`RUNTIME_FIELDS`)."""
        config = {k: v for k, v in self.config.as_dict().items() if k not in RUNTIME_FIELDS}
        return {"algorithm": self.algorithm, "config": _plain(config)}

    @property
    def needs_text(self) -> bool:
        return ALGORITHMS[self.algorithm].needs_text


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    model: str = "default"
    tokenizer: str | None = None
    data: DataSpec = DataSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    seed: int = 0
    dtype: str = "float32"
    source: str | None = field(default=None, compare=False)
    export: ExportSpec | None = None

    @classmethod
    def from_yaml(cls, path: str) -> "Recipe":
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError("", "recipe file not found", path) from None
        except yaml.YAMLError as e:
            raise ConfigError("", f"not valid YAML: {e}", path) from None
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: Any, *, source: str | None = None) -> "Recipe":
        try:
            return _parse(raw, source)
        except ConfigError as e:
            raise ConfigError(e.field, e.message, source) from None

    def with_overrides(self, *, model: str | None = None, text: str | None = None, tokenizer: str | None = None) -> "Recipe":
        """The same recipe with the model, text and/or tokenizer replaced (the CLI's --model / --data / --tokenizer)."""
        recipe = self
        if model is not None:
            recipe = dataclasses.replace(recipe, model=model)
        if tokenizer is not None:
            recipe = dataclasses.replace(recipe, tokenizer=tokenizer)
        if text is not None:
            recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, text=text))
        return recipe

    def as_dict(self) -> dict[str, Any]:
        raw = {
            "model": self.model,
            "tokenizer": self.tokenizer,
            "dtype": self.dtype,
            "seed": self.seed,
            "data": {k: v for k, v in dataclasses.asdict(self.data).items() if k != "samples"},  # always 0: not shown
            "stages": [s.as_dict() for s in self.stages],
            "evaluate": dataclasses.asdict(self.evaluate),
        }
        if self.export is not None:
            raw["export"] = {name: dataclasses.asdict(value) for name, value in vars(self.export).items() if value is not None}
        return raw

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.as_dict(), sort_keys=False)

    @property
    def needs_text(self) -> bool:
        """Whether a stage reads calibration text (and so needs a tokenizer)."""
        return any(stage.needs_text for stage in self.stages)

    def compression_dict(self) -> dict[str, Any]:
        """What decides the compressed bytes, normalized: the stages' typed configs (defaults filled,
        canonical spellings), the load dtype, the seed and, for stages that read text, the data.

        Not in it: where the model and tokenizer lie (the job's model fingerprint decides whether
        the model is the same), the evaluation settings, YAML formatting and key order.
        """
        compression = {"dtype": self.dtype, "seed": self.seed, "stages": [s.normalized() for s in self.stages]}
        if self.needs_text:
            compression["data"] = dataclasses.asdict(self.data)
        return compression

    @property
    def sha256(self) -> str:
        """Hash of `compression_dict()`: recipes that compress alike have equal hashes."""
        return hashlib.sha256(json.dumps(self.compression_dict(), sort_keys=True).encode()).hexdigest()

    def differences(self, other: "Recipe") -> list[str]:
        """What `other` (the job's recipe) would compress differently: `path: theirs -> mine` per leaf."""
        return _leaf_differences(other.compression_dict(), self.compression_dict(), "")


def _leaf_differences(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            sub = f"{path}.{key}" if path else str(key)
            out += _leaf_differences(old.get(key, "(absent)"), new.get(key, "(absent)"), sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _leaf_differences(a, b, f"{path}[{i}]")]
    if json.dumps(old, sort_keys=True) == json.dumps(new, sort_keys=True):
        return []
    return [f"{path}: {json.dumps(old)} -> {json.dumps(new)}"]


def _plain(value: Any) -> Any:
    """YAML-safe, JSON-safe copy of a raw config mapping."""
    return json.loads(json.dumps(value, sort_keys=False, default=str))


_TOP_FIELDS = ("model", "tokenizer", "dtype", "seed", "data", "stages", "evaluate", "export")


def _parse(raw: Any, source: str | None) -> Recipe:
    if not isinstance(raw, Mapping):
        raise ConfigError("", f"a recipe is a mapping with the fields {', '.join(_TOP_FIELDS)}; got {type(raw).__name__}")
    for key in raw:
        if key not in _TOP_FIELDS:
            raise ConfigError(str(key), f"unknown recipe field; known fields: {', '.join(_TOP_FIELDS)}")
    model = _scalar(raw, "model", str, "default")
    tokenizer = _scalar(raw, "tokenizer", str, None)
    dtype = _scalar(raw, "dtype", str, "float32")
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    seed = _scalar(raw, "seed", int, 0)
    data = _section(raw, "data", DataSpec)
    if data.samples != 0:
        raise ConfigError("data.samples", "the number of calibration samples is each stage's `calibration_nsamples` "
                          f"(Core ML Tools' field); remove data.samples (got {data.samples})")
    if data.seq_len < 2:
        raise ConfigError("data.seq_len", f"must be >= 2, got {data.seq_len}")
    evaluate = _section(raw, "evaluate", EvaluateSpec)
    for name in ("windows", "seq_len", "batch_size"):
        minimum = 0 if name == "windows" else 1
        if getattr(evaluate, name) < minimum:
            raise ConfigError(f"evaluate.{name}", f"must be >= {minimum}, got {getattr(evaluate, name)}")
    stages = _stages(raw.get("stages"))
    return Recipe(stages=stages, model=model, tokenizer=tokenizer, data=data, evaluate=evaluate, seed=seed, dtype=dtype,
                  source=source, export=_export(raw.get("export")))


def _export(raw: Any) -> ExportSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("export", f"expected a mapping such as {{coreml: {{path: model.mlpackage}}}}, got {raw!r}")
    for key in raw:
        if key != "coreml":
            raise ConfigError(f"export.{key}", "unknown export; known: coreml")
    try:
        coreml = _section(raw, "coreml", CoreMLExportSpec) if "coreml" in raw else None
    except ConfigError as e:
        raise ConfigError(f"export.{e.field}", e.message) from None
    if coreml is not None:
        if not coreml.path.endswith(".mlpackage"):
            raise ConfigError("export.coreml.path", f"must end in .mlpackage, got {coreml.path!r}")
        if coreml.context_length < 1 or not 1 <= coreml.prefill_length <= coreml.context_length:
            raise ConfigError("export.coreml.prefill_length",
                              f"must be in 1..context_length ({coreml.context_length}), got {coreml.prefill_length}")
    return ExportSpec(coreml=coreml)


def _scalar(raw: Mapping, key: str, tp: type, default: Any) -> Any:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, tp) or isinstance(value, bool):
        raise ConfigError(key, f"expected {tp.__name__}, got {value!r}")
    return value


def _section(raw: Mapping, key: str, cls: type) -> Any:
    value = raw.get(key)
    if value is None:
        return cls()
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a mapping, got {value!r}")
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, item in value.items():
        if name not in hints:
            raise unknown_field(f"{key}.{name}", name, hints)
        expected = int if hints[name] in ("int", int) else str
        if not isinstance(item, expected) or isinstance(item, bool):
            raise ConfigError(f"{key}.{name}", f"expected {expected.__name__}, got {item!r}")
        kwargs[name] = item
    return cls(**kwargs)


def _stages(raw: Any) -> tuple[Stage, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("stages", "expected a non-empty list of stages, each with `algorithm` and `config`")
    stages = []
    for i, item in enumerate(raw):
        where = f"stages[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(where, f"expected a mapping with `algorithm` and `config`, got {item!r}")
        for key in item:
            if key not in ("algorithm", "config"):
                raise ConfigError(f"{where}.{key}", "unknown stage field; known fields: algorithm, config")
        algorithm = item.get("algorithm")
        if algorithm not in ALGORITHMS:
            raise ConfigError(f"{where}.algorithm", f"unknown algorithm {algorithm!r}; available: {', '.join(ALGORITHMS)}")
        raw_config = item.get("config") or {}
        try:
            config = ALGORITHMS[algorithm].config_class.from_dict(raw_config)
        except ConfigError as e:
            raise ConfigError(f"{where}.config.{e.field}" if e.field else f"{where}.config", e.message) from None
        stages.append(Stage(algorithm=algorithm, config=config, raw_config=_plain(raw_config)))
    if len(stages) > 1:
        raise ConfigError("stages", "one stage per recipe for now; chaining stages (e.g. GPTQ after SKM) is not supported yet")
    return tuple(stages)
