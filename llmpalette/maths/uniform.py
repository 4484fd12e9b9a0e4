"""Uniform (linear) quantization grids, with Core ML Tools' round-to-nearest conventions.

A weight is cut into blocks by `block_sizes`, one size per axis, each dividing its axis:
`shape` itself is one block (per tensor), `(1, *shape[1:])` one block per output channel,
`(1, b, *shape[2:])` blocks of `b` along the input axis. Each block has a float32 `scale` and,
for affine grids and unsigned symmetric ones, an integer `zero_point`; both are stored with one
entry per block, shaped `[shape[0] / block_sizes[0], shape[1] / block_sizes[1], ...]` (the same
rank as the weight, as Core ML Tools' `compute_qparams` and Core ML's
`constexpr_blockwise_shift_scale` shape them).

An element w of a block becomes the integer q = clamp(round(w / scale) + zero_point, qmin, qmax)
(round half to even) and stands for (q - zero_point) * scale. The grid of a block is Core ML
Tools' (`coremltools/optimize/_utils.py`, `get_quant_range` and `quantize_weight_by_dtype`):

- range: signed n bits [-2**(n-1), 2**(n-1) - 1], unsigned [0, 2**n - 1]; the symmetric scheme
  drops one end so the grid is symmetric about zero: signed [-(2**(n-1) - 1), 2**(n-1) - 1],
  unsigned [0, 2**n - 2].
- symmetric: lo, hi = -m, m with m = max |w| over the block; signed: no zero point; unsigned: the
  zero point is qmax // 2 (127 for uint8, 7 for uint4).
- affine: lo = min(min w, 0), hi = max(max w, 0); zero_point = round((qmin*hi - qmax*lo) / (hi - lo))
  clamped to [qmin, qmax], so 0.0 is exactly on the grid.
- scale = (hi - lo) / (qmax - qmin).

Every step is one float32 operation in that order, so the scales, zero points and integers are
bit-identical to Core ML Tools' on a float32 weight. One deliberate difference: a block whose
range is 0 (all zeros) gets scale 1 and zero point 0 (or the unsigned symmetric constant); Core
ML Tools divides by a zero scale there and casts NaN to an integer (its decoded weight is 0 either
way, and so is ours).

Pure tensor functions; no modules, files or configs. GPTQ uses `quantize_column` one column at a time.
"""
from __future__ import annotations

from typing import Literal

import torch

Scheme = Literal["symmetric", "affine"]
SCHEMES: tuple[str, ...] = ("symmetric", "affine")


def storage_range(n_bits: int, signed: bool) -> tuple[int, int]:
    """The integers an n-bit value can hold: [-2**(n-1), 2**(n-1) - 1] signed, [0, 2**n - 1] unsigned."""
    if signed:
        return -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    return 0, 2**n_bits - 1


