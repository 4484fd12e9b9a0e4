"""A job's compressed weight as the inputs of iOS18 `constexpr_lut_to_dense` / `constexpr_blockwise_shift_scale`.

Pure tensor code, no Core ML Tools: the same arrays are written into the package by `program.py` and
compared with the package's contents by `verify.py`. Nothing here clusters or re-derives an index:
the indices are the job's labels laid out in the weight's own element order, and the LUT is the
job's LUT in the rank-(K+2) shape iOS18 wants.

iOS18 layout for a weight of rank K (`shape` plus trailing 1s, e.g. `[out, in, 1, 1]` for a 1x1
convolution): `indices` has the weight's shape with `vector_axis` divided by `cluster_dim`; `lut` is
`[n_0, ..., n_{K-1}, 2**n_bits, cluster_dim]` where `n_a` is the number of LUTs along axis `a`
(`shape[channel_axis] / group_size` on the channel axis, 1 elsewhere).

What the job's format can hold beyond a plain float LUT, and how each becomes exact iOS18 ops:
- **per-channel scale**: folded into the LUT (one LUT per output channel, or per (output channel,
  group) when the groups run along another axis): `lut * scale` in float32, rounded once to float16,
  exactly as `PalettizedWeight.decode` computes it. Never a `constexpr_blockwise_shift_scale` after
  the LUT op: that layout fails to load on the Neural Engine (apple/coremltools#2688).
- **int8/uint8 LUT**: `constexpr_blockwise_shift_scale` (float16 scale per LUT, uint8 zero point as
  its offset) in front of `constexpr_lut_to_dense`, when a float16 scale reproduces the job's decoded
  float16 entries of every LUT bit for bit; otherwise the LUT is written as its float16 decode (exact,
  2 bytes per entry instead of 1) and a note says so. The job stores float32 scales, and Core ML
  dequantizes a LUT in float16, so only a float16-representable scale is exact in general.
- **outliers** (dense-and-sparse): the LUT weight stays as the job has it; the outlier values go
  into an iOS18 `constexpr_sparse_to_dense` whose bit mask also marks where they replace it (`select`).

A linear-quantized weight (`QuantizedWeight`: n-bit integers, a float32 scale and optional zero point
per block) becomes `constexpr_blockwise_shift_scale` (the integers as int4/uint4 or int8/uint8, a
float16 scale and the zero point as offset) when float16 scales reproduce its `decode()` bit for bit;
otherwise, to stay exact, a `constexpr_lut_to_dense` whose indices are the job's integer codes and
whose LUT per block holds the 2**n_bits values those codes decode to (a note says so).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmpalette.layout.packing import unpack_bits
from llmpalette.layout.palettized import PalettizedWeight, ungroup_view
from llmpalette.layout.quantized import QuantizedWeight
from llmpalette.maths.uniform import dequantize_blocks


@dataclass(frozen=True)
class CoreMLLut:
    """The inputs of the iOS18 ops for one palettized weight of shape `shape` (see the module docstring)."""

    shape: tuple[int, ...]               # the dense weight as the program uses it (job shape + trailing 1s)
    indices: np.ndarray                  # uint8 values < 2**n_bits, shape with vector_axis / cluster_dim
    lut: np.ndarray                      # float16, or int8 | uint8 with lut_scale: [*lut_counts, 2**n_bits, cluster_dim]
    n_bits: int
    vector_axis: int | None = None
    lut_scale: np.ndarray | None = None  # float16 [*lut_counts, 1, 1] when lut is int8 | uint8
    lut_offset: np.ndarray | None = None  # uint8 like lut_scale when lut is uint8 (the zero point)
    outlier_mask: np.ndarray | None = None    # bool, `shape`: True where the weight is an outlier
    outlier_values: np.ndarray | None = None  # float16 [n_outliers], row-major order of the mask
    notes: tuple[str, ...] = ()          # what differs from a plain float LUT, for the export summary

    @property
    def lut_bytes(self) -> int:
        extra = sum(a.nbytes for a in (self.lut_scale, self.lut_offset) if a is not None)
        return self.lut.nbytes + extra


@dataclass(frozen=True)
class CoreMLQuantized:
    """The inputs of iOS18 `constexpr_blockwise_shift_scale` for one linear-quantized weight of shape `shape`."""

    shape: tuple[int, ...]
    data: np.ndarray            # int8 | uint8 integers, `shape`
    n_bits: int
    signed: bool
    scale: np.ndarray           # float16, one per block: [shape[i] / block_size[i] ...]
    offset: np.ndarray | None = None  # the zero point, like `scale`, in the integers' dtype
    notes: tuple[str, ...] = ()

    @property
    def storage_bits(self) -> int:
        """Core ML stores 4- or 8-bit integers: int4/uint4 up to 4 bits, int8/uint8 above."""
        return 4 if self.n_bits <= 4 else 8


def coreml_weight(weight: PalettizedWeight | QuantizedWeight, rank: int) -> CoreMLLut | CoreMLQuantized:
    """The iOS18 op inputs of either kind of compressed weight, as a tensor of `rank` dimensions."""
    if isinstance(weight, QuantizedWeight):
        return coreml_quantized(weight, rank)
    return coreml_lut(weight, rank)


def coreml_quantized(weight: QuantizedWeight, rank: int) -> CoreMLQuantized | CoreMLLut:
    """`constexpr_blockwise_shift_scale` inputs when float16 scales are exact, else an exact per-block LUT."""
    shape = _padded(weight.shape, rank)
    pad = (1,) * (rank - len(weight.shape))
    integers = weight.integers()
    zero = weight.zero_point
    scale16 = weight.scale.to(torch.float16)
    # Core ML: (q - offset) * scale in float16; q - offset has at most 9 bits, so the float32 product is exact
    core_ml = dequantize_blocks(integers, scale16.to(torch.float32), zero, weight.block_sizes).to(torch.float16)
    if torch.equal(core_ml.view(torch.int16), weight.decode(torch.float16).view(torch.int16)):
        return CoreMLQuantized(
            shape=shape,
            data=integers.numpy().reshape(shape),
            n_bits=weight.n_bits,
            signed=weight.signed,
            scale=scale16.numpy().reshape(*weight.scale_shape, *pad),
            offset=None if zero is None else zero.numpy().reshape(*weight.scale_shape, *pad),
        )
    entries = 2**weight.n_bits
    codes = torch.arange(entries)
    values = codes - entries * (codes >= entries // 2) if weight.signed else codes  # the integer each code stores
    centred = values.to(torch.float32) - (0.0 if zero is None else zero.to(torch.float32).reshape(-1, 1))
    table = _float16(centred * weight.scale.reshape(-1, 1))  # [blocks, entries]: (q - zero_point) * scale, as decode
    indices = unpack_bits(weight.data, weight.n_bits, weight.numel).numpy().reshape(shape)
    note = (f"linear-quantized ({'int' if weight.signed else 'uint'}{weight.n_bits}) written as a LUT per block of the "
            f"{entries} float16 values its codes decode to: no float16 scale reproduces the job's float32-scale "
            "decode bit for bit")
    return CoreMLLut(shape=shape, indices=indices, lut=table.reshape(*weight.scale_shape, *pad, entries, 1),
                     n_bits=weight.n_bits, notes=(note,))


def _padded(shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    if rank < len(shape):
        raise ValueError(f"rank: a weight of shape {list(shape)} cannot be written with rank {rank}")
    return tuple(shape) + (1,) * (rank - len(shape))


def coreml_lut(weight: PalettizedWeight, rank: int) -> CoreMLLut:
    """The iOS18 form of `weight` as a tensor of `rank` dimensions (its shape padded with 1s).

    Raises ValueError if `rank` is smaller than the weight's. Group sizes always divide their
    channels here: `PalettizedWeight` refuses any other layout when it is built.
    """
    shape = _padded(weight.shape, rank)
    indices = _indices(weight, shape)
    lut, scale, offset, notes = _lut(weight, rank)
    mask, values = _outliers(weight, shape)
    if mask is not None:
        notes += ("dense-and-sparse: the job's outliers as an iOS18 constexpr_sparse_to_dense (a 1-bit mask per weight "
                  "and the float16 values) selected over the LUT weight",)
    return CoreMLLut(
        shape=shape,
        indices=indices,
        lut=lut,
        n_bits=weight.n_bits,
        vector_axis=weight.vector_axis if weight.cluster_dim > 1 else None,
        lut_scale=scale,
        lut_offset=offset,
        outlier_mask=mask,
        outlier_values=values,
        notes=notes,
    )


def _indices(weight: PalettizedWeight, shape: tuple[int, ...]) -> np.ndarray:
    """The job's labels in the weight's element order: one per element, or per vector (its first element)."""
    d = weight.cluster_dim
    per_element = weight.labels().unsqueeze(-1).expand(-1, -1, d)  # [n_groups, n_per_group, d]
    grid = ungroup_view(per_element, weight.shape, weight.channel_axis, weight.group_size, d, weight.vector_axis)
    if d > 1:  # every element of a vector carries its label: keep the first of each
        grid = grid[tuple(slice(None, None, d) if axis == weight.vector_axis else slice(None) for axis in range(grid.dim()))]
    out_shape = list(shape)
    if d > 1:
        out_shape[weight.vector_axis] //= d
    return grid.to(torch.uint8).contiguous().numpy().reshape(out_shape)


def _lut_counts(weight: PalettizedWeight, rank: int) -> list[int]:
    """LUTs along each axis: the job's groups on its channel axis, 1 elsewhere."""
    counts = [1] * rank
    counts[weight.channel_axis] = weight.n_groups
    return counts


