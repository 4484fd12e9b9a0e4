"""Packing of n-bit indices into bytes, in the sub-byte layout Core ML uses.

Value i occupies bits `i*n_bits .. i*n_bits + n_bits - 1` of a little-endian bit stream: the
least significant bit of byte 0 comes first, and each value is written LSB first. This is what
`coremltools.optimize._utils.pack_elements_into_bits` produces, so packed indices go into a
`constexpr_lut_to_dense` op unchanged.

Both directions work on whole chunks: `8 / gcd(n_bits, 8)` values fill exactly
`n_bits / gcd(n_bits, 8)` bytes (at most 56 bits), so one int64 per chunk carries the bits
between the two views without a Python loop over elements.
"""

import math

import torch


def _chunking(n_bits: int) -> tuple[int, int]:
    """(values per chunk, bytes per chunk) for the smallest whole-byte run of n-bit values."""
    common = math.gcd(n_bits, 8)
    return 8 // common, n_bits // common


def _check_n_bits(n_bits: int) -> None:
    if not isinstance(n_bits, int) or isinstance(n_bits, bool) or not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits: must be an integer in 1..8, got {n_bits!r}")


def packed_size(count: int, n_bits: int) -> int:
    """Bytes needed to pack `count` values of `n_bits` each."""
    return (count * n_bits + 7) // 8


def pack_bits(values: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Pack integer `values` (any shape, read row-major), each in [0, 2**n_bits), into bytes.

    Returns uint8 `[ceil(numel * n_bits / 8)]` on the device of `values`; the unused high bits
    of the last byte are 0, so equal values always give equal bytes.
    """
    _check_n_bits(n_bits)
    if values.dtype.is_floating_point or values.dtype.is_complex:
        raise ValueError(f"values: must be an integer tensor, got {values.dtype}")
    flat = values.reshape(-1).to(torch.int64)
    count = flat.numel()
    if count:
        low, high = torch.aminmax(flat)
        if low < 0 or high >= 2**n_bits:
            raise ValueError(
                f"values: must lie in [0, {2**n_bits}) for n_bits={n_bits}, "
                f"got range [{int(low)}, {int(high)}]"
            )
    per_chunk, chunk_bytes = _chunking(n_bits)
    flat = torch.nn.functional.pad(flat, (0, -count % per_chunk))
    value_shifts = torch.arange(per_chunk, device=flat.device) * n_bits
    chunks = (flat.view(-1, per_chunk) << value_shifts).sum(dim=1)  # [n_chunks], disjoint bits
    byte_shifts = torch.arange(chunk_bytes, device=flat.device) * 8
    packed = ((chunks[:, None] >> byte_shifts) & 0xFF).to(torch.uint8)  # [n_chunks, chunk_bytes]
    return packed.reshape(-1)[: packed_size(count, n_bits)]


def unpack_bits(packed: torch.Tensor, n_bits: int, count: int) -> torch.Tensor:
    """The first `count` values of `n_bits` each from `packed` (uint8, read flat): uint8 `[count]`.

    Inverse of `pack_bits`; bytes beyond the first `ceil(count * n_bits / 8)` are ignored.
    """
    _check_n_bits(n_bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed: must be a uint8 tensor, got {packed.dtype}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"count: must be a non-negative integer, got {count!r}")
    needed = packed_size(count, n_bits)
    flat = packed.reshape(-1)
    if flat.numel() < needed:
        raise ValueError(
            f"packed: {count} values of {n_bits} bits need {needed} bytes, got {flat.numel()}"
        )
    per_chunk, chunk_bytes = _chunking(n_bits)
    flat = flat[:needed].to(torch.int64)
    flat = torch.nn.functional.pad(flat, (0, -needed % chunk_bytes))
    byte_shifts = torch.arange(chunk_bytes, device=flat.device) * 8
    chunks = (flat.view(-1, chunk_bytes) << byte_shifts).sum(dim=1)  # [n_chunks]
    value_shifts = torch.arange(per_chunk, device=flat.device) * n_bits
    values = (chunks[:, None] >> value_shifts) & (2**n_bits - 1)  # [n_chunks, per_chunk]
    return values.reshape(-1)[:count].to(torch.uint8)