def quant_range(n_bits: int, signed: bool, scheme: str) -> tuple[int, int]:
    """(qmin, qmax) of a grid: the storage range, less one end for the symmetric scheme
    (Core ML Tools' `get_quant_range`: signed drops the lowest value, unsigned the highest)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: must be one of {SCHEMES}, got {scheme!r}")
    qmin, qmax = storage_range(n_bits, signed)
    if scheme == "symmetric":
        return (qmin + 1, qmax) if signed else (qmin, qmax - 1)
    return qmin, qmax


def check_block_sizes(shape: tuple[int, ...], block_sizes: tuple[int, ...]) -> None:
    """Raise ValueError unless `block_sizes` has one positive divisor of each axis of `shape`."""
    if len(block_sizes) != len(shape):
        raise ValueError(f"block_sizes: must have one entry per axis of shape {list(shape)}, got {list(block_sizes)}")
    for axis, (size, block) in enumerate(zip(shape, block_sizes)):
        if block < 1 or size % block:
            raise ValueError(
                f"block_sizes: {block} along axis {axis} must be a positive divisor of {size} (shape {list(shape)})"
            )


def block_counts(shape: tuple[int, ...], block_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of `scale` and `zero_point`: blocks along each axis."""
    return tuple(size // block for size, block in zip(shape, block_sizes))


def to_blocks(weight: torch.Tensor, block_sizes: tuple[int, ...]) -> torch.Tensor:
    """`weight` viewed as `[n0, b0, n1, b1, ...]`: block counts and block sizes interleaved."""
    shape = tuple(weight.shape)
    check_block_sizes(shape, block_sizes)
    interleaved = [d for count, block in zip(block_counts(shape, block_sizes), block_sizes) for d in (count, block)]
    return weight.reshape(interleaved)


def per_block(param: torch.Tensor) -> torch.Tensor:
    """A `[n0, n1, ...]` scale or zero point as `[n0, 1, n1, 1, ...]`, to broadcast against `to_blocks`."""
    return param.reshape([d for count in param.shape for d in (count, 1)])


def uniform_grid(
    weight: torch.Tensor, block_sizes: tuple[int, ...], n_bits: int, signed: bool, scheme: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The round-to-nearest grid of every block of `weight` (see the module docstring).

    Returns `(scale, zero_point)`: `scale` float32 `[n0, n1, ...]`, positive; `zero_point` int32 of
    the same shape, or None for a signed symmetric grid. Computed in float32 whatever `weight`'s dtype.
    """
    qmin, qmax = quant_range(n_bits, signed, scheme)
    blocks = to_blocks(weight.detach().to(torch.float32), block_sizes)
    inner = tuple(range(1, blocks.dim(), 2))
    lo, hi = blocks.amin(dim=inner), blocks.amax(dim=inner)  # [n0, n1, ...]
    if scheme == "symmetric":
        hi = torch.maximum(lo.abs(), hi.abs())
        lo = -hi
    else:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    span = hi - lo
    empty = span == 0
    scale = torch.where(empty, torch.ones_like(span), span / (qmax - qmin))
    if scheme == "symmetric":
        if signed:
            return scale, None
        return scale, torch.full_like(scale, qmax // 2, dtype=torch.int32)
    zero_point = torch.round((qmin * hi - qmax * lo) / span).clamp(qmin, qmax)
    zero_point = torch.where(empty, torch.zeros_like(zero_point), zero_point)
    return scale, zero_point.to(torch.int32)


def quantize_to_grid(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int
) -> torch.Tensor:
    """Round to nearest on the grid: clamp(round(w / scale) + zero_point, qmin, qmax), in float32.

    `w`, `scale` and `zero_point` broadcast against each other (any dtype; computed in float32,
    as Core ML Tools does). Returns the integers as int32.
    """
    q = torch.round(w.to(torch.float32) / scale.to(torch.float32))
    if zero_point is not None:
        q = q + zero_point.to(torch.float32)
    return q.clamp(qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """The value an integer stands for: (q - zero_point) * scale in float32, one rounding (q - zero_point
    is exact). The decode rule of the linear-quantized format and of Core ML's
    `constexpr_blockwise_shift_scale`. Arguments broadcast against each other."""
    values = q.to(torch.float32)
    if zero_point is not None:
        values = values - zero_point.to(torch.float32)
    return values * scale.to(torch.float32)


def quantize_blocks(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    block_sizes: tuple[int, ...],
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """`quantize_to_grid` of a whole weight with one scale (and zero point) per block: int32 of `weight`'s shape."""
    blocks = to_blocks(weight, block_sizes)
    zp = None if zero_point is None else per_block(zero_point)
    return quantize_to_grid(blocks, per_block(scale), zp, qmin, qmax).reshape(weight.shape)


def dequantize_blocks(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, block_sizes: tuple[int, ...]
) -> torch.Tensor:
    """`dequantize` of integers `q` with one scale (and zero point) per block: float32 of `q`'s shape."""
    zp = None if zero_point is None else per_block(zero_point)
    return dequantize(to_blocks(q, block_sizes), per_block(scale), zp).reshape(q.shape)


def quantize_column(
    column: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One column of a weight `[out]` onto its rows' grids `[out]`: (integers int32, their float32 values).

    The step GPTQ repeats for each column, the same rounding as `quantize_blocks` element for element.
    """
    q = quantize_to_grid(column, scale, zero_point, qmin, qmax)
    return q, dequantize(q, scale, zero_point)



class UniformColumns:
    """GPTQ's column quantizer onto a 2-D weight's uniform grids (`maths.gptq.gptq`'s `quantize`): each
    row's scale and zero point per block of columns, `[rows, blocks]` float32 (a block of
    `block_sizes[0]` rows shares one value, repeated here), set by `set_block` (GPTQ's groups refit them)
    and read per column; the integers chosen are kept in `integers` [rows, columns] int32.

    Called per column (`quantize_column`, on any device), or per segment of a lazy batch (`columns`, the
    compiled `gptq_kernels.uniform_columns`, CPU): the same float32 operations, the same values up to
    float rounding."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor | None, block_sizes: tuple[int, int],
                 qmin: int, qmax: int, columns: int):
        self.rows_per_block, self.columns_per_block = block_sizes
        self.row_scale = scale.to(torch.float32).repeat_interleave(self.rows_per_block, 0)
        self.row_zero = torch.zeros_like(self.row_scale) if zero_point is None else \
            zero_point.to(torch.float32).repeat_interleave(self.rows_per_block, 0)
        self.signed_symmetric = zero_point is None
        self.qmin, self.qmax = qmin, qmax
        self.integers = torch.zeros((self.row_scale.shape[0], columns), dtype=torch.int32, device=scale.device)

    def set_block(self, block: int, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        """Block column `block`'s scale (and zero point), one value per block of rows."""
        self.row_scale[:, block] = scale.to(torch.float32).repeat_interleave(self.rows_per_block)
        if zero_point is not None:
            self.row_zero[:, block] = zero_point.to(torch.float32).repeat_interleave(self.rows_per_block)

    def __call__(self, column: torch.Tensor, j: int) -> torch.Tensor:
        block = j // self.columns_per_block
        zero = None if self.signed_symmetric else self.row_zero[:, block]
        q, values = quantize_column(column, self.row_scale[:, block], zero, self.qmin, self.qmax)
        self.integers[:, j] = q
        return values

    def columns(self, wt, u1, errt, qt, start: int, stop: int, original: torch.Tensor) -> None:
        """A segment of GPTQ's lazy batch, transposed ([B, rows]), at once (`gptq_kernels.uniform_columns`)."""
        from llmpalette.maths.gptq_kernels import uniform_columns

        blocks = original // self.columns_per_block
        scales = self.row_scale[:, blocks].t().contiguous()
        zeros = self.row_zero[:, blocks].t().contiguous()
        ints = torch.empty(scales.shape, dtype=torch.int32)
        uniform_columns(wt.numpy(), u1.numpy(), errt.numpy(), qt.numpy(), start, stop, scales.numpy(), zeros.numpy(),
                        ints.numpy(), self.qmin, self.qmax)
        self.integers[:, original] = ints.t()


def clipped_grid(
    weight: torch.Tensor, block_sizes: tuple[int, ...], n_bits: int, signed: bool, scheme: str,
    importance: torch.Tensor, *, steps: int = 20, shrink: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`uniform_grid` with each block's range shrunk by the factor (1, 1 - shrink, ..., 1 - (steps-1) *
    shrink) that minimises that block's importance-weighted rounding error Σ importance · (w - ŵ)²
    (the GPTQ authors' `mse` grid search, weighted; GPTQ passes its Hessian's diagonal, the error per
    unit² of each input column). A shrunk grid clips the largest weights a little to round all the
    others more finely. Each candidate is `uniform_grid` of the shrunk weight, so it follows the same
    conventions (symmetric, affine, zero points); factor 1 is `uniform_grid` itself, kept on ties.

    importance: broadcastable to `weight` (e.g. [1, columns]), non-negative.
    """
    w = weight.detach().to(torch.float32)
    qmin, qmax = quant_range(n_bits, signed, scheme)
    blocks = to_blocks(w, block_sizes)
    inner = tuple(range(1, blocks.dim(), 2))
    weights = to_blocks(importance.to(torch.float32).expand_as(w).contiguous(), block_sizes)
    # a block's grid depends only on its min and max, and min(p·w) = p·min(w) exactly (rounding is
    # monotonic): each candidate is `uniform_grid` of the blocks' (min, max) pairs, shrunk
    counts = block_counts(tuple(w.shape), block_sizes)
    pairs = torch.stack([blocks.amin(dim=inner), blocks.amax(dim=inner)], dim=-1).reshape(-1, 2)
    best_scale, best_zero, best_error = None, None, None
    for step in range(steps):
        factor = 1.0 - step * shrink
        scale, zero = uniform_grid(pairs * factor, (1, 2), n_bits, signed, scheme)
        scale = scale.reshape(counts)
        zero = None if zero is None else zero.reshape(counts)
        s = per_block(scale)
        # (values − w)² · importance per block, in place: round(w / s) + z, clamped, − z, · s
        error = torch.div(blocks, s).round_()
        if zero is not None:
            z = per_block(zero).to(torch.float32)
            error.add_(z).clamp_(qmin, qmax).sub_(z)
        else:
            error.clamp_(qmin, qmax)
        error = error.mul_(s).sub_(blocks).square_().mul_(weights).sum(dim=inner)
        if best_error is None:
            best_scale, best_zero, best_error = scale, zero, error
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        if best_zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero
