"""The linear-quantized weight: the second kind of the compressed-weight format.

A weight of `shape` is stored as n-bit integers q with a float32 `scale` per block and, for affine
grids and unsigned symmetric ones, an integer `zero_point` per block; it stands for

    (q - zero_point) * scale        in float32: q - zero_point is exact, then one rounding

(`QuantizedWeight.decode`, the single definition; `maths.uniform.dequantize` is the rule). This is
Core ML Tools' `dequantize_by_scale_and_zp` and Core ML's `constexpr_blockwise_shift_scale`
(`data`, `scale`, `offset`).

Blocks: `block_sizes` holds one size per axis, each dividing its axis, and `scale` / `zero_point`
hold one entry per block, shaped `[shape[0] / block_sizes[0], shape[1] / block_sizes[1], ...]`:

    per tensor                          block_sizes = shape                scale [1, 1]
    per output channel (axis 0)         block_sizes = (1, *shape[1:])      scale [out, 1]
    per block of b along the input axis block_sizes = (1, b, *shape[2:])   scale [out, in / b]

Integers: `signed` n-bit integers lie in [-2**(n-1), 2**(n-1) - 1], unsigned in [0, 2**n - 1].
They are read row-major over `shape` and packed with `pack_bits`, a signed value as its low n bits
in two's complement (what Core ML Tools' `pack_elements_into_bits` writes for int4), into `data`.
`zero_point` is int8 for signed integers and uint8 for unsigned ones, within the same range.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from llmpalette.errors import ConfigError
from llmpalette.layout.metadata import read_layout
from llmpalette.layout.packing import pack_bits, packed_size, unpack_bits
from llmpalette.maths.uniform import block_counts, dequantize_blocks, storage_range

FORMAT_VERSION = 1
METADATA_SUFFIX = ".__quantized__"
_LAYOUT_FIELDS = ("shape", "n_bits", "signed", "block_sizes")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_layout(shape: tuple[int, ...], n_bits: int, signed: bool, block_sizes: tuple[int, ...]) -> None:
    """Raise `ConfigError` naming the field unless the layout is consistent."""
    if not isinstance(shape, tuple) or not shape or not all(_is_int(s) and s > 0 for s in shape):
        raise ConfigError("shape", f"must be a non-empty tuple of positive integers, got {shape!r}")
    if not _is_int(n_bits) or not 1 <= n_bits <= 8:
        raise ConfigError("n_bits", f"must be an integer in 1..8, got {n_bits!r}")
    if not isinstance(signed, bool):
        raise ConfigError("signed", f"must be true or false, got {signed!r}")
    if not isinstance(block_sizes, tuple) or len(block_sizes) != len(shape):
        raise ConfigError(
            "block_sizes", f"must be a tuple with one block size per axis of shape {shape}, got {block_sizes!r}"
        )
    for axis, (size, block) in enumerate(zip(shape, block_sizes)):
        if not _is_int(block) or block < 1 or size % block:
            raise ConfigError(
                "block_sizes",
                f"{block!r} along axis {axis} does not divide its {size} elements (shape {shape}); "
                "each block size must be a positive divisor of its axis",
            )


def _check_tensor(field: str, tensor: object, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if isinstance(tensor, torch.Tensor) and tensor.dtype == dtype and tuple(tensor.shape) == shape:
        return
    got = f"{_dtype_name(tensor.dtype)} {list(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
    raise ConfigError(field, f"must be a {_dtype_name(dtype)} tensor {list(shape)}, got {got}")


def _check_range(field: str, values: torch.Tensor, low: int, high: int, what: str) -> None:
    if values.numel() == 0:
        return
    least, most = (int(v) for v in torch.aminmax(values.to(torch.int64)))
    if least < low or most > high:
        raise ConfigError(field, f"must lie in [{low}, {high}] for {what}, got range [{least}, {most}]")


def _integer_dtype(signed: bool) -> torch.dtype:
    return torch.int8 if signed else torch.uint8


@dataclass(frozen=True, eq=False, repr=False)
class QuantizedWeight:
    """A weight stored as packed n-bit integers with a scale (and zero point) per block.

    See the module docstring for the layout and the decode rule. Construction validates every field
    against the others and raises `ConfigError` naming it; two objects are equal when their layout
    and all their stored tensors are identical. Build one from integers with `from_integers`.

    Args:
        data: uint8 `[ceil(numel * n_bits / 8)]`, the integers packed row-major.
        scale: float32 `[shape[i] / block_sizes[i] ...]`, positive and finite.
        shape: the weight's shape.
        n_bits: 1..8.
        signed: two's-complement integers (True) or unsigned ones (False).
        block_sizes: elements per block along each axis.
        zero_point: int8 (signed) or uint8 (unsigned), shaped like `scale`; None means 0.

    Example:
        >>> q = torch.tensor([[-7, 0, 7, 3]], dtype=torch.int8)
        >>> w = QuantizedWeight.from_integers(q, torch.tensor([[0.5]]), n_bits=4, signed=True, block_sizes=(1, 4))
        >>> w.decode().tolist()
        [[-3.5, 0.0, 3.5, 1.5]]
    """

    data: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, ...]
    n_bits: int
    signed: bool
    block_sizes: tuple[int, ...]
    zero_point: torch.Tensor | None = None

    def __post_init__(self) -> None:
        _check_layout(self.shape, self.n_bits, self.signed, self.block_sizes)
        _check_tensor("data", self.data, torch.uint8, (packed_size(self.numel, self.n_bits),))
        _check_tensor("scale", self.scale, torch.float32, self.scale_shape)
        if not bool(torch.isfinite(self.scale).all() and (self.scale > 0).all()):
            raise ConfigError("scale", "must be positive and finite in every block")
        if self.zero_point is None:
            return
        _check_tensor("zero_point", self.zero_point, _integer_dtype(self.signed), self.scale_shape)
        _check_range("zero_point", self.zero_point, *storage_range(self.n_bits, self.signed), self._integers_name())

    @classmethod
    def from_integers(
        cls,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None = None,
        *,
        n_bits: int,
        signed: bool,
        block_sizes: tuple[int, ...],
    ) -> "QuantizedWeight":
        """Pack integers `q` (any integer dtype, the weight's shape) with their blocks' `scale` and `zero_point`.

        `scale` is converted to float32 and `zero_point` (any integer dtype) to int8 / uint8 after
        checking its range; `q` must lie in the n-bit range. Raises `ConfigError` naming the field.
        """
        shape, block_sizes = tuple(q.shape), tuple(block_sizes)
        _check_layout(shape, n_bits, signed, block_sizes)
        low, high = storage_range(n_bits, signed)
        what = f"{'signed' if signed else 'unsigned'} n_bits={n_bits}"
        for field, values in (("q", q), ("zero_point", zero_point)):
            if values is None:
                continue
            if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
                raise ConfigError(field, f"must be an integer tensor, got {_dtype_name(values.dtype)}")
            _check_range(field, values, low, high, what)
        codes = q.detach().to(torch.int64) & (2**n_bits - 1)  # two's complement low bits
        return cls(
            data=pack_bits(codes.cpu(), n_bits),
            scale=scale.detach().to(device="cpu", dtype=torch.float32),
            shape=shape,
            n_bits=n_bits,
            signed=signed,
            block_sizes=block_sizes,
            zero_point=None if zero_point is None else zero_point.detach().cpu().to(_integer_dtype(signed)),
        )

    # -- what the weight is -------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Blocks along each axis: the shape of `scale` and `zero_point`."""
        return block_counts(self.shape, self.block_sizes)

    @property
    def granularity(self) -> str:
        """`per_tensor`, `per_channel` (one block per output channel) or `per_block`, for reports."""
        if self.block_sizes == self.shape:
            return "per_tensor"
        if self.block_sizes == (1, *self.shape[1:]):
            return "per_channel"
        return "per_block"

    @property
    def n_outliers(self) -> int:
        """Always 0: the linear kind has no sparse part (asked of either kind by reports and jobs)."""
        return 0

    @property
    def nbytes(self) -> int:
        """The compressed size: bytes of every stored tensor (packed integers, scales, zero points)."""
        return sum(t.numel() * t.element_size() for t in self._stored_tensors().values())

    def integers(self) -> torch.Tensor:
        """The unpacked integers: int8 (signed) or uint8 (unsigned) of `shape`."""
        codes = unpack_bits(self.data, self.n_bits, self.numel)
        if not self.signed:
            return codes.view(self.shape)
        values = codes.to(torch.int16)
        values = torch.where(values >= 2 ** (self.n_bits - 1), values - 2**self.n_bits, values)
        return values.to(torch.int8).view(self.shape)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight of `shape`: the definition of what this weight is.

        (q - zero_point) * scale per block, in float32 (the subtraction is exact, the product one
        rounding), then cast to `dtype`: bit-exact and deterministic everywhere.
        """
        weight = dequantize_blocks(self.integers(), self.scale, self.zero_point, self.block_sizes)
        return weight.to(dtype)

    # -- files ----------------------------------------------------------------------------------
    def _layout(self) -> dict[str, object]:
        return {field: getattr(self, field) for field in _LAYOUT_FIELDS}

    def _stored_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"data": self.data, "scale": self.scale}
        if self.zero_point is not None:
            tensors["zero_point"] = self.zero_point
        return tensors

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The stored tensors as contiguous CPU tensors keyed `f"{prefix}.{name}"`, for safetensors.

        Names: `data`, `scale`, and `zero_point` when present.
        """
        return {f"{prefix}.{name}": t.detach().cpu().contiguous() for name, t in self._stored_tensors().items()}

    def metadata(self, prefix: str, extra: dict[str, object] | None = None) -> dict[str, str]:
        """The layout as safetensors metadata: one key `f"{prefix}.__quantized__"` holding JSON.

        `extra`: more JSON-able facts stored beside the layout (a layer file adds the module's
        names); readers ignore keys they do not know.
        """
        layout = {
            **(extra or {}),
            **self._layout(),
            "shape": list(self.shape),
            "block_sizes": list(self.block_sizes),
            "has_zero_point": self.zero_point is not None,
            "format_version": FORMAT_VERSION,
        }
        return {metadata_key(prefix): json.dumps(layout, sort_keys=True)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str], prefix: str) -> "QuantizedWeight":
        """Read back what `to_tensors` and `metadata` wrote.

        Raises `ValueError` naming `prefix` on any inconsistency (missing key, shape, dtype, range).
        """
        layout, has_zero_point = _read_layout(metadata, prefix)
        names = ("data", "scale", "zero_point") if has_zero_point else ("data", "scale")
        missing = [f"{prefix}.{name}" for name in names if f"{prefix}.{name}" not in tensors]
        if missing:
            raise ValueError(f"{prefix}: missing tensor(s) {missing}")
        if not has_zero_point and f"{prefix}.zero_point" in tensors:
            raise ValueError(f"{prefix}: zero_point: stored, but the layout says the weight has none")
        stored = {name: tensors[f"{prefix}.{name}"] for name in names}
        try:
            weight = cls(**stored, **layout)
        except ConfigError as error:
            raise ValueError(f"{prefix}: {error}") from error
        used_bits = (weight.numel * weight.n_bits) % 8
        if used_bits and int(weight.data[-1]) >> used_bits:
            raise ValueError(f"{prefix}: data: the unused high bits of the last byte must be 0")
        return weight

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantizedWeight):
            return NotImplemented
        mine, theirs = self._stored_tensors(), other._stored_tensors()
        return (
            self._layout() == other._layout()
            and mine.keys() == theirs.keys()
            and all(mine[n].dtype == theirs[n].dtype and torch.equal(mine[n], theirs[n]) for n in mine)
        )

    def _integers_name(self) -> str:
        return f"{'signed' if self.signed else 'unsigned'} n_bits={self.n_bits}"

    def __repr__(self) -> str:
        return (
            f"QuantizedWeight(shape={self.shape}, n_bits={self.n_bits}, signed={self.signed}, "
            f"block_sizes={self.block_sizes}, zero_point={self.zero_point is not None}, nbytes={self.nbytes})"
        )


def metadata_key(prefix: str) -> str:
    return f"{prefix}{METADATA_SUFFIX}"


def _read_layout(metadata: dict[str, str], prefix: str) -> tuple[dict[str, object], bool]:
    """The layout fields stored under `prefix` and whether a zero point is stored, checked for
    presence, version and JSON types."""
    layout = read_layout(metadata, metadata_key(prefix), prefix, "linear-quantized weight", (*_LAYOUT_FIELDS, "has_zero_point"),
                         FORMAT_VERSION)
    for field in ("shape", "block_sizes"):
        if not isinstance(layout[field], list):
            raise ValueError(f"{prefix}: {field}: must be a list, got {layout[field]!r}")
    if not isinstance(layout["has_zero_point"], bool):
        raise ValueError(f"{prefix}: has_zero_point: must be true or false, got {layout['has_zero_point']!r}")
    fields = {
        **{field: layout[field] for field in _LAYOUT_FIELDS},
        "shape": tuple(layout["shape"]),
        "block_sizes": tuple(layout["block_sizes"]),
    }
    return fields, layout["has_zero_point"]
