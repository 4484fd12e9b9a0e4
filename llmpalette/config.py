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
import re
import types
import typing
from collections.abc import Mapping
from typing import IO, Any, ClassVar, Literal, Union

import torch
import yaml

from llmpalette.errors import ConfigError, unknown_field
from llmpalette.modules import SUPPORTED_MODULES


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
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(field, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_value(v, item, f"{field}[{i}]") for i, v in enumerate(value)]
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
                raise unknown_field(str(key), key, sorted(names), cls.__name__)
        return cls(**dict(config_dict))

    @classmethod
    def from_yaml(cls, yml: IO | str) -> "ModuleOptimizationConfig":
        return cls.from_dict(_load_yaml(yml))

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


ModuleConfigValue = Union[ModuleOptimizationConfig, None, list]


_LEVELS = ("global_config", "module_type_configs", "module_name_configs")


@dataclasses.dataclass
class OptimizationConfig:
    """Model-level config: which modules get which `ModuleOptimizationConfig`.

    Resolution for a module, as in Core ML Tools' `OptimizationConfig.get_module_config`:
    1. `module_name_configs`: keys are regular expressions matched against the whole module name
       (`re.fullmatch`, so `model.layers.\\d+.mlp.up_proj` configures every block's up_proj); the
       first matching key, in insertion order, wins.
    2. `module_type_configs`: a class key (`torch.nn.Linear`) beats a name key (`"Linear"`, or a
       dotted path); a list of configs picks its entry by `weight_threshold`.
    3. `global_config`.
    `None` at any level means: do not compress this module.

    Checked where the config enters (`from_dict`, the constructor): keys that are not valid regular
    expressions, type keys that name no supported module type, and one type configured differently
    under its class and its name. Checked against a model (`check_model`): name keys that match no
    module, and custom type names that match no supported module of the model.
    """

    module_config_class: ClassVar[type[ModuleOptimizationConfig]] = ModuleOptimizationConfig
    supported_modules: ClassVar[tuple[type[torch.nn.Module], ...]] = SUPPORTED_MODULES

    global_config: ModuleOptimizationConfig | None = None
    module_type_configs: dict[Any, ModuleConfigValue] = dataclasses.field(default_factory=dict)
    module_name_configs: dict[str, ModuleOptimizationConfig | None] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.global_config is None and not self.module_type_configs and not self.module_name_configs:
            self.global_config = self.module_config_class()
        for key in self.module_name_configs:
            _compile_name_key(key)
        for key in self.module_type_configs:
            self._check_type_key(key)
        self._check_type_conflicts()
        self.validate()

    def validate(self) -> None:
        """Checks of a subclass's own top-level fields (e.g. `calibration_nsamples`); raise ConfigError."""

    @classmethod
    def _top_level_fields(cls) -> tuple[str, ...]:
        """Fields beside the three config levels that a subclass adds (Core ML Tools' `calibration_nsamples`)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _LEVELS)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any] | None) -> "OptimizationConfig":
        if config_dict is None:
            config_dict = {}
        if not isinstance(config_dict, Mapping):
            raise ConfigError("", f"expected a mapping with global_config / module_type_configs / module_name_configs, got {config_dict!r}")
        known = (*_LEVELS, *cls._top_level_fields())
        for key in config_dict:
            if key not in known:
                raise unknown_field(str(key), key, known)
        read = cls._module_config_from_dict
        global_config = None
        if "global_config" in config_dict and config_dict["global_config"] is not None:
            global_config = read(config_dict["global_config"], "global_config")
        type_configs = {}
        for key, value in _mapping(config_dict.get("module_type_configs"), "module_type_configs").items():
            field = f"module_type_configs.{_type_key(key)}"
            if isinstance(value, list):
                type_configs[key] = [read(v, f"{field}[{i}]") for i, v in enumerate(value)]
            else:
                type_configs[key] = None if value is None else read(value, field)
        name_configs = {}
        for key, value in _mapping(config_dict.get("module_name_configs"), "module_name_configs").items():
            field = f"module_name_configs.{key}"
            if not isinstance(key, str):
                raise ConfigError(field, f"keys are module names (regular expressions), got {key!r}")
            name_configs[key] = None if value is None else read(value, field)
        hints = typing.get_type_hints(cls)
        extras = {key: _check_value(config_dict[key], hints[key], key) for key in cls._top_level_fields() if key in config_dict}
        config = cls(global_config=global_config, module_type_configs=type_configs, module_name_configs=name_configs, **extras)
        if "global_config" in config_dict and config_dict["global_config"] is None:
            config.global_config = None
        return config

    @classmethod
    def from_yaml(cls, yml: IO | str) -> "OptimizationConfig":
        return cls.from_dict(_load_yaml(yml))

    @classmethod
    def _module_config_from_dict(cls, value: Any, field: str) -> ModuleOptimizationConfig:
        """One module's config from its dictionary; a subclass whose modules may take several config
        classes (Core ML Tools' LayerwiseCompressorConfig picks one by `algorithm`) overrides this."""
        return module_from_dict(cls.module_config_class, value, field)

    def as_dict(self) -> dict[str, Any]:
        def one(c):
            if isinstance(c, list):
                return [x.as_dict() for x in c]
            return None if c is None else c.as_dict()

        return {
            "global_config": one(self.global_config),
            "module_type_configs": {_type_key(k): one(v) for k, v in self.module_type_configs.items()},
            "module_name_configs": {k: one(v) for k, v in self.module_name_configs.items()},
            **{name: getattr(self, name) for name in self._top_level_fields()},
        }

    def set_global(self, global_config: ModuleOptimizationConfig | None) -> "OptimizationConfig":
        self.global_config = global_config
        return self

    def set_module_type(self, object_type: type | str, opt_config: ModuleConfigValue) -> "OptimizationConfig":
        """Configure a module type; as in Core ML Tools, a class key later beats a name key for the same type."""
        self._check_type_key(object_type)
        self.module_type_configs[object_type] = opt_config
        return self

    def set_module_name(self, module_name: str, opt_config: ModuleOptimizationConfig | None) -> "OptimizationConfig":
        _compile_name_key(module_name)
        self.module_name_configs[module_name] = opt_config
        return self

    # -- resolution ---------------------------------------------------------------------------
    def get_module_config(self, name: str, module: torch.nn.Module) -> ModuleOptimizationConfig | None:
        return self.resolve(name, module)[0]

    def resolve(self, name: str, module: torch.nn.Module) -> tuple[ModuleOptimizationConfig | None, str]:
        """(the module's config, which entry decided it: `module_name_configs['KEY']`, ...)."""
        key = self.name_key_for(name)
        if key is not None:
            return self.module_name_configs[key], f"module_name_configs['{key}']"
        for by_class in (True, False):
            for key, value in self.module_type_configs.items():
                if isinstance(key, type) == by_class and _type_matches(key, module):
                    where = f"module_type_configs['{_type_key(key)}']"
                    if isinstance(value, list):
                        picked = _pick_by_threshold(value, module)
                        return picked, where if picked is not None else f"{where}: no entry's weight_threshold is below its size"
                    return value, where
        return self.global_config, "global_config"

    def name_key_for(self, name: str) -> str | None:
        """The first `module_name_configs` key (a regular expression) that matches all of `name`."""
        for key in self.module_name_configs:
            if _compile_name_key(key).fullmatch(name):
                return key
        return None

    def check_model(self, model: torch.nn.Module) -> None:
        """Every name key must match a module of `model`, every custom type name a supported module's class.

        A key that configures nothing is almost always a typo that would silently compress (or keep) the
        wrong modules, so it is an error, naming the key.
        """
        names = [n for n, _ in model.named_modules()]
        for key in self.module_name_configs:
            pattern = _compile_name_key(key)
            if not any(pattern.fullmatch(n) for n in names):
                raise ConfigError(
                    f"module_name_configs.{key}",
                    f"matches no module of the model (keys are module names or regular expressions matched "
                    f"against whole names, as in Core ML Tools; e.g. 'model.layers.0.mlp.up_proj' or "
                    f"'model.layers.\\d+.mlp.up_proj')",
                )
        present = {type(m) for _, m in model.named_modules() if isinstance(m, self.supported_modules)}
        for key in self.module_type_configs:
            if isinstance(key, str) and _builtin_type(key) is None:
                if not any(_type_matches(key, cls) for cls in present):
                    raise ConfigError(f"module_type_configs.{key}", self._unsupported_type_message(key))

    # -- validation ---------------------------------------------------------------------------
    def _check_type_key(self, key: Any) -> None:
        if isinstance(key, type):
            if issubclass(key, torch.nn.Module) and issubclass(key, self.supported_modules):
                return
            raise ConfigError(f"module_type_configs.{_type_key(key)}", self._unsupported_type_message(_type_key(key)))
        if not isinstance(key, str):
            raise ConfigError("module_type_configs", f"keys are module classes or their names, got {key!r}")
        builtin = _builtin_type(key)
        if builtin is not None and not issubclass(builtin, self.supported_modules):
            raise ConfigError(f"module_type_configs.{key}", self._unsupported_type_message(key))

    def _unsupported_type_message(self, key: str) -> str:
        supported = ", ".join(cls.__name__ for cls in self.supported_modules)
        return (f"'{key}' names no supported module type; supported: {supported} "
                "(or a subclass of one, by class or class name)")

    def _check_type_conflicts(self) -> None:
        """One type under its class and under its name with different configs is ambiguous: refuse it.

        (Core ML Tools' constructor folds torch.nn names into the class and keeps the later entry, while
        its set_module_type lets the class win; here the class wins, and a conflicting dict is an error.)
        """
        classes = [k for k in self.module_type_configs if isinstance(k, type)]
        for name in (k for k in self.module_type_configs if isinstance(k, str)):
            for cls in classes:
                if _type_matches(name, cls) and freeze_config(self.module_type_configs[name]) != freeze_config(self.module_type_configs[cls]):
                    raise ConfigError(
                        f"module_type_configs.{name}",
                        f"configures the same type as the key {_type_key(cls)} differently; keep one of them",
                    )


def _compile_name_key(key: str) -> re.Pattern:
    try:
        return _compiled(key)
    except re.error as e:
        raise ConfigError(f"module_name_configs.{key}", f"not a valid regular expression ({e})") from None


_PATTERNS: dict[str, re.Pattern] = {}


def _compiled(key: str) -> re.Pattern:
    if key not in _PATTERNS:
        _PATTERNS[key] = re.compile(key)
    return _PATTERNS[key]


def _builtin_type(key: str) -> type | None:
    """The torch.nn class a name key means (`Linear`, `torch.nn.Linear`, `torch.nn.modules.linear.Linear`), or None."""
    short = key.rsplit(".", 1)[-1]
    cls = getattr(torch.nn, short, None)
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module) and key in (short, f"torch.nn.{short}", f"{cls.__module__}.{cls.__qualname__}"):
        return cls
    return None


