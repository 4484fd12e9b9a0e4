"""The palettized weight: the one compressed format every algorithm writes and every consumer reads.

A weight of `shape` is split into groups of `group_size` consecutive channels along
`channel_axis`; each group has its own LUT of `2**n_bits` entries of `cluster_dim` values, and
each element (or each vector of `cluster_dim` consecutive elements along `vector_axis`) keeps the
n-bit index of its entry. Checkpoint, report, `from_pretrained` and Core ML export read the same
tensors, and `PalettizedWeight.decode` is the single definition of the weight they stand for.

Canonical element order (`group_view`, shared by encoding and decoding): move `channel_axis` to
the front and, for vectors, `vector_axis` to the back, keeping the other axes in order; read
row-major as `[C, M, cluster_dim]`; then `group_size` consecutive channels form one group:
`[n_groups, group_size * M, cluster_dim]`. The indices are `[n_groups, n_per_group]` read
row-major and packed with `pack_bits`.

Vectors may also run along the channel axis itself (`vector_axis == channel_axis`, Core ML Tools'
convention and the one its iOS18 models use): a vector is `cluster_dim` consecutive channels of
one group (so `cluster_dim` must divide `group_size`), and a group reads as
`[group_size / cluster_dim, M, cluster_dim]`: vector rows first, then the other axes in order.

Dense-and-sparse (SqueezeLLM): optional outliers are weights kept exactly, as a sparse part beside
the LUT: `outlier_positions` (int32, ascending flat row-major positions in `shape`) and
`outlier_values` (float16, the weights' values at the precision of the float16 model). Decoding
writes them over the LUT values. Every element still has an index: 0 under a scalar outlier; a
vector holding an outlier keeps the entry nearest to its other elements.
"""

import json
import math
from dataclasses import dataclass

import torch

from llmpalette.errors import ConfigError
from llmpalette.layout.metadata import read_layout
from llmpalette.layout.packing import pack_bits, packed_size, unpack_bits
from llmpalette.maths.lut import dequantize_lut

FORMAT_VERSION = 1
_FLOAT_LUT_DTYPES = (torch.float32, torch.float16)
_QUANTIZED_LUT_DTYPES = (torch.int8, torch.uint8)
_GROUPING_FIELDS = ("shape", "channel_axis", "group_size", "cluster_dim", "vector_axis")
_LAYOUT_FIELDS = ("shape", "n_bits", "channel_axis", "group_size", "cluster_dim", "vector_axis")
_OPTIONAL_TENSORS = ("lut_scale", "lut_zero_point", "channel_scale", "outlier_positions", "outlier_values")
OUTLIER_VALUE_DTYPE = torch.float16


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_grouping(
    shape: tuple[int, ...],
    channel_axis: int,
    group_size: int,
    cluster_dim: int,
    vector_axis: int | None,
) -> None:
    """Raise `ConfigError` naming the field unless this grouping fits a weight of `shape`."""
    if not isinstance(shape, tuple) or not shape or not all(_is_int(s) and s > 0 for s in shape):
        raise ConfigError("shape", f"must be a non-empty tuple of positive integers, got {shape!r}")
    ndim = len(shape)
    if not _is_int(channel_axis) or not 0 <= channel_axis < ndim:
        raise ConfigError(
            "channel_axis",
            f"must be an axis in 0..{ndim - 1} of shape {shape}, got {channel_axis!r}",
        )
    channels = shape[channel_axis]
    if not _is_int(group_size) or group_size < 1 or channels % group_size:
        raise ConfigError(
            "group_size",
            f"must be a positive divisor of the {channels} channels along axis {channel_axis} "
            f"of shape {shape}, got {group_size!r}",
        )
    if not _is_int(cluster_dim) or cluster_dim < 1:
        raise ConfigError("cluster_dim", f"must be a positive integer, got {cluster_dim!r}")
    if cluster_dim == 1:
        if vector_axis is not None:
            raise ConfigError(
                "vector_axis", f"must be None when cluster_dim is 1, got {vector_axis!r}"
            )
        return
    if not _is_int(vector_axis) or not 0 <= vector_axis < ndim:
        raise ConfigError(
            "vector_axis",
            f"must be an axis in 0..{ndim - 1} of shape {shape} when cluster_dim is {cluster_dim}, "
            f"got {vector_axis!r}",
        )
    if vector_axis == channel_axis and group_size % cluster_dim:
        raise ConfigError(
            "cluster_dim",
            f"must divide group_size {group_size} when vectors run along the channel axis "
            f"{channel_axis} of shape {shape}, got {cluster_dim}",
        )
    if shape[vector_axis] % cluster_dim:
        raise ConfigError(
            "cluster_dim",
            f"must divide the {shape[vector_axis]} elements along vector_axis {vector_axis} "
            f"of shape {shape}, got {cluster_dim}",
        )


