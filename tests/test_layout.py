"""The compressed-weight format: bit packing, LUT quantization, PalettizedWeight and its files."""

import itertools
import math
import zlib

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmpalette.errors import ConfigError
from llmpalette.layout import PalettizedWeight, group_view, pack_bits, ungroup_view, unpack_bits
from llmpalette.maths.lut import dequantize_lut, quantize_lut


def _generator(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


# --- pack_bits / unpack_bits ---------------------------------------------------------------


@pytest.mark.parametrize("n_bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 13, 1001])
def test_pack_round_trip(n_bits: int, count: int) -> None:
    values = torch.randint(0, 2**n_bits, (count,), generator=_generator(n_bits, count))
    packed = pack_bits(values, n_bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (math.ceil(count * n_bits / 8),)
    unpacked = unpack_bits(packed, n_bits, count)
    assert unpacked.dtype == torch.uint8
    assert torch.equal(unpacked.to(torch.int64), values)
    if count * n_bits % 8:
        assert int(packed[-1]) >> (count * n_bits % 8) == 0


@pytest.mark.parametrize(
    ("values", "n_bits", "expected"),
    [
        ([1, 2, 3, 4, 5], 3, [0xD1, 0x58]),  # bits 100 010 110 001 101 (LSB first) + a zero pad bit
        ([1, 2, 15], 4, [0x21, 0x0F]),
        ([1, 0, 1, 1], 1, [0b1101]),
        ([255, 0, 7], 8, [255, 0, 7]),
        ([3, 1, 2], 2, [0b100111]),
    ],
)
def test_pack_exact_bytes(values: list[int], n_bits: int, expected: list[int]) -> None:
    packed = pack_bits(torch.tensor(values), n_bits)
    assert packed.tolist() == expected
    assert unpack_bits(packed, n_bits, len(values)).tolist() == values


def test_pack_reads_any_shape_row_major() -> None:
    values = torch.randint(0, 32, (3, 5, 7), generator=_generator("shape"))
    assert torch.equal(pack_bits(values, 5), pack_bits(values.reshape(-1), 5))
    assert torch.equal(pack_bits(values.to(torch.uint8), 5), pack_bits(values, 5))


def test_unpack_ignores_bytes_past_count() -> None:
    values = torch.tensor([5, 6, 7])
    packed = torch.cat([pack_bits(values, 3), torch.tensor([255], dtype=torch.uint8)])
    assert unpack_bits(packed, 3, 3).tolist() == [5, 6, 7]


@pytest.mark.parametrize("n_bits", range(1, 9))
def test_pack_matches_coremltools(n_bits: int) -> None:
    utils = pytest.importorskip("coremltools.optimize._utils")
    values = torch.randint(0, 2**n_bits, (203,), generator=_generator("ct", n_bits))
    expected = utils.pack_elements_into_bits(values.numpy().astype(np.uint8), n_bits)
    assert pack_bits(values, n_bits).numpy().tolist() == expected.tolist()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: pack_bits(torch.tensor([0, 8]), 3), r"values: must lie in \[0, 8\).*\[0, 8\]"),
        (lambda: pack_bits(torch.tensor([-1, 2]), 3), r"values: must lie in \[0, 8\)"),
        (lambda: pack_bits(torch.tensor([1.0]), 3), "values: must be an integer tensor"),
        (lambda: pack_bits(torch.tensor([1]), 0), "n_bits: must be an integer in 1..8"),
        (lambda: pack_bits(torch.tensor([1]), 9), "n_bits: must be an integer in 1..8"),
        (lambda: unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 3), "need 2 bytes, got 1"),
        (lambda: unpack_bits(torch.zeros(2, dtype=torch.int32), 3, 3), "packed: must be a uint8"),
        (lambda: unpack_bits(torch.zeros(2, dtype=torch.uint8), 9, 1), "n_bits"),
        (lambda: unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, -1), "count"),
    ],
)
def test_pack_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# --- quantize_lut ----------------------------------------------------------------------------