def freeze_config(value: Any) -> Any:
    """A hashable, comparable form of a module config (or None, or a list of them)."""
    if isinstance(value, list):
        return tuple(freeze_config(v) for v in value)
    return None if value is None else (type(value).__name__, tuple(sorted(value.as_dict().items(), key=lambda kv: kv[0])))


def module_from_dict(cls: type[ModuleOptimizationConfig], value: Any, field: str) -> ModuleOptimizationConfig:
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
    """A type key as text: a torch.nn class by its short name (`Linear`), another class by its dotted path."""
    cls = key if isinstance(key, type) else _builtin_type(key)
    if cls is not None and getattr(torch.nn, cls.__name__, None) is cls:
        return cls.__name__
    return key if isinstance(key, str) else f"{key.__module__}.{key.__qualname__}"


def _type_matches(key: Any, module: torch.nn.Module | type) -> bool:
    """Whether a type key (a class, its name or its dotted path) means `module`'s exact class."""
    cls = module if isinstance(module, type) else type(module)
    if isinstance(key, type):
        return cls is key
    return key in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}", f"torch.nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else None)


def _pick_by_threshold(configs: list, module: torch.nn.Module) -> ModuleOptimizationConfig | None:
    """From a list of configs for one module type, the one with the largest weight_threshold below the weight's size."""
    weight = getattr(module, "weight", None)
    numel = weight.numel() if weight is not None else 0
    eligible = [c for c in configs if numel > getattr(c, "weight_threshold", 0)]
    return max(eligible, key=lambda c: getattr(c, "weight_threshold", 0)) if eligible else None