def _check_n_bits(n_bits: int) -> None:
    if not _is_int(n_bits) or not 1 <= n_bits <= 8:
        raise ConfigError("n_bits", f"must be an integer in 1..8, got {n_bits!r}")


def _canonical_axes(ndim: int, channel_axis: int, vector_axis: int | None) -> list[int]:
    """The axes of the canonical order: channels first, the vector axis (if any, and not the
    channel axis itself) last."""
    rest = [axis for axis in range(ndim) if axis not in (channel_axis, vector_axis)]
    last = [] if vector_axis in (None, channel_axis) else [vector_axis]
    return [channel_axis, *rest, *last]


def _group_counts(
    shape: tuple[int, ...],
    channel_axis: int,
    group_size: int,
    cluster_dim: int,
    vector_axis: int | None,
) -> tuple[int, int]:
    """(n_groups, n_per_group) of a valid grouping of a weight of `shape`."""
    _check_grouping(shape, channel_axis, group_size, cluster_dim, vector_axis)
    n_groups = shape[channel_axis] // group_size
    return n_groups, math.prod(shape) // (n_groups * cluster_dim)


def group_view(
    weight: torch.Tensor,
    channel_axis: int,
    group_size: int,
    cluster_dim: int = 1,
    vector_axis: int | None = None,
) -> torch.Tensor:
    """`weight` in the canonical element order: `[n_groups, n_per_group, cluster_dim]`.

    Row g holds the elements (or vectors) of channels `g*group_size .. (g+1)*group_size - 1`,
    the ones one LUT serves; algorithms cluster these rows.
    """
    shape = tuple(weight.shape)
    n_groups, n_per_group = _group_counts(shape, channel_axis, group_size, cluster_dim, vector_axis)
    permuted = weight.permute(_canonical_axes(len(shape), channel_axis, vector_axis))
    if vector_axis == channel_axis:
        # [n_groups, rows, cluster_dim, M] -> [n_groups, rows, M, cluster_dim]
        rows = group_size // cluster_dim
        permuted = permuted.reshape(n_groups, rows, cluster_dim, -1).transpose(2, 3)
    return permuted.reshape(n_groups, n_per_group, cluster_dim)


def ungroup_view(
    groups: torch.Tensor,
    shape: tuple[int, ...],
    channel_axis: int,
    group_size: int,
    cluster_dim: int = 1,
    vector_axis: int | None = None,
) -> torch.Tensor:
    """Inverse of `group_view`: `groups` `[n_groups, n_per_group, cluster_dim]` back to `shape`."""
    shape = tuple(shape)
    counts = _group_counts(shape, channel_axis, group_size, cluster_dim, vector_axis)
    if tuple(groups.shape) != (*counts, cluster_dim):
        raise ValueError(
            f"groups: must be {[*counts, cluster_dim]} for shape {shape}, got {list(groups.shape)}"
        )
    axes = _canonical_axes(len(shape), channel_axis, vector_axis)
    if vector_axis == channel_axis:
        rows = group_size // cluster_dim
        groups = groups.reshape(counts[0], rows, -1, cluster_dim).transpose(2, 3)
    permuted = groups.reshape([shape[axis] for axis in axes])
    return permuted.permute([axes.index(axis) for axis in range(len(shape))])