def _test_luts() -> dict[str, torch.Tensor]:
    gen = _generator("luts")
    ranges = torch.tensor([1e-3, 1.0, 30.0, 1.0, 5.0, 1.0]).view(-1, 1, 1)
    mixed = torch.randn(6, 16, 2, generator=gen) * ranges
    mixed[:, 3, :] = 0.0  # enforce_zero-style entries
    return {
        "mixed": mixed,
        "positive": torch.rand(3, 8, 1, generator=gen) + 2.0,
        "negative": -torch.rand(3, 8, 1, generator=gen) - 2.0,
        "float16": torch.randn(4, 4, 1, generator=gen).half(),
    }


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
@pytest.mark.parametrize("name", ["mixed", "positive", "negative", "float16"])
def test_quantize_lut_error_bound(dtype: str, name: str) -> None:
    lut = _test_luts()[name]
    q, scale, zero_point = quantize_lut(lut, dtype)
    groups = lut.shape[0]
    assert q.shape == lut.shape and q.dtype == getattr(torch, dtype)
    assert scale.shape == (groups, 1, 1) and scale.dtype == torch.float32
    if dtype == "int8":
        assert zero_point is None
        assert q.min() >= -127 and q.max() <= 127
    else:
        assert zero_point.shape == (groups, 1, 1) and zero_point.dtype == torch.uint8
    decoded = dequantize_lut(q, scale, zero_point)
    assert decoded.dtype == torch.float32
    error = (decoded.double() - lut.double()).abs()
    assert (error <= scale.double() / 2 * (1 + 1e-5)).all()
    zeros = lut == 0
    assert (decoded[zeros] == 0.0).all()


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_quantize_all_zero_lut(dtype: str) -> None:
    lut = torch.zeros(2, 4, 1)
    lut[1] = torch.tensor([1.0, -2.0, 0.0, 0.5]).view(4, 1)
    q, scale, zero_point = quantize_lut(lut, dtype)
    assert scale[0].item() == 1.0
    assert torch.equal(dequantize_lut(q, scale, zero_point)[0], torch.zeros(4, 1))
    assert dequantize_lut(q, scale, zero_point)[1, 2, 0].item() == 0.0


def test_quantize_lut_exact_values() -> None:
    lut = torch.tensor([-254.0, 0.0, 127.0, 63.0]).view(1, 4, 1)
    q, scale, zero_point = quantize_lut(lut, "int8")
    assert q.flatten().tolist() == [-127, 0, 64, 32] and scale.item() == 2.0 and zero_point is None
    q, scale, zero_point = quantize_lut(torch.tensor([-1.0, 0.0, 254.0]).view(1, 3, 1), "uint8")
    assert q.flatten().tolist() == [0, 1, 255] and scale.item() == 1.0 and zero_point.item() == 1


def test_dequantize_is_the_decode_rule() -> None:
    q = torch.tensor([[[0], [7], [255]]], dtype=torch.uint8)
    scale = torch.tensor([[[0.1]]])
    zero_point = torch.tensor([[[7]]], dtype=torch.uint8)
    expected = (torch.tensor([-7.0, 0.0, 248.0]) * torch.tensor(0.1)).view(1, 3, 1)
    assert torch.equal(dequantize_lut(q, scale, zero_point), expected)


def test_quantize_lut_errors() -> None:
    with pytest.raises(ValueError, match="dtype: must be 'int8' or 'uint8'"):
        quantize_lut(torch.zeros(1, 2, 1), "int4")
    with pytest.raises(ValueError, match=r"lut: must be a float tensor \[G, K, d\]"):
        quantize_lut(torch.zeros(2, 1), "int8")


# --- group_view --------------------------------------------------------------------------------


