"""The one config mechanism that every compression API and the recipe share.

Mirrors Core ML Tools' `coremltools.optimize.torch` surface: a per-module config class
(`ModuleOptimizationConfig` subclasses, e.g. `ModulePostTrainingPalettizerConfig`) and a model-level
config (`OptimizationConfig` subclasses) holding `global_config`, `module_type_configs` and
`module_name_configs`, built with `from_dict` / `from_yaml`. A `None` entry skips a module.

Values are checked once, here, against the dataclass annotations; every error is a `ConfigError`
whose `field` is the dotted path of the offending value (`global_config.group_size`), so a recipe
can add its file name and a user knows exactly what to fix.
"""
from __future__ import annotations

import dataclasses
import io
import types
import typing
from collections.abc import Mapping
from typing import IO, Any, ClassVar, Literal, Union

import torch
import yaml

from llmpalette.errors import ConfigError


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _check_value(value: Any, tp: Any, field: str) -> Any:
    """Return `value` checked (and, for int -> float, converted) against annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_value(value, option, field)
            except ConfigError:
                continue
        raise ConfigError(field, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(field, f"expected one of {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(field, f"expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(field, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(field, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(field, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(field, f"expected a string, got {value!r}")
    if tp is Any:
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {field}")


def _load_yaml(yml: IO | str) -> Any:
    """`yml` is a stream, a path to a YAML file, or YAML text (Core ML Tools accepts a stream or a path)."""
    if hasattr(yml, "read"):
        return yaml.safe_load(yml)
    try:
        with open(yml, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except (FileNotFoundError, OSError):
        return yaml.safe_load(io.StringIO(yml))


@dataclasses.dataclass
class ModuleOptimizationConfig:
    """Base of the per-module configs: a dataclass whose fields are checked by `from_dict`.

    Subclasses override `validate()` for rules across fields, raising `ConfigError(field, message)`.
    `_rejected_fields` maps Core ML Tools field names that llmpalette does not take to the reason,
    so a pasted Core ML Tools config gets an explanation rather than a bare "unknown field".
    """

    _rejected_fields: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        self._check_fields()
        self.validate()

    def _check_fields(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_value(self._normalize(f.name, getattr(self, f.name)), hints[f.name], f.name))

    def _normalize(self, name: str, value: Any) -> Any:
        """Hook for accepting equivalent spellings (e.g. torch dtypes for dtype strings)."""
        return value

    def validate(self) -> None:
        """Checks across fields; raise ConfigError naming the field."""

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any] | None) -> "ModuleOptimizationConfig":
        if config_dict is None:
            config_dict = {}
        if not isinstance(config_dict, Mapping):
            raise ConfigError("", f"expected a mapping of {cls.__name__} fields, got {config_dict!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in config_dict:
            if key in cls._rejected_fields:
                raise ConfigError(str(key), cls._rejected_fields[key])
            if key not in names:
                raise ConfigError(str(key), f"unknown field of {cls.__name__}; known fields: {', '.join(sorted(names))}")
        return cls(**dict(config_dict))

    @classmethod
    def from_yaml(cls, yml: IO | str) -> "ModuleOptimizationConfig":
        return cls.from_dict(_load_yaml(yml))

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


ModuleConfigValue = Union[ModuleOptimizationConfig, None, list]


@dataclasses.dataclass
class OptimizationConfig:
    """Model-level config: which modules get which `ModuleOptimizationConfig`.

    Resolution for a module, most specific first: `module_name_configs[name]` (exact, fully qualified
    name as in `model.get_submodule`), then `module_type_configs[type]` (class, class name or dotted
    path; a list picks the entry by `weight_threshold`, as Core ML Tools does), then `global_config`.
    `None` at any level means: do not compress this module.
    """

    module_config_class: ClassVar[type[ModuleOptimizationConfig]] = ModuleOptimizationConfig

    global_config: ModuleOptimizationConfig | None = None
    module_type_configs: dict[Any, ModuleConfigValue] = dataclasses.field(default_factory=dict)
    module_name_configs: dict[str, ModuleOptimizationConfig | None] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.global_config is None and not self.module_type_configs and not self.module_name_configs:
            self.global_config = self.module_config_class()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any] | None) -> "OptimizationConfig":
        if config_dict is None:
            config_dict = {}
        if not isinstance(config_dict, Mapping):
            raise ConfigError("", f"expected a mapping with global_config / module_type_configs / module_name_configs, got {config_dict!r}")
        known = ("global_config", "module_type_configs", "module_name_configs")
        for key in config_dict:
            if key not in known:
                raise ConfigError(str(key), f"unknown field; known fields: {', '.join(known)}")
        module_cls = cls.module_config_class
        global_config = None
        if "global_config" in config_dict and config_dict["global_config"] is not None:
            global_config = _module_from_dict(module_cls, config_dict["global_config"], "global_config")
        type_configs = {}
        for key, value in _mapping(config_dict.get("module_type_configs"), "module_type_configs").items():
            field = f"module_type_configs.{key}"
            if isinstance(value, list):
                type_configs[key] = [_module_from_dict(module_cls, v, f"{field}[{i}]") for i, v in enumerate(value)]
            else:
                type_configs[key] = None if value is None else _module_from_dict(module_cls, value, field)
        name_configs = {}
        for key, value in _mapping(config_dict.get("module_name_configs"), "module_name_configs").items():
            field = f"module_name_configs.{key}"
            name_configs[str(key)] = None if value is None else _module_from_dict(module_cls, value, field)
        config = cls(global_config=global_config, module_type_configs=type_configs, module_name_configs=name_configs)
        if "global_config" in config_dict and config_dict["global_config"] is None:
            config.global_config = None
        return config

    @classmethod
    def from_yaml(cls, yml: IO | str) -> "OptimizationConfig":
        return cls.from_dict(_load_yaml(yml))

    def as_dict(self) -> dict[str, Any]:
        def one(c):
            if isinstance(c, list):
                return [x.as_dict() for x in c]
            return None if c is None else c.as_dict()

        return {
            "global_config": one(self.global_config),
            "module_type_configs": {_type_key(k): one(v) for k, v in self.module_type_configs.items()},
            "module_name_configs": {k: one(v) for k, v in self.module_name_configs.items()},
        }

    def set_global(self, global_config: ModuleOptimizationConfig | None) -> "OptimizationConfig":
        self.global_config = global_config
        return self

    def set_module_type(self, object_type: type | str, opt_config: ModuleConfigValue) -> "OptimizationConfig":
        self.module_type_configs[object_type] = opt_config
        return self

    def set_module_name(self, module_name: str, opt_config: ModuleOptimizationConfig | None) -> "OptimizationConfig":
        self.module_name_configs[module_name] = opt_config
        return self

    # -- resolution ---------------------------------------------------------------------------
    def get_module_config(self, name: str, module: torch.nn.Module) -> ModuleOptimizationConfig | None:
        if name in self.module_name_configs:
            return self.module_name_configs[name]
        for key, value in self.module_type_configs.items():
            if _type_matches(key, module):
                return _pick_by_threshold(value, module) if isinstance(value, list) else value
        return self.global_config

    def check_names(self, model: torch.nn.Module) -> None:
        """Every name in module_name_configs must be a module of `model` (a typo would silently compress it)."""
        names = {n for n, _ in model.named_modules()}
        for key in self.module_name_configs:
            if key not in names:
                raise ConfigError(f"module_name_configs.{key}", f"no module named '{key}' in the model")


def _module_from_dict(cls: type[ModuleOptimizationConfig], value: Any, field: str) -> ModuleOptimizationConfig:
    try:
        return cls.from_dict(value)
    except ConfigError as e:
        raise ConfigError(f"{field}.{e.field}" if e.field else field, e.message) from None


def _mapping(value: Any, field: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(field, f"expected a mapping, got {value!r}")
    return value


def _type_key(key: Any) -> str:
    return key if isinstance(key, str) else f"{key.__module__}.{key.__qualname__}"


def _type_matches(key: Any, module: torch.nn.Module) -> bool:
    cls = type(module)
    if isinstance(key, type):
        return cls is key
    return key in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}", f"torch.nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else None)


def _pick_by_threshold(configs: list, module: torch.nn.Module) -> ModuleOptimizationConfig | None:
    """From a list of configs for one module type, the one with the largest weight_threshold below the weight's size."""
    weight = getattr(module, "weight", None)
    numel = weight.numel() if weight is not None else 0
    eligible = [c for c in configs if numel > getattr(c, "weight_threshold", 0)]
    return max(eligible, key=lambda c: getattr(c, "weight_threshold", 0)) if eligible else None