def _lut(weight: PalettizedWeight, rank: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, tuple[str, ...]]:
    """(lut, lut_scale, lut_offset, notes) of the iOS18 ops."""
    entries, d = 2**weight.n_bits, weight.cluster_dim
    if weight.channel_scale is not None:
        return _folded_lut(weight, rank)
    counts = _lut_counts(weight, rank)
    if weight.lut.dtype in (torch.int8, torch.uint8):
        quantized = _quantized_lut(weight)
        if quantized is not None:
            q, scale, offset = quantized
            return (q.reshape(*counts, entries, d), scale.reshape(*counts, 1, 1),
                    None if offset is None else offset.reshape(*counts, 1, 1), ())
        note = (f"{_dtype(weight.lut)} LUT written as its float16 decode: no float16 scale reproduces the job's "
                "float32-scale entries bit for bit")
        return _float16(weight.decoded_lut()).reshape(*counts, entries, d), None, None, (note,)
    return _float16(weight.lut).reshape(*counts, entries, d), None, None, ()


def _float16(values: torch.Tensor) -> np.ndarray:
    """float32 (or float16) values rounded once to float16, as `decode(torch.float16)` rounds them."""
    return values.to(torch.float32).to(torch.float16).numpy()


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _quantized_lut(weight: PalettizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(q, float16 scale [G], uint8 offset [G] or None) when float16 scales reproduce every LUT exactly, else None.

    Core ML computes `scale * (q - offset)` in float16: the product of an 8-bit integer and a float16
    is exact in float32, so the entry is that product rounded once. The job's entry is the float32
    product with the float32 scale, rounded to float16. The scale rounded to float16 is the only
    candidate that can match every entry in general; it is checked entry by entry.
    """
    wanted = _float16(weight.decoded_lut())  # [G, K, d]
    q = weight.lut.numpy()
    offset = None if weight.lut_zero_point is None else weight.lut_zero_point.numpy().reshape(-1)
    centred = q.astype(np.float32) - (0.0 if offset is None else offset.astype(np.float32)[:, None, None])
    scale = weight.lut_scale.numpy().reshape(-1).astype(np.float16)  # [G]
    got = (centred * scale.astype(np.float32)[:, None, None]).astype(np.float16)
    if not np.array_equal(got.view(np.uint16), wanted.view(np.uint16)):
        return None
    return q, scale, offset


def _folded_lut(weight: PalettizedWeight, rank: int) -> tuple[np.ndarray, None, None, tuple[str, ...]]:
    """One float16 LUT per output channel (and group): `lut * channel_scale` in float32, rounded once.

    With vectors along axis 0 a vector spans `cluster_dim` output channels, so each LUT entry's
    elements take their own channel's scale and the LUTs are per row of vectors.
    """
    entries, d = 2**weight.n_bits, weight.cluster_dim
    lut = weight.decoded_lut()  # [G, K, d] float32
    scale = weight.channel_scale.to(torch.float32)  # [out]
    out = weight.shape[0]
    if weight.channel_axis == 0:
        span = d if weight.vector_axis == 0 else 1  # output channels one index covers
        rows = out // span
        owner = torch.arange(rows) * span // weight.group_size  # the job's group of each LUT row
        folded = _float16(lut[owner] * scale.view(rows, 1, span))  # [rows, K, d]
        counts = [1] * rank
        counts[0] = rows
    else:
        # groups along another axis: one LUT per (output channel, group)
        folded = _float16(lut.unsqueeze(0) * scale.view(out, 1, 1, 1))  # [out, G, K, d]
        counts = [1] * rank
        counts[0], counts[weight.channel_axis] = out, weight.n_groups
    per = "output channel" if weight.channel_axis == 0 else "(output channel, group)"
    note = (f"per-channel scale folded into the LUTs (one float16 LUT per {per}, exact); "
            "no scale op after the LUT op, which fails to load on the Neural Engine (apple/coremltools#2688)")
    return folded.reshape(*counts, entries, d), None, None, (note,)


def _outliers(weight: PalettizedWeight, shape: tuple[int, ...]) -> tuple[np.ndarray | None, np.ndarray | None]:
    if not weight.n_outliers:
        return None, None
    mask = np.zeros(int(np.prod(shape)), dtype=bool)
    mask[weight.outlier_positions.numpy().astype(np.int64)] = True  # flat row-major positions; trailing 1s keep them
    return mask.reshape(shape), weight.outlier_values.numpy().astype(np.float16)