def _spec_group_view(weight, channel_axis, group_size, cluster_dim, vector_axis):
    """The canonical order exactly as the format's specification words it."""
    x = weight.movedim(channel_axis, 0)
    channels = weight.shape[channel_axis]
    if cluster_dim > 1 and vector_axis == channel_axis:
        # a vector is cluster_dim consecutive channels; a group's vector rows come first
        rows = x.reshape(channels // cluster_dim, cluster_dim, -1).transpose(1, 2)
        return rows.reshape(channels // group_size, -1, cluster_dim)
    if cluster_dim > 1:
        x = x.movedim(vector_axis + 1 if vector_axis < channel_axis else vector_axis, -1)
    x = x.reshape(channels, -1, cluster_dim)
    return x.reshape(channels // group_size, -1, cluster_dim)


GROUPINGS = [  # (shape, channel_axis, group_size, cluster_dim, vector_axis)
    ((4, 6), 0, 2, 1, None),
    ((4, 6), 1, 3, 2, 0),
    ((8, 4, 3, 2), 0, 4, 2, 3),
    ((8, 4, 3, 2), 2, 1, 4, 0),
    ((8, 4, 3, 2), 3, 2, 3, 2),
    ((8, 4, 3, 2), 1, 4, 1, None),
    ((5,), 0, 5, 1, None),
    ((4, 6), 0, 2, 2, 0),
    ((4, 6), 1, 6, 3, 1),
    ((8, 4, 3, 2), 0, 4, 2, 0),
    ((8, 4, 3, 2), 1, 4, 4, 1),
]


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_group_view_round_trip(grouping) -> None:
    shape, channel_axis, group_size, cluster_dim, vector_axis = grouping
    weight = torch.randn(shape, generator=_generator(grouping))
    groups = group_view(weight, channel_axis, group_size, cluster_dim, vector_axis)
    spec = _spec_group_view(weight, channel_axis, group_size, cluster_dim, vector_axis)
    assert torch.equal(groups, spec)
    back = ungroup_view(groups, shape, channel_axis, group_size, cluster_dim, vector_axis)
    assert torch.equal(back, weight)


def test_group_view_known_values() -> None:
    w = torch.arange(24).reshape(4, 6)
    assert group_view(w, 0, 2)[:, :, 0].tolist() == [list(range(12)), list(range(12, 24))]
    assert group_view(w, 1, 3)[0, :, 0].tolist() == [0, 6, 12, 18, 1, 7, 13, 19, 2, 8, 14, 20]
    assert group_view(w, 0, 1, 2, 1)[0].tolist() == [[0, 1], [2, 3], [4, 5]]
    assert group_view(w, 1, 1, 2, 0)[0].tolist() == [[0, 6], [12, 18]]
    # vectors along the channel axis (Core ML Tools' convention): pairs of consecutive rows
    assert group_view(w, 0, 2, 2, 0)[0].tolist() == [[0, 6], [1, 7], [2, 8], [3, 9], [4, 10], [5, 11]]
    assert group_view(w, 1, 6, 2, 1)[0, :4].tolist() == [[0, 1], [6, 7], [12, 13], [18, 19]]


def test_ungroup_view_rejects_wrong_groups() -> None:
    with pytest.raises(ValueError, match=r"groups: must be \[2, 12, 1\]"):
        ungroup_view(torch.zeros(3, 8, 1), (4, 6), 0, 2)


# --- PalettizedWeight against a reference decoder ----------------------------------------------


def _reference_decode(weight: PalettizedWeight, labels: torch.Tensor) -> torch.Tensor:
    """Element by element, straight from the format's definition, in numpy float32."""
    shape, channel_axis, group_size = weight.shape, weight.channel_axis, weight.group_size
    cluster_dim, vector_axis = weight.cluster_dim, weight.vector_axis
    lut, labels = weight.lut.float().numpy(), labels.numpy()
    scale, zero_point, channel_scale = (
        None if t is None else t.numpy()
        for t in (weight.lut_scale, weight.lut_zero_point, weight.channel_scale)
    )
    along_channels = vector_axis == channel_axis
    other = [axis for axis in range(len(shape)) if axis not in (channel_axis, vector_axis)]
    inner_sizes = [shape[axis] for axis in other]
    if vector_axis is not None and not along_channels:
        inner_sizes.append(shape[vector_axis] // cluster_dim)
    per_channel = math.prod(inner_sizes)
    out = np.zeros(shape, dtype=np.float32)
    for index in itertools.product(*(range(size) for size in shape)):
        inner = [index[axis] for axis in other]
        component = 0
        if vector_axis is not None and not along_channels:
            inner.append(index[vector_axis] // cluster_dim)
            component = index[vector_axis] % cluster_dim
        position = 0
        for i, size in zip(inner, inner_sizes):
            position = position * size + i
        channel = index[channel_axis]
        group = channel // group_size
        row = channel % group_size
        if along_channels:
            row, component = row // cluster_dim, row % cluster_dim
        entry = int(labels[group, row * per_channel + position])
        stored = lut[group, entry, component]
        if scale is None:
            value = np.float32(stored)
        else:
            offset = 0 if zero_point is None else int(zero_point[group, 0, 0])
            value = np.float32(int(stored) - offset) * np.float32(scale[group, 0, 0])
        if channel_scale is not None:
            value = value * np.float32(channel_scale[index[0]])
        out[index] = value
    return torch.from_numpy(out)


SHAPES = {"linear": (8, 12), "conv": (8, 4, 3, 2)}
GRANULARITIES = {  # name: (channel_axis, group_size or None for all channels)
    "per_tensor": (0, None),
    "per_tensor_axis1": (1, None),
    "per_channel": (0, 1),
    "g2_axis0": (0, 2),
    "g4_axis0": (0, 4),
    "g2_axis1": (1, 2),
    "g4_axis1": (1, 4),
}


def _make_weight(shape_name, granularity, cluster_dim, lut_dtype, with_channel_scale, n_bits=3, vectors="across"):
    """vectors: "across" the channel axis (along the other of axes 0/1) or "along" it."""
    shape = SHAPES[shape_name]
    channel_axis, group_size = GRANULARITIES[granularity]
    group_size = group_size or shape[channel_axis]
    vector_axis = None if cluster_dim == 1 else (channel_axis if vectors == "along" else 1 - channel_axis)
    gen = _generator(shape_name, granularity, cluster_dim, lut_dtype, with_channel_scale, n_bits, vectors)
    n_groups = shape[channel_axis] // group_size
    n_per_group = math.prod(shape) // (n_groups * cluster_dim)
    lut = torch.randn(n_groups, 2**n_bits, cluster_dim, generator=gen)
    quantized = {}
    if lut_dtype in ("int8", "uint8"):
        lut, scale, zero_point = quantize_lut(lut, lut_dtype)
        quantized = {"lut_scale": scale, "lut_zero_point": zero_point}
    elif lut_dtype == "float16":
        lut = lut.half()
    labels = torch.randint(0, 2**n_bits, (n_groups, n_per_group), generator=gen)
    channel_scale = torch.rand(shape[0], generator=gen) + 0.5 if with_channel_scale else None
    weight = PalettizedWeight.from_assignment(
        lut, labels, shape=shape, n_bits=n_bits, channel_axis=channel_axis, group_size=group_size,
        cluster_dim=cluster_dim, vector_axis=vector_axis, channel_scale=channel_scale, **quantized,
    )
    return weight, labels


def _expected_nbytes(weight: PalettizedWeight) -> int:
    n_groups = weight.n_groups
    lut = n_groups * 2**weight.n_bits * weight.cluster_dim * weight.lut.element_size()
    indices = math.ceil(n_groups * weight.n_per_group * weight.n_bits / 8)
    scale = 4 * n_groups if weight.lut_scale is not None else 0
    zero_point = n_groups if weight.lut_zero_point is not None else 0
    channel = 4 * weight.shape[0] if weight.channel_scale is not None else 0
    return lut + indices + scale + zero_point + channel


def _save_and_load(weight: PalettizedWeight, path, prefix: str) -> PalettizedWeight:
    save_file(weight.to_tensors(prefix), str(path), metadata=weight.metadata(prefix))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    return PalettizedWeight.from_tensors(load_file(str(path)), metadata, prefix)


def _vector_layouts() -> list[tuple[str, str, int, str]]:
    """(shape, granularity, cluster_dim, vectors): vectors along the channel axis need
    cluster_dim > 1 dividing the group."""
    layouts = []
    for shape_name, granularity, cluster_dim in itertools.product(SHAPES, GRANULARITIES, [1, 2, 4]):
        layouts.append((shape_name, granularity, cluster_dim, "across"))
        channel_axis, group_size = GRANULARITIES[granularity]
        if cluster_dim > 1 and (group_size or SHAPES[shape_name][channel_axis]) % cluster_dim == 0:
            layouts.append((shape_name, granularity, cluster_dim, "along"))
    return layouts


@pytest.mark.parametrize("with_channel_scale", [False, True])
@pytest.mark.parametrize("lut_dtype", ["float32", "float16", "int8", "uint8"])
@pytest.mark.parametrize(("shape_name", "granularity", "cluster_dim", "vectors"), _vector_layouts())
def test_decode_matches_reference(
    shape_name, granularity, cluster_dim, lut_dtype, with_channel_scale, vectors, tmp_path
) -> None:
    weight, labels = _make_weight(
        shape_name, granularity, cluster_dim, lut_dtype, with_channel_scale, vectors=vectors
    )
    assert torch.equal(weight.labels(), labels)
    decoded = weight.decode()
    assert decoded.dtype == torch.float32 and decoded.shape == weight.shape
    assert decoded.is_contiguous()
    assert torch.equal(decoded, _reference_decode(weight, labels))
    assert weight.nbytes == _expected_nbytes(weight)

    loaded = _save_and_load(weight, tmp_path / "w.safetensors", "model.layers.0.mlp.up_proj.weight")
    assert loaded == weight
    assert torch.equal(loaded.decode(), decoded)


@pytest.mark.parametrize("n_bits", range(1, 9))
def test_every_n_bits(n_bits: int, tmp_path) -> None:
    weight, labels = _make_weight("conv", "g2_axis0", 2, "float32", True, n_bits=n_bits)
    assert weight.lut.shape == (4, 2**n_bits, 2)
    assert torch.equal(weight.decode(), _reference_decode(weight, labels))
    assert weight.nbytes == _expected_nbytes(weight)
    assert _save_and_load(weight, tmp_path / "w.safetensors", "w") == weight


def test_decode_dtype_is_a_final_cast() -> None:
    weight, _ = _make_weight("linear", "g4_axis1", 2, "uint8", True)
    assert torch.equal(weight.decode(torch.float16), weight.decode().half())


def test_tensors_and_metadata_keys() -> None:
    weight, _ = _make_weight("linear", "g2_axis0", 1, "uint8", True)
    tensors = weight.to_tensors("p")
    names = {"lut", "indices", "lut_scale", "lut_zero_point", "channel_scale"}
    assert set(tensors) == {f"p.{name}" for name in names}
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())
    plain, _ = _make_weight("linear", "g2_axis0", 1, "float16", False)
    assert set(plain.to_tensors("p")) == {"p.lut", "p.indices"}
    assert list(plain.metadata("p")) == ["p.__palettized__"]
    assert "PalettizedWeight(shape=(8, 12), n_bits=3" in repr(plain)


def test_several_weights_share_one_file(tmp_path) -> None:
    first, _ = _make_weight("linear", "per_channel", 1, "int8", False)
    second, _ = _make_weight("conv", "g4_axis1", 4, "float16", True)
    path = str(tmp_path / "layer.safetensors")
    tensors = {**first.to_tensors("a"), **second.to_tensors("b")}
    save_file(tensors, path, metadata={**first.metadata("a"), **second.metadata("b")})
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    assert PalettizedWeight.from_tensors(tensors, metadata, "a") == first
    assert PalettizedWeight.from_tensors(tensors, metadata, "b") == second
    assert first != second


# --- validation ------------------------------------------------------------------------------


def _assignment(**overrides):
    arguments = {
        "lut": torch.zeros(4, 8, 1),
        "labels": torch.zeros(4, 24, dtype=torch.int64),
        "shape": (8, 12),
        "n_bits": 3,
        "channel_axis": 0,
        "group_size": 2,
    }
    arguments.update(overrides)
    lut, labels = arguments.pop("lut"), arguments.pop("labels")
    return PalettizedWeight.from_assignment(lut, labels, **arguments)


@pytest.mark.parametrize(
    ("overrides", "field", "match"),
    [
        ({"group_size": 3}, "group_size", "must be a positive divisor of the 8 channels"),
        ({"group_size": 0}, "group_size", "positive divisor"),
        (
            {"cluster_dim": 5, "vector_axis": 1},
            "cluster_dim",
            "must divide the 12 elements along vector_axis 1",
        ),
        ({"cluster_dim": 2}, "vector_axis", "must be an axis in 0..1"),
        ({"cluster_dim": 2, "vector_axis": 2}, "vector_axis", "must be an axis in 0..1"),
        ({"cluster_dim": 4, "vector_axis": 0}, "cluster_dim", "must divide group_size 2"),
        ({"vector_axis": 1}, "vector_axis", "must be None when cluster_dim is 1"),
        ({"n_bits": 0}, "n_bits", "must be an integer in 1..8, got 0"),
        ({"n_bits": 9}, "n_bits", "must be an integer in 1..8, got 9"),
        ({"channel_axis": 2}, "channel_axis", "must be an axis in 0..1"),
        (
            {"labels": torch.full((4, 24), 8)},
            "labels",
            r"must lie in \[0, 8\) for n_bits=3, got range \[8, 8\]",
        ),
        ({"labels": torch.full((4, 24), -1)}, "labels", r"must lie in \[0, 8\)"),
        ({"labels": torch.zeros(4, 23, dtype=torch.int64)}, "labels", r"must be \[4, 24\]"),
        ({"labels": torch.zeros(4, 24)}, "labels", "must be an integer tensor"),
        (
            {"lut": torch.zeros(4, 4, 1)},
            "lut",
            r"must be a float32 or float16 or int8 or uint8 tensor \[4, 8, 1\]",
        ),
        ({"lut": torch.zeros(4, 8, 1, dtype=torch.float64)}, "lut", "got float64"),
        (
            {"lut": torch.zeros(4, 8, 1, dtype=torch.int8)},
            "lut_scale",
            r"must be a float32 tensor \[4, 1, 1\], got NoneType",
        ),
        (
            {"lut": torch.zeros(4, 8, 1, dtype=torch.uint8), "lut_scale": torch.ones(4, 1, 1)},
            "lut_zero_point",
            r"must be a uint8 tensor \[4, 1, 1\], got NoneType",
        ),
        ({"lut_scale": torch.ones(4, 1, 1)}, "lut_scale", "must be None for a float32 lut"),
        ({"channel_scale": torch.ones(12)}, "channel_scale", r"must be a float32 tensor \[8\]"),
    ],
)
def test_validation_errors(overrides, field: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as caught:
        _assignment(**overrides)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"indices: must be a uint8 tensor \[36\]"):
        PalettizedWeight(torch.zeros(4, 8, 1), torch.zeros(8, dtype=torch.uint8), (8, 12), 3, 0, 2)
    with pytest.raises(ConfigError, match="shape: must be a non-empty tuple"):
        PalettizedWeight(torch.zeros(4, 8, 1), torch.zeros(36, dtype=torch.uint8), [8, 12], 3, 0, 2)


def _edit_layout(old: str, new: str):
    def edit(tensors: dict, metadata: dict) -> None:
        assert old in metadata["w.__palettized__"]
        metadata["w.__palettized__"] = metadata["w.__palettized__"].replace(old, new)

    return edit


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda t, m: t.pop("w.indices"), r"w: missing tensor\(s\) \['w.indices'\]"),
        (lambda t, m: m.clear(), "w: missing metadata key 'w.__palettized__'"),
        (lambda t, m: t.pop("w.lut"), r"w: missing tensor\(s\) \['w.lut'\]"),
        (lambda t, m: t.update({"w.lut": t["w.lut"].double()}), "w: lut: must be a float32 or"),
        (lambda t, m: t.update({"w.indices": t["w.indices"][:-1]}), r"w: indices: .* \[8\], got"),
        (lambda t, m: t.update({"w.lut_scale": torch.ones(2, 1, 1)}), "w: lut_scale: must be None"),
        (_edit_layout('"format_version": 1', '"format_version": 2'), "w: format_version 2 is not"),
        (_edit_layout('"group_size": 2', '"group_size": 3'), "w: group_size: must be a positive"),
        (lambda t, m: m.update({"w.__palettized__": "{"}), "w: metadata .* is not valid JSON"),
        (_edit_layout(', "n_bits": 3', ""), r"w: metadata 'w.__palettized__' lacks \['n_bits'\]"),
        (lambda t, m: t["w.indices"].__setitem__(-1, 255), "w: indices: the unused high bits"),
    ],
)
def test_from_tensors_errors(corrupt, match: str) -> None:
    labels = torch.randint(0, 8, (2, 10), generator=_generator("corrupt"))
    weight = _assignment(lut=torch.zeros(2, 8, 1), labels=labels, shape=(4, 5))  # 60 bits: 8 bytes
    tensors = {name: tensor.clone() for name, tensor in weight.to_tensors("w").items()}
    metadata = weight.metadata("w")
    corrupt(tensors, metadata)
    with pytest.raises(ValueError, match=match):
        PalettizedWeight.from_tensors(tensors, metadata, "w")
