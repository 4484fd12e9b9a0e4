"""Quantization of lookup tables to 8-bit integers (Core ML Tools' `cluster_dtype` int8/uint8).

Each LUT (one per group) gets its own scale, and for uint8 its own zero point; the decode rule is
`(q - zero_point) * scale` in float32, the same as Core ML's `constexpr_blockwise_shift_scale`
in front of `constexpr_lut_to_dense`. An entry that is exactly 0.0 decodes to exactly 0.0 with
either dtype, so a LUT built with `enforce_zero` keeps its zero.
"""

import torch

_SYMMETRIC_MAX = 127
_AFFINE_MAX = 255


def quantize_lut(
    lut: torch.Tensor, dtype: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize `lut` `[G, K, d]` (any float dtype, computed in float32) LUT by LUT.

    `dtype='int8'`: symmetric, `scale = max|lut| / 127`, values in [-127, 127], no zero point.
    `dtype='uint8'`: affine over the LUT's range widened to include 0, `scale = (max - min) / 255`,
    and an integer zero point in [0, 255] at which 0.0 sits exactly.
    A LUT of all zeros gets scale 1. Every entry decodes within `scale / 2` of its value.
    Returns `(q, scale, zero_point)`: `q` int8 | uint8 `[G, K, d]`, `scale` float32 `[G, 1, 1]`,
    `zero_point` uint8 `[G, 1, 1]` or None.
    """
    if lut.dim() != 3 or not lut.dtype.is_floating_point:
        raise ValueError(
            f"lut: must be a float tensor [G, K, d], got {lut.dtype} {list(lut.shape)}"
        )
    values = lut.to(torch.float32)
    if dtype == "int8":
        return _quantize_symmetric(values)
    if dtype == "uint8":
        return _quantize_affine(values)
    raise ValueError(f"dtype: must be 'int8' or 'uint8', got {dtype!r}")


def _nonzero_scale(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _quantize_symmetric(lut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    scale = _nonzero_scale(lut.abs().amax(dim=(1, 2), keepdim=True) / _SYMMETRIC_MAX)  # [G, 1, 1]
    q = torch.round(lut / scale).clamp(-_SYMMETRIC_MAX, _SYMMETRIC_MAX)
    return q.to(torch.int8), scale, None


def _quantize_affine(lut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    low = lut.amin(dim=(1, 2), keepdim=True).clamp(max=0.0)  # [G, 1, 1]
    high = lut.amax(dim=(1, 2), keepdim=True).clamp(min=0.0)
    scale = _nonzero_scale((high - low) / _AFFINE_MAX)
    zero_point = torch.round(-low / scale).clamp(0, _AFFINE_MAX)
    q = torch.round(lut / scale + zero_point).clamp(0, _AFFINE_MAX)
    return q.to(torch.uint8), scale, zero_point.to(torch.uint8)


def dequantize_lut(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None
) -> torch.Tensor:
    """The float32 LUT `[G, K, d]` that `(q, scale, zero_point)` stands for: `(q - zp) * scale`.

    This is the decode rule itself: the subtraction is exact in float32 and the product is one
    rounding, so every consumer that follows it gets the same bits.
    """
    values = q.to(torch.float32)
    if zero_point is not None:
        values = values - zero_point.to(torch.float32)
    return values * scale.to(torch.float32)
