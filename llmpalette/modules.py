"""Finding a model's compressible weights by name and type, and the tensors they share.

A *unit* of compression is one weight tensor. Tied parameters (SmolLM2's `lm_head.weight` is
`model.embed_tokens.weight`) are one tensor, so they form one unit with several names; the
algorithms compress it once and every name sees the same decoded weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class WeightUnit:
    """One weight tensor to compress: its module's name, and other modules that share the tensor."""

    name: str                      # module name, e.g. "model.layers.0.mlp.down_proj"
    param: str                     # parameter name within the module, "weight"
    module_type: str               # class name, for reports
    shape: tuple[int, ...]
    aliases: tuple[str, ...] = field(default=())  # other module names whose `param` is the same tensor

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


def supported_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module whose weight llmpalette can compress, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SUPPORTED_MODULES) and getattr(m, "weight", None) is not None]


def weight_units(model: nn.Module) -> list[WeightUnit]:
    """One unit per distinct weight tensor of the supported modules; tied weights are grouped (first name leads)."""
    by_tensor: dict[int, list[tuple[str, nn.Module]]] = {}
    order: list[int] = []
    for name, module in supported_modules(model):
        key = id(module.weight)
        if key not in by_tensor:
            by_tensor[key] = []
            order.append(key)
        by_tensor[key].append((name, module))
    units = []
    for key in order:
        (name, module), *others = by_tensor[key]
        units.append(
            WeightUnit(
                name=name,
                param="weight",
                module_type=type(module).__name__,
                shape=tuple(module.weight.shape),
                aliases=tuple(n for n, _ in others),
            )
        )
    return units


def get_weight(model: nn.Module, unit: WeightUnit) -> nn.Parameter:
    return getattr(model.get_submodule(unit.name), unit.param)


def set_weight(model: nn.Module, unit: WeightUnit, value: torch.Tensor) -> None:
    """Overwrite the unit's tensor in place, so every tied name sees the new value."""
    param = get_weight(model, unit)
    with torch.no_grad():
        param.copy_(value.to(dtype=param.dtype, device=param.device))


def parameter_bytes(model: nn.Module, bytes_per_value: int = 2) -> int:
    """Size of all distinct parameters at `bytes_per_value` each (2 = float16, the baseline the seeds use)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * bytes_per_value
    return total