def _check_tensor(
    field: str, tensor: object, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...]
) -> None:
    if isinstance(tensor, torch.Tensor) and tensor.dtype in dtypes and tuple(tensor.shape) == shape:
        return
    wanted = " or ".join(_dtype_name(dtype) for dtype in dtypes)
    got = (
        f"{_dtype_name(tensor.dtype)} {list(tensor.shape)}"
        if isinstance(tensor, torch.Tensor)
        else type(tensor).__name__
    )
    raise ConfigError(field, f"must be a {wanted} tensor {list(shape)}, got {got}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_absent(field: str, tensor: torch.Tensor | None, reason: str) -> None:
    if tensor is not None:
        raise ConfigError(field, f"must be None {reason}")


@dataclass(frozen=True, eq=False, repr=False)
class PalettizedWeight:
    """A weight stored as per-group LUTs and packed n-bit indices (see the module docstring).

    Construction validates every field against the others and raises `ConfigError` naming it.
    Two objects are equal when their layout and all their stored tensors are identical.
    """

    lut: torch.Tensor  # [n_groups, 2**n_bits, cluster_dim] float32 | float16 | int8 | uint8
    indices: torch.Tensor  # uint8 [ceil(n_groups * n_per_group * n_bits / 8)]
    shape: tuple[int, ...]
    n_bits: int
    channel_axis: int
    group_size: int
    cluster_dim: int = 1
    vector_axis: int | None = None
    lut_scale: torch.Tensor | None = None  # [n_groups, 1, 1] float32 iff lut is int8 | uint8
    lut_zero_point: torch.Tensor | None = None  # [n_groups, 1, 1] uint8 iff lut is uint8
    channel_scale: torch.Tensor | None = None  # [shape[0]] float32, multiplied along axis 0
    outlier_positions: torch.Tensor | None = None  # [n_outliers] int32, ascending flat positions
    outlier_values: torch.Tensor | None = None  # [n_outliers] float16, kept exactly

    def __post_init__(self) -> None:
        _check_n_bits(self.n_bits)
        n_groups, n_per_group = _group_counts(**self._grouping())
        lut_dtypes = _FLOAT_LUT_DTYPES + _QUANTIZED_LUT_DTYPES
        _check_tensor("lut", self.lut, lut_dtypes, (n_groups, 2**self.n_bits, self.cluster_dim))
        _check_tensor(
            "indices",
            self.indices,
            (torch.uint8,),
            (packed_size(n_groups * n_per_group, self.n_bits),),
        )
        self._check_lut_quantization(n_groups)
        if self.channel_scale is not None:
            _check_tensor("channel_scale", self.channel_scale, (torch.float32,), (self.shape[0],))
        self._check_outliers()

    def _check_outliers(self) -> None:
        if self.outlier_positions is None and self.outlier_values is None:
            return
        if self.outlier_positions is None or self.outlier_values is None:
            raise ConfigError("outlier_positions", "outlier_positions and outlier_values come together")
        count = self.outlier_positions.numel()
        _check_tensor("outlier_positions", self.outlier_positions, (torch.int32,), (count,))
        _check_tensor("outlier_values", self.outlier_values, (OUTLIER_VALUE_DTYPE,), (count,))
        if count:
            positions = self.outlier_positions.to(torch.int64)
            if int(positions[0]) < 0 or int(positions[-1]) >= math.prod(self.shape) or (
                count > 1 and not bool((positions[1:] > positions[:-1]).all())
            ):
                raise ConfigError("outlier_positions", f"must be distinct, ascending and in [0, {math.prod(self.shape)})")

    @property
    def n_outliers(self) -> int:
        """Weights kept exactly in the sparse part (0 without outliers)."""
        return 0 if self.outlier_positions is None else self.outlier_positions.numel()

    def _check_lut_quantization(self, n_groups: int) -> None:
        if self.lut.dtype in _FLOAT_LUT_DTYPES:
            reason = f"for a {_dtype_name(self.lut.dtype)} lut"
            _check_absent("lut_scale", self.lut_scale, reason)
            _check_absent("lut_zero_point", self.lut_zero_point, reason)
            return
        _check_tensor("lut_scale", self.lut_scale, (torch.float32,), (n_groups, 1, 1))
        if self.lut.dtype == torch.int8:
            _check_absent("lut_zero_point", self.lut_zero_point, "for a symmetric int8 lut")
            return
        _check_tensor("lut_zero_point", self.lut_zero_point, (torch.uint8,), (n_groups, 1, 1))

    @classmethod
    def from_assignment(
        cls,
        lut: torch.Tensor,
        labels: torch.Tensor,
        *,
        shape: tuple[int, ...],
        n_bits: int,
        channel_axis: int,
        group_size: int,
        cluster_dim: int = 1,
        vector_axis: int | None = None,
        lut_scale: torch.Tensor | None = None,
        lut_zero_point: torch.Tensor | None = None,
        channel_scale: torch.Tensor | None = None,
        outlier_positions: torch.Tensor | None = None,
        outlier_values: torch.Tensor | None = None,
    ) -> "PalettizedWeight":
        """Build from a LUT and the entry each element chose.

        `labels` `[n_groups, n_per_group]` (integer, in [0, 2**n_bits)) is in the canonical order
        of `group_view(weight, channel_axis, group_size, cluster_dim, vector_axis)`.
        """
        shape = tuple(shape)
        _check_n_bits(n_bits)
        counts = _group_counts(shape, channel_axis, group_size, cluster_dim, vector_axis)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ConfigError(
                "labels", f"must be an integer tensor, got {_dtype_name(labels.dtype)}"
            )
        if tuple(labels.shape) != counts:
            raise ConfigError(
                "labels", f"must be {list(counts)} for shape {shape}, got {list(labels.shape)}"
            )
        low, high = torch.aminmax(labels)  # labels are never empty: every dimension is positive
        if low < 0 or high >= 2**n_bits:
            raise ConfigError(
                "labels",
                f"must lie in [0, {2**n_bits}) for n_bits={n_bits}, "
                f"got range [{int(low)}, {int(high)}]",
            )
        return cls(
            lut=lut,
            indices=pack_bits(labels, n_bits),
            shape=shape,
            n_bits=n_bits,
            channel_axis=channel_axis,
            group_size=group_size,
            cluster_dim=cluster_dim,
            vector_axis=vector_axis,
            lut_scale=lut_scale,
            lut_zero_point=lut_zero_point,
            channel_scale=channel_scale,
            outlier_positions=outlier_positions,
            outlier_values=outlier_values,
        )

    @property
    def n_groups(self) -> int:
        """Number of LUTs."""
        return self.shape[self.channel_axis] // self.group_size

    @property
    def n_per_group(self) -> int:
        """Number of indices per LUT (elements per group / cluster_dim)."""
        return math.prod(self.shape) // (self.n_groups * self.cluster_dim)

    @property
    def nbytes(self) -> int:
        """The compressed size: bytes of every stored tensor (LUT, indices, scales, outliers)."""
        return sum(t.numel() * t.element_size() for t in self._stored_tensors().values())

    def labels(self) -> torch.Tensor:
        """The unpacked indices: int64 `[n_groups, n_per_group]`, in the canonical order."""
        count = self.n_groups * self.n_per_group
        unpacked = unpack_bits(self.indices, self.n_bits, count)
        return unpacked.to(torch.int64).view(self.n_groups, self.n_per_group)

    def decoded_lut(self) -> torch.Tensor:
        """The LUT as float32 `[n_groups, 2**n_bits, cluster_dim]` (dequantized if int8/uint8)."""
        if self.lut.dtype in _QUANTIZED_LUT_DTYPES:
            return dequantize_lut(self.lut, self.lut_scale, self.lut_zero_point)
        return self.lut.to(torch.float32)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight of `shape`: the definition of what this weight is.

        Computed in float32 (LUT lookup, then the channel scale along axis 0 if any, one rounding
        each; then the outliers written over their positions) and cast to `dtype` at the end, so it
        is bit-exact and deterministic everywhere.
        """
        index = self.labels().unsqueeze(-1).expand(-1, -1, self.cluster_dim)
        groups = torch.gather(self.decoded_lut(), 1, index)  # [n_groups, n_per_group, cluster_dim]
        weight = ungroup_view(groups, **self._grouping())
        if self.channel_scale is not None:
            weight = weight * self.channel_scale.view(-1, *[1] * (len(self.shape) - 1))
        weight = weight.contiguous()
        if self.n_outliers:
            weight.view(-1)[self.outlier_positions.to(torch.int64)] = self.outlier_values.to(torch.float32)
        return weight.to(dtype)

    def _grouping(self) -> dict[str, object]:
        return {field: getattr(self, field) for field in _GROUPING_FIELDS}

    def _layout(self) -> dict[str, object]:
        return {field: getattr(self, field) for field in _LAYOUT_FIELDS}

    def _stored_tensors(self) -> dict[str, torch.Tensor]:
        optional = {name: getattr(self, name) for name in _OPTIONAL_TENSORS}
        present = {name: tensor for name, tensor in optional.items() if tensor is not None}
        return {"lut": self.lut, "indices": self.indices, **present}

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The stored tensors as contiguous CPU tensors keyed `f"{prefix}.{name}"`, for safetensors.

        Names: `lut`, `indices`, and `lut_scale`, `lut_zero_point`, `channel_scale`,
        `outlier_positions`, `outlier_values` when present.
        """
        return {
            f"{prefix}.{name}": tensor.detach().cpu().contiguous()
            for name, tensor in self._stored_tensors().items()
        }

    def metadata(self, prefix: str, extra: dict[str, object] | None = None) -> dict[str, str]:
        """The layout as safetensors metadata: one key `f"{prefix}.__palettized__"` holding JSON.

        `extra`: more JSON-able facts stored beside the layout (a layer file adds the module's
        names); readers ignore keys they do not know.
        """
        layout = {**(extra or {}), **self._layout(), "shape": list(self.shape), "format_version": FORMAT_VERSION}
        return {_metadata_key(prefix): json.dumps(layout, sort_keys=True)}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str], prefix: str
    ) -> "PalettizedWeight":
        """Read back what `to_tensors` and `metadata` wrote.

        Raises `ValueError` naming `prefix` on any inconsistency (missing key, shape, dtype).
        """
        layout = _read_layout(metadata, prefix)
        missing = [name for name in ("lut", "indices") if f"{prefix}.{name}" not in tensors]
        if missing:
            keys = [f"{prefix}.{name}" for name in missing]
            raise ValueError(f"{prefix}: missing tensor(s) {keys}")
        stored = {
            name: tensors.get(f"{prefix}.{name}") for name in ("lut", "indices", *_OPTIONAL_TENSORS)
        }
        try:
            weight = cls(**stored, **layout)
        except ConfigError as error:
            raise ValueError(f"{prefix}: {error}") from error
        _check_padding(weight, prefix)
        return weight

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PalettizedWeight):
            return NotImplemented
        mine, theirs = self._stored_tensors(), other._stored_tensors()
        return (
            self._layout() == other._layout()
            and mine.keys() == theirs.keys()
            and all(
                mine[name].dtype == theirs[name].dtype and torch.equal(mine[name], theirs[name])
                for name in mine
            )
        )

    def __repr__(self) -> str:
        lut = f"{_dtype_name(self.lut.dtype)}{list(self.lut.shape)}"
        vector = f", cluster_dim={self.cluster_dim}, vector_axis={self.vector_axis}"
        return (
            f"PalettizedWeight(shape={self.shape}, n_bits={self.n_bits}, "
            f"channel_axis={self.channel_axis}, group_size={self.group_size}"
            f"{vector if self.cluster_dim > 1 else ''}, lut={lut}, "
            f"channel_scale={self.channel_scale is not None}, outliers={self.n_outliers}, nbytes={self.nbytes})"
        )


def _metadata_key(prefix: str) -> str:
    return f"{prefix}.__palettized__"


def _read_layout(metadata: dict[str, str], prefix: str) -> dict[str, object]:
    """The layout fields stored under `prefix`, checked for presence, version and JSON types."""
    layout = read_layout(metadata, _metadata_key(prefix), prefix, "palettized weight", _LAYOUT_FIELDS, FORMAT_VERSION)
    if not isinstance(layout["shape"], list):
        raise ValueError(f"{prefix}: shape: must be a list, got {layout['shape']!r}")
    return {**{field: layout[field] for field in _LAYOUT_FIELDS}, "shape": tuple(layout["shape"])}


def _check_padding(weight: PalettizedWeight, prefix: str) -> None:
    """Reject stray bits after the last index: `pack_bits` always leaves them 0."""
    used_bits = (weight.n_groups * weight.n_per_group * weight.n_bits) % 8
    if used_bits and int(weight.indices[-1]) >> used_bits:
        raise ValueError(f"{prefix}: indices: the unused high bits of the last byte must be 0")
