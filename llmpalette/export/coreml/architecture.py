"""What the Core ML program needs to know about a model: its decoder shape, RoPE tables and weights.

Supported: the Llama family (Llama 2/3, SmolLM2, ...) and Qwen2 / Qwen2.5: pre-norm decoder blocks of
RMSNorm, rotary grouped-query attention and a SiLU-gated MLP, with the parameter names transformers
gives both (`model.layers.N.self_attn.q_proj`, ...). Anything else is refused, naming its architecture.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from llmpalette.export.coreml.lut import CoreMLLut, CoreMLQuantized, coreml_weight
from llmpalette.export.errors import ExportError
from llmpalette.layout.layer_file import CompressedWeight

log = logging.getLogger("llmpalette")
FAMILIES = {"llama": "Llama (Llama 2/3, SmolLM2)", "qwen2": "Qwen2 / Qwen2.5"}


@dataclass(frozen=True)
class DecoderSpec:
    """The shape of a supported decoder, read from its transformers config."""

    architecture: str   # config.model_type: "llama" | "qwen2"
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    tied: bool          # lm_head.weight is model.embed_tokens.weight
    max_positions: int

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


def decoder_spec(model: nn.Module) -> DecoderSpec:
    """The decoder shape of `model`; ExportError naming the architecture when it is not supported."""
    config = model.config
    kind = getattr(config, "model_type", type(model).__name__)
    if kind not in FAMILIES:
        supported = ", ".join(f"{name} ({what})" for name, what in FAMILIES.items())
        raise ExportError(f"Core ML export supports {supported}; this model is '{kind}' ({type(model).__name__})")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"Core ML export: {kind} with hidden_act '{config.hidden_act}' is not supported (SiLU only)")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    return DecoderSpec(
        architecture=kind,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        rms_eps=float(config.rms_norm_eps),
        tied=tied,
        max_positions=int(getattr(config, "max_position_embeddings", 0) or 0),
    )


def check_context(model: nn.Module, spec: DecoderSpec, context_length: int, prefill_length: int) -> None:
    """Refuse shapes the model cannot take: a context beyond its positions, sliding-window layers inside it."""
    if not 1 <= prefill_length <= context_length:
        raise ExportError(f"prefill_length must be in 1..context_length ({context_length}), got {prefill_length}")
    if spec.max_positions and context_length > spec.max_positions:
        raise ExportError(f"context_length {context_length} exceeds the model's max_position_embeddings {spec.max_positions}")
    for name, value in (("context_length", context_length), ("prefill_length", prefill_length)):
        if value % 32:
            log.warning("export: %s %d is not a multiple of 32; the Neural Engine prefers a last axis of multiples of 32",
                        name, value)
    config = model.config
    window = getattr(config, "sliding_window", None)
    sliding = [i for i, kind in enumerate(getattr(config, "layer_types", None) or []) if kind != "full_attention"]
    if sliding and window and window < context_length:
        raise ExportError(f"{spec.architecture}: layers {sliding} use a sliding window of {window} tokens, shorter than "
                          f"context_length {context_length}; export with --context-length {window} or less")


def rope_tables(model: nn.Module, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) float16 `[context_length, head_dim]`: the model's own rotary embedding at positions 0..ctx-1
    (its rope type and scaling included), so the program and transformers rotate alike."""
    rotary = model.model.rotary_emb
    positions = torch.arange(context_length)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    return cos[0].to(torch.float16).numpy(), sin[0].to(torch.float16).numpy()


@dataclass
class ProgramWeights:
    """The model's weights as the program stores them: the job's compressed weights as iOS18 op inputs
    (`lut.py`), every other parameter as float16.

    `compressed` maps every module name of a compressed unit (tied names included) to its weight.
    `used` records which compressed units the program took, so none is left out silently.
    """

    model: nn.Module
    compressed: dict[str, CompressedWeight]
    written: dict[str, CoreMLLut | CoreMLQuantized] = field(default_factory=dict)  # module name -> what was written
    used: set[str] = field(default_factory=set)
    written_as: dict[str, str] = field(default_factory=dict)  # compressed module name -> the module whose var holds it

    def weight(self, module: str, rank: int) -> CoreMLLut | CoreMLQuantized | np.ndarray:
        """The weight of `module` at `rank` dimensions (1x1 convolutions: 4): iOS18 op inputs if compressed."""
        if module in self.compressed:
            unit = self.compressed[module]
            for name, other in self.compressed.items():
                if other is unit:  # tied names too
                    self.used.add(name)
                    self.written_as.setdefault(name, module)
            if module not in self.written:
                self.written[module] = coreml_weight(unit, rank)
            return self.written[module]
        value = self.model.get_submodule(module).weight.detach()
        return _float16(value).reshape(*value.shape, *[1] * (rank - value.dim()))

    def bias(self, module: str) -> np.ndarray | None:
        bias = getattr(self.model.get_submodule(module), "bias", None)
        return None if bias is None else _float16(bias.detach())

    def norm(self, module: str) -> np.ndarray:
        return _float16(self.model.get_submodule(module).weight.detach())

    def unused(self) -> list[str]:
        return sorted(set(self.compressed) - self.used)


def var_name(module: str, param: str = "weight") -> str:
    """The MIL name of a weight (Core ML keeps names with letters, digits and underscores)."""
    return f"{module}.{param}".replace(".", "_")


def _float16(tensor: torch.Tensor) -> np.ndarray:
    return tensor.to(torch.float32).to(torch.float16).contiguous().numpy()


def vocab_chunks(vocab: int, limit: int) -> list[tuple[int, int]]:
    """(start, stop) of the lm_head parts: as few as keep each under `limit` output channels, equal sizes
    rounded up to a multiple of 32 (the Neural Engine's preferred last-axis multiple), the last part smaller."""
    parts = math.ceil(vocab / limit)
    size = min(limit, 32 * math.ceil(math.ceil(vocab / parts) / 32))
    return [(start, min(start + size, vocab)) for start in range(0, vocab, size)]
