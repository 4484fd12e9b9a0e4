"""The decoder as an iOS18 ML Program laid out for the Neural Engine, built op by op with the MIL builder.

One function per shape: `prefill` (S = prefill_length tokens) and `decode` (S = 1). Both read the same
weights and the same states; `package.py` saves them as one multifunction package that stores every
weight once. Layout and choices follow Apple's Neural Engine guidance and what ANEMLL ships:

- float16 everywhere; static shapes; tensors of rank <= 4.
- hidden states as (B, C, 1, S); every linear layer a 1x1 `conv` whose weight is `[out, in, 1, 1]`.
- RMSNorm as `layer_norm` over `concat([x, -x])` (mean 0, so it normalises by the root mean square)
  and a per-channel weight: it avoids squaring float16 activations, which overflows above 256.
- inputs: `input_ids` int32 `[1, S]`, `position_ids` int32 `[S]` (absolute positions; the first is
  where the new keys and values go in the cache), and `causal_mask` float16 `[1, 1, S, context]`:
  0 where query i may see cache slot j, `MASK_VALUE` (a large negative number, not -inf) elsewhere.
- RoPE from `cos`/`sin` tables `[context, head_dim]` gathered at `position_ids`.
- the KV cache as iOS18 states, `key_cache_N` and `value_cache_N` `[1, kv_heads, context, head_dim]`
  per layer, updated with `slice_update` at the positions; attention reads the whole cache and the
  mask hides what is not there yet. Grouped-query attention by reshaping the queries of one
  key/value head together (no repeat of the cache).
- the lm_head split into parts of at most 16384 output channels (the Neural Engine's dimension
  limit), outputs `logits_0 ... logits_{n-1}` `[1, S, part]`: concatenate them for the vocabulary.
- a tied embedding is one weight: `gather` reads it for the input and the lm_head parts slice it.

Compressed weights are `constexpr_lut_to_dense` with the job's LUT and indices, or
`constexpr_blockwise_shift_scale` with the job's integers (`lut.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmpalette.export.coreml.architecture import DecoderSpec, ProgramWeights, var_name, vocab_chunks
from llmpalette.export.coreml.lut import CoreMLLut, CoreMLQuantized

MASK_VALUE = -1e4        # additive mask for hidden cache slots: exp(-1e4) is 0 in float16, and no inf reaches the NE
NEURAL_ENGINE_MAX_DIM = 16384


@dataclass(frozen=True)
class ProgramShape:
    """Fixed shapes of the two functions."""

    context_length: int = 512
    prefill_length: int = 64
    vocab_limit: int = NEURAL_ENGINE_MAX_DIM  # lm_head parts have at most this many output channels


def decoder_program(spec: DecoderSpec, weights: ProgramWeights, rope: tuple[np.ndarray, np.ndarray],
                    shape: ProgramShape, seq_len: int):
    """A single-function MIL program ("main") running `seq_len` tokens through the decoder."""
    from llmpalette.export.coreml.package import coremltools

    ct = coremltools()  # first: it silences Core ML Tools' import-time warnings
    from coremltools.converters.mil import mil
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    ctx = shape.context_length
    cache = (1, spec.kv_heads, ctx, spec.head_dim)
    inputs = {
        "input_ids": mb.TensorSpec((1, seq_len), types.int32),
        "position_ids": mb.TensorSpec((seq_len,), types.int32),
        "causal_mask": mb.TensorSpec((1, 1, seq_len, ctx), types.fp16),
    }
    for i in range(spec.layers):
        inputs[f"key_cache_{i}"] = mb.StateTensorSpec(cache, types.fp16)
        inputs[f"value_cache_{i}"] = mb.StateTensorSpec(cache, types.fp16)
    with mil.Function(inputs, opset_version=ct.target.iOS18) as function:
        builder = _Builder(mb, spec, weights, seq_len, ctx)
        logits = builder.decoder(function.inputs, rope, shape.vocab_limit)
        function.set_outputs(logits)
    program = mil.Program()
    program.add_function("main", function)
    return program


class _Builder:
    """Emits the ops of one function; `mb` is Core ML Tools' MIL builder."""

    def __init__(self, mb, spec: DecoderSpec, weights: ProgramWeights, seq_len: int, context_length: int):
        self.mb, self.spec, self.weights, self.S, self.ctx = mb, spec, weights, seq_len, context_length

    # -- weights ----------------------------------------------------------------------------
    def weight(self, module: str, rank: int):
        value = self.weights.weight(module, rank)
        name = var_name(module)
        if isinstance(value, np.ndarray):
            return self.mb.const(val=value, name=name)
        if isinstance(value, CoreMLQuantized):
            return self.quantized(value, name)
        return self.palettized(value, name)

    def quantized(self, weight: CoreMLQuantized, name: str):
        """constexpr_blockwise_shift_scale with the job's integers, float16 scales and zero points."""
        from coremltools.converters.mil.mil import types  # imported quietly by `decoder_program`

        kind = f"{'int' if weight.signed else 'uint'}{weight.storage_bits}"
        dtype = types.nptype_from_builtin(types.string_to_builtin(kind))
        offset = {} if weight.offset is None else {"offset": weight.offset.astype(dtype)}
        return self.mb.constexpr_blockwise_shift_scale(data=weight.data.astype(dtype), scale=weight.scale, name=name, **offset)

    def palettized(self, lut: CoreMLLut, name: str):
        """constexpr_lut_to_dense with the job's LUT and indices (+ the ops `lut.py` describes)."""
        from coremltools.converters.mil.mil import types  # imported quietly by `decoder_program`

        mb = self.mb
        table = lut.lut
        if lut.lut_scale is not None:
            offset = {} if lut.lut_offset is None else {"offset": lut.lut_offset}
            table = mb.constexpr_blockwise_shift_scale(data=lut.lut, scale=lut.lut_scale, name=f"{name}_lut", **offset)
        indices = lut.indices.astype(types.nptype_from_builtin(types.string_to_builtin(f"uint{lut.n_bits}")))
        axis = {} if lut.vector_axis is None else {"vector_axis": np.int32(lut.vector_axis)}
        dense_name = name if lut.outlier_mask is None else f"{name}_palettized"
        dense = mb.constexpr_lut_to_dense(indices=indices, lut=table, name=dense_name, **axis)
        if lut.outlier_mask is None:
            return dense
        mask = mb.const(val=lut.outlier_mask.astype(types.nptype_from_builtin(types.uint1)), name=f"{name}_outlier_mask")
        values = mb.constexpr_sparse_to_dense(nonzero_data=lut.outlier_values, mask=mask, name=f"{name}_outliers")
        marks = mb.constexpr_sparse_to_dense(nonzero_data=np.ones(lut.outlier_values.shape, np.float16), mask=mask,
                                             name=f"{name}_outlier_marks")
        where = mb.not_equal(x=marks, y=np.float16(0), name=f"{name}_outlier_where")
        return mb.select(cond=where, a=values, b=dense, name=name)

    # -- layers -----------------------------------------------------------------------------
    def linear(self, x, module: str):
        """A linear layer as a 1x1 convolution: x `[1, in, 1, S]` -> `[1, out, 1, S]`."""
        bias = self.weights.bias(module)
        extra = {} if bias is None else {"bias": bias}
        return self.mb.conv(x=x, weight=self.weight(module, 4), name=f"{var_name(module, 'out')}", **extra)

    def rms_norm(self, x, module: str, channels: int):
        mb = self.mb
        both = mb.concat(values=[x, mb.mul(x=x, y=np.float16(-1))], axis=1)
        normed = mb.layer_norm(x=both, axes=[1], epsilon=np.float16(self.spec.rms_eps))
        half = mb.slice_by_index(x=normed, begin=[0, 0, 0, 0], end=[1, channels, 1, self.S])
        return mb.mul(x=half, y=self.weights.norm(module).reshape(1, channels, 1, 1), name=var_name(module, "out"))

    def heads(self, x, count: int):
        """`[1, count*head_dim, 1, S]` -> `[1, count, S, head_dim]`."""
        mb, d = self.mb, self.spec.head_dim
        return mb.transpose(x=mb.reshape(x=x, shape=[1, count, d, self.S]), perm=[0, 1, 3, 2])

    def rotate(self, x, cos, sin):
        """RoPE: x * cos + rotate_half(x) * sin, x `[1, h, S, head_dim]`, cos/sin `[S, head_dim]`."""
        mb, h = self.mb, self.spec.head_dim // 2
        shape = x.shape
        first = mb.slice_by_index(x=x, begin=[0, 0, 0, 0], end=[shape[0], shape[1], shape[2], h])
        second = mb.slice_by_index(x=x, begin=[0, 0, 0, h], end=list(shape))
        rotated = mb.concat(values=[mb.mul(x=second, y=np.float16(-1)), first], axis=3)
        return mb.add(x=mb.mul(x=x, y=cos), y=mb.mul(x=rotated, y=sin))

    def cached(self, state, value, begin):
        """Write `value` `[1, kv, S, d]` into the state at the positions; returns the whole updated cache."""
        mb, spec = self.mb, self.spec
        current = mb.read_state(input=state)
        end = mb.add(x=begin, y=np.array([1, spec.kv_heads, self.S, spec.head_dim], dtype=np.int32))
        updated = mb.slice_update(x=current, update=value, begin=begin, end=end)
        mb.coreml_update_state(state=state, value=updated)
        return updated

    def attention(self, x, layer: int, inputs, cos, sin, begin):
        mb, spec, S, ctx = self.mb, self.spec, self.S, self.ctx
        prefix = f"model.layers.{layer}.self_attn"
        q = self.rotate(self.heads(self.linear(x, f"{prefix}.q_proj"), spec.heads), cos, sin)
        k = self.rotate(self.heads(self.linear(x, f"{prefix}.k_proj"), spec.kv_heads), cos, sin)
        v = self.heads(self.linear(x, f"{prefix}.v_proj"), spec.kv_heads)
        keys = self.cached(inputs[f"key_cache_{layer}"], k, begin)       # [1, kv, ctx, d]
        values = self.cached(inputs[f"value_cache_{layer}"], v, begin)
        grouped = [1, spec.kv_heads, spec.groups * S, spec.head_dim]      # the queries of one kv head together
        q = mb.reshape(x=mb.mul(x=q, y=np.float16(1 / np.sqrt(spec.head_dim))), shape=grouped)
        scores = mb.reshape(x=mb.matmul(x=q, y=keys, transpose_y=True), shape=[1, spec.heads, S, ctx])
        weights = mb.softmax(x=mb.add(x=scores, y=inputs["causal_mask"]), axis=3)
        weights = mb.reshape(x=weights, shape=[1, spec.kv_heads, spec.groups * S, ctx])
        context = mb.reshape(x=mb.matmul(x=weights, y=values), shape=[1, spec.heads, S, spec.head_dim])
        context = mb.reshape(x=mb.transpose(x=context, perm=[0, 1, 3, 2]), shape=[1, spec.heads * spec.head_dim, 1, S])
        return self.linear(context, f"{prefix}.o_proj")

    def mlp(self, x, layer: int):
        mb, prefix = self.mb, f"model.layers.{layer}.mlp"
        gate = mb.silu(x=self.linear(x, f"{prefix}.gate_proj"))
        return self.linear(mb.mul(x=gate, y=self.linear(x, f"{prefix}.up_proj")), f"{prefix}.down_proj")

    def decoder(self, inputs, rope: tuple[np.ndarray, np.ndarray], vocab_limit: int) -> list:
        mb, spec, S = self.mb, self.spec, self.S
        table = self.weight("model.embed_tokens", 2)  # [vocab, hidden]
        x = mb.gather(x=table, indices=inputs["input_ids"], axis=0)  # [1, S, hidden]
        x = mb.expand_dims(x=mb.transpose(x=x, perm=[0, 2, 1]), axes=[2])  # [1, hidden, 1, S]
        positions = inputs["position_ids"]
        cos = mb.gather(x=mb.const(val=rope[0], name="rope_cos"), indices=positions, axis=0)  # [S, d]
        sin = mb.gather(x=mb.const(val=rope[1], name="rope_sin"), indices=positions, axis=0)
        first = mb.slice_by_index(x=positions, begin=[0], end=[1])
        begin = mb.concat(values=[np.array([0, 0], dtype=np.int32), first, np.array([0], dtype=np.int32)], axis=0)
        for layer in range(spec.layers):
            prefix = f"model.layers.{layer}"
            h = self.rms_norm(x, f"{prefix}.input_layernorm", spec.hidden)
            x = mb.add(x=x, y=self.attention(h, layer, inputs, cos, sin, begin))
            h = self.rms_norm(x, f"{prefix}.post_attention_layernorm", spec.hidden)
            x = mb.add(x=x, y=self.mlp(h, layer), name=var_name(prefix, "out"))
        x = self.rms_norm(x, "model.norm", spec.hidden)
        head = table if spec.tied else self.weight("lm_head", 2)
        logits = []
        for i, (start, stop) in enumerate(vocab_chunks(spec.vocab, vocab_limit)):
            part = mb.slice_by_index(x=head, begin=[start, 0], end=[stop, spec.hidden])
            part = mb.expand_dims(x=part, axes=[2, 3])  # [part, hidden, 1, 1]
            y = mb.conv(x=x, weight=part)  # [1, part, 1, S]
            y = mb.transpose(x=mb.reshape(x=y, shape=[1, stop - start, S]), perm=[0, 2, 1], name=f"logits_{i}")
            logits.append(y)
        return logits


def causal_mask(positions: np.ndarray, context_length: int) -> np.ndarray:
    """The `causal_mask` input for queries at `positions` (int `[S]`): float16 `[1, 1, S, context_length]`,
    0 where cache slot j <= the query's position, `MASK_VALUE` elsewhere.

    Padding at the end of a last, partial prefill may take the next positions: the cache slots it writes
    are hidden from every real token until a later token's own write replaces them.
    """
    positions = np.asarray(positions, dtype=np.int64)
    visible = np.arange(context_length)[None, :] <= positions[:, None]
    return np.where(visible, 0.0, MASK_VALUE).astype(np.float16)[None, None]
