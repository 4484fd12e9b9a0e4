"""The linear-quantized kind of the compressed-weight format: QuantizedWeight, its tensors and its layer files."""

import hashlib
import json
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmpalette.errors import ConfigError
from llmpalette.layout import LayerFile, PalettizedWeight, QuantizedWeight, layer_file_bytes, read_layer_file
from llmpalette.maths.uniform import storage_range


def _generator(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _random_weight(shape, block_sizes, n_bits, signed, with_zero_point, key="w") -> tuple[QuantizedWeight, torch.Tensor]:
    """A QuantizedWeight of random integers, scales and zero points, and its integers (int64)."""
    g = _generator(key, shape, block_sizes, n_bits, signed, with_zero_point)
    low, high = storage_range(n_bits, signed)
    q = torch.randint(low, high + 1, shape, generator=g)
    blocks = tuple(s // b for s, b in zip(shape, block_sizes))
    scale = torch.rand(blocks, generator=g) * 0.1 + 1e-3
    zero_point = torch.randint(low, high + 1, blocks, generator=g) if with_zero_point else None
    weight = QuantizedWeight.from_integers(q, scale, zero_point, n_bits=n_bits, signed=signed, block_sizes=block_sizes)
    return weight, q


def _reference_decode(q: torch.Tensor, scale: torch.Tensor, zero_point, block_sizes) -> torch.Tensor:
    """Element by element: (q - zero_point) * scale of the element's block, in float32."""
    expanded_scale, expanded_zp = scale, zero_point
    for axis, block in enumerate(block_sizes):
        expanded_scale = expanded_scale.repeat_interleave(block, dim=axis)
        if expanded_zp is not None:
            expanded_zp = expanded_zp.repeat_interleave(block, dim=axis)
    values = q.to(torch.float32)
    if expanded_zp is not None:
        values = values - expanded_zp.to(torch.float32)
    return values * expanded_scale.to(torch.float32)


LAYOUTS = [  # (shape, block_sizes)
    ((8, 12), (8, 12)),  # per tensor
    ((8, 12), (1, 12)),  # per channel
    ((8, 12), (1, 4)),  # blocks of 4 along the input axis
    ((8, 12), (2, 3)),  # 2-D blocks
    ((6, 4, 3, 3), (1, 2, 3, 3)),  # Conv2d, blocks along the input channels
    ((5, 7), (5, 7)),  # 35 elements: sub-byte padding for most widths
]


# --- decode ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "block_sizes"), LAYOUTS)
@pytest.mark.parametrize("n_bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_decode_is_the_reference_element_by_element(shape, block_sizes, n_bits, signed) -> None:
    for with_zero_point in (False, True):
        weight, q = _random_weight(shape, block_sizes, n_bits, signed, with_zero_point)
        assert torch.equal(weight.integers().to(torch.int64), q)
        assert weight.integers().dtype == (torch.int8 if signed else torch.uint8)
        expected = _reference_decode(q, weight.scale, weight.zero_point, block_sizes)
        assert weight.decode().dtype == torch.float32
        assert torch.equal(weight.decode(), expected)


def test_decode_known_values() -> None:
    q = torch.tensor([[-8, -1, 0, 7], [3, 2, 1, 0]], dtype=torch.int8)
    scale = torch.tensor([[0.5, 2.0], [0.25, 1.0]])
    zero_point = torch.tensor([[0, -1], [1, 0]], dtype=torch.int8)
    weight = QuantizedWeight.from_integers(q, scale, zero_point, n_bits=4, signed=True, block_sizes=(1, 2))
    assert weight.decode().tolist() == [[-4.0, -0.5, 2.0, 16.0], [0.5, 0.25, 1.0, 0.0]]
    assert weight.decode(torch.float16).dtype == torch.float16
    assert torch.equal(weight.decode(torch.bfloat16), weight.decode().to(torch.bfloat16))


@pytest.mark.parametrize("n_bits", range(1, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_every_width_round_trips_its_whole_range(n_bits, signed, tmp_path) -> None:
    low, high = storage_range(n_bits, signed)
    q = torch.arange(low, high + 1).repeat(3).view(3, -1)
    weight = QuantizedWeight.from_integers(q, torch.ones(3, 1), n_bits=n_bits, signed=signed, block_sizes=(1, q.shape[1]))
    assert torch.equal(weight.integers().to(torch.int64), q)
    assert torch.equal(weight.decode(), q.to(torch.float32))
    assert _through_layer_file(weight, tmp_path) == weight


def test_signed_integers_are_packed_as_twos_complement_like_coremltools() -> None:
    utils = pytest.importorskip("coremltools.optimize._utils")
    q = torch.randint(-8, 8, (6, 10), generator=_generator("pack"), dtype=torch.int8)
    weight = QuantizedWeight.from_integers(q, torch.ones(6, 1), n_bits=4, signed=True, block_sizes=(1, 10))
    theirs = utils.pack_elements_into_bits(q.numpy().reshape(-1), 4)
    assert weight.data.tolist() == theirs.tolist()


# --- size, tensors, files ----------------------------------------------------------------------


def test_nbytes_counts_every_stored_tensor() -> None:
    weight, _ = _random_weight((64, 128), (1, 32), 4, False, True)
    assert weight.nbytes == 64 * 128 * 4 // 8 + 64 * 4 * 4 + 64 * 4  # packed ints, float32 scales, uint8 zero points
    symmetric, _ = _random_weight((64, 128), (1, 128), 8, True, False)
    assert symmetric.nbytes == 64 * 128 + 64 * 4
    odd, _ = _random_weight((5, 7), (5, 7), 3, True, False)
    assert odd.nbytes == 14 + 4  # 105 bits in 14 bytes


def test_tensors_metadata_and_repr() -> None:
    weight, _ = _random_weight((8, 12), (1, 4), 4, False, True)
    tensors = weight.to_tensors("p")
    assert set(tensors) == {"p.data", "p.scale", "p.zero_point"}
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())
    metadata = weight.metadata("p", {"module": "fc"})
    assert list(metadata) == ["p.__quantized__"]
    assert json.loads(metadata["p.__quantized__"]) == {
        "block_sizes": [1, 4], "format_version": 1, "has_zero_point": True, "module": "fc", "n_bits": 4,
        "shape": [8, 12], "signed": False,
    }
    plain, _ = _random_weight((8, 12), (1, 12), 8, True, False)
    assert set(plain.to_tensors("p")) == {"p.data", "p.scale"}
    assert repr(plain) == "QuantizedWeight(shape=(8, 12), n_bits=8, signed=True, block_sizes=(1, 12), zero_point=False, nbytes=128)"
    assert (weight.granularity, plain.granularity) == ("per_block", "per_channel")
    assert _random_weight((8, 12), (8, 12), 8, True, False)[0].granularity == "per_tensor"
    assert weight.n_outliers == 0


@pytest.mark.parametrize(("shape", "block_sizes"), LAYOUTS)
def test_round_trip_through_tensors_and_a_shared_file(shape, block_sizes, tmp_path) -> None:
    first, _ = _random_weight(shape, block_sizes, 4, True, True, key="a")
    second, _ = _random_weight(shape, block_sizes, 3, False, False, key="b")
    path = str(tmp_path / "two.safetensors")
    save_file({**first.to_tensors("a"), **second.to_tensors("b")}, path, metadata={**first.metadata("a"), **second.metadata("b")})
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    assert QuantizedWeight.from_tensors(tensors, metadata, "a") == first
    assert QuantizedWeight.from_tensors(tensors, metadata, "b") == second
    assert first != second


def _through_layer_file(weight, tmp_path, module="model.layers.0.mlp.up_proj", aliases=()):
    path = tmp_path / "layer.safetensors"
    path.write_bytes(layer_file_bytes(LayerFile(module, "weight", aliases, weight)))
    layer = read_layer_file(path)
    assert (layer.module, layer.param, layer.aliases) == (module, "weight", aliases)
    return layer.weight


def test_layer_file_round_trip_and_its_single_metadata_key(tmp_path) -> None:
    weight, _ = _random_weight((16, 32), (1, 8), 4, True, True)
    read = _through_layer_file(weight, tmp_path, "lm_head", ("model.embed_tokens",))
    assert isinstance(read, QuantizedWeight) and read == weight
    assert torch.equal(read.decode(), weight.decode())
    with safe_open(str(tmp_path / "layer.safetensors"), framework="pt") as handle:
        assert list(handle.metadata()) == ["weight.__quantized__"]


def test_a_layer_file_reads_as_either_kind(tmp_path) -> None:
    palettized = PalettizedWeight.from_assignment(
        torch.arange(8, dtype=torch.float32).view(1, 8, 1),
        torch.arange(24).remainder(8).view(1, 24),
        shape=(4, 6), n_bits=3, channel_axis=0, group_size=4,
    )
    read = _through_layer_file(palettized, tmp_path)
    assert isinstance(read, PalettizedWeight) and read == palettized
    with safe_open(str(tmp_path / "layer.safetensors"), framework="pt") as handle:
        assert list(handle.metadata()) == ["weight.__palettized__"]


def _fixed_layer() -> LayerFile:
    q = (torch.arange(96).view(8, 12) % 16 - 8).to(torch.int8)
    scale = torch.arange(1, 25, dtype=torch.float32).view(8, 3) / 64
    zero_point = (torch.arange(24).view(8, 3) % 5 - 2).to(torch.int8)
    weight = QuantizedWeight.from_integers(q, scale, zero_point, n_bits=4, signed=True, block_sizes=(1, 4))
    return LayerFile("fc", "weight", ("tied",), weight)


def test_layer_file_bytes_are_reproducible() -> None:
    """The same layer gives the same bytes, here and on any machine: the hash pins the format's bytes
    (a deliberate format change updates it, with format_version)."""
    first, second = layer_file_bytes(_fixed_layer()), layer_file_bytes(_fixed_layer())
    assert first == second
    assert hashlib.sha256(first).hexdigest() == "f687cf9fd60dc766b2345abe4aef4d94b3ac61bb6bb2c21231f492126f21f9fb"


def test_a_file_with_no_or_two_weight_keys_is_refused(tmp_path) -> None:
    weight, _ = _random_weight((4, 8), (1, 8), 8, True, False)
    path = tmp_path / "bad.safetensors"
    save_file(weight.to_tensors("weight"), str(path), metadata={"other": "1"})
    with pytest.raises(ValueError, match=r"expected one '\*\.__palettized__' or '\*\.__quantized__' metadata key"):
        read_layer_file(path)
    metadata = {**weight.metadata("weight"), "weight.__palettized__": "{}"}
    save_file(weight.to_tensors("weight"), str(path), metadata=metadata)
    with pytest.raises(ValueError, match="expected one"):
        read_layer_file(path)


# --- validation ------------------------------------------------------------------------------


def _build(**overrides):
    arguments = {
        "q": torch.zeros(8, 12, dtype=torch.int8),
        "scale": torch.ones(8, 3),
        "zero_point": None,
        "n_bits": 4,
        "signed": True,
        "block_sizes": (1, 4),
    }
    arguments.update(overrides)
    q, scale, zero_point = arguments.pop("q"), arguments.pop("scale"), arguments.pop("zero_point")
    return QuantizedWeight.from_integers(q, scale, zero_point, **arguments)


@pytest.mark.parametrize(
    ("overrides", "field", "match"),
    [
        ({"n_bits": 0}, "n_bits", "must be an integer in 1..8, got 0"),
        ({"n_bits": 9}, "n_bits", "must be an integer in 1..8, got 9"),
        ({"signed": 1}, "signed", "must be true or false, got 1"),
        ({"block_sizes": (1, 5)}, "block_sizes", r"5 along axis 1 does not divide its 12 elements"),
        ({"block_sizes": (0, 4)}, "block_sizes", "0 along axis 0 does not divide"),
        ({"block_sizes": (1, 4, 1)}, "block_sizes", "one block size per axis of shape"),
        ({"scale": torch.ones(8, 4)}, "scale", r"must be a float32 tensor \[8, 3\], got float32 \[8, 4\]"),
        ({"scale": torch.zeros(8, 3)}, "scale", "must be positive and finite"),
        ({"scale": torch.full((8, 3), float("nan"))}, "scale", "must be positive and finite"),
        ({"q": torch.full((8, 12), 8)}, "q", r"must lie in \[-8, 7\] for signed n_bits=4, got range \[8, 8\]"),
        ({"q": torch.full((8, 12), -1), "signed": False}, "q", r"must lie in \[0, 15\] for unsigned n_bits=4"),
        ({"q": torch.zeros(8, 12)}, "q", "must be an integer tensor, got float32"),
        ({"zero_point": torch.full((8, 3), 16), "signed": False}, "zero_point", r"must lie in \[0, 15\]"),
        ({"zero_point": torch.zeros(8, 1, dtype=torch.int8)}, "zero_point", r"must be a int8 tensor \[8, 3\]"),
        ({"zero_point": torch.zeros(8, 3)}, "zero_point", "must be an integer tensor"),
    ],
)
def test_validation_errors_name_the_field(overrides, field, match) -> None:
    with pytest.raises(ConfigError, match=match) as caught:
        _build(**overrides)
    assert caught.value.field == field


def test_direct_construction_is_validated() -> None:
    scale = torch.ones(8, 3)
    with pytest.raises(ConfigError, match=r"data: must be a uint8 tensor \[48\], got uint8 \[47\]"):
        QuantizedWeight(torch.zeros(47, dtype=torch.uint8), scale, (8, 12), 4, True, (1, 4))
    with pytest.raises(ConfigError, match="shape: must be a non-empty tuple"):
        QuantizedWeight(torch.zeros(48, dtype=torch.uint8), scale, [8, 12], 4, True, (1, 4))
    with pytest.raises(ConfigError, match=r"zero_point: must be a uint8 tensor \[8, 3\], got int8"):
        QuantizedWeight(torch.zeros(48, dtype=torch.uint8), scale, (8, 12), 4, False, (1, 4), torch.zeros(8, 3, dtype=torch.int8))
    with pytest.raises(ConfigError, match=r"scale: must be a float32 tensor \[8, 3\], got float16"):
        QuantizedWeight(torch.zeros(48, dtype=torch.uint8), scale.half(), (8, 12), 4, True, (1, 4))


def _edit_layout(old: str, new: str):
    def corrupt(tensors, metadata):
        assert old in metadata["w.__quantized__"]
        metadata["w.__quantized__"] = metadata["w.__quantized__"].replace(old, new)

    return corrupt


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda t, m: m.clear(), "w: missing metadata key 'w.__quantized__'; not a linear-quantized weight"),
        (lambda t, m: t.pop("w.scale"), r"w: missing tensor\(s\) \['w.scale'\]"),
        (lambda t, m: t.pop("w.zero_point"), r"w: missing tensor\(s\) \['w.zero_point'\]"),
        (_edit_layout('"has_zero_point": true', '"has_zero_point": false'), "w: zero_point: stored, but the layout says"),
        (_edit_layout('"has_zero_point": true', '"has_zero_point": 1'), "w: has_zero_point: must be true or false"),
        (lambda t, m: m.update({"w.__quantized__": "{"}), "w: metadata .* is not valid JSON"),
        (lambda t, m: m.update({"w.__quantized__": "[]"}), "must be a JSON object"),
        (_edit_layout('"format_version": 1', '"format_version": 2'), "format_version 2 is not supported"),
        (_edit_layout('"n_bits": 3, ', ""), r"w: metadata 'w.__quantized__' lacks \['n_bits'\]"),
        (_edit_layout('"block_sizes": [1, 5]', '"block_sizes": 5'), "w: block_sizes: must be a list"),
        (_edit_layout('"block_sizes": [1, 5]', '"block_sizes": [2, 5]'), r"w: scale: must be a float32 tensor \[2, 1\], got float32 \[4, 1\]"),
        (lambda t, m: t.update({"w.data": t["w.data"] | 0x80}), "w: data: the unused high bits of the last byte must be 0"),
    ],
)
def test_from_tensors_errors(corrupt, match) -> None:
    q = torch.randint(0, 8, (4, 5), generator=_generator("corrupt"))  # 60 bits: 8 bytes, 4 spare bits
    weight = QuantizedWeight.from_integers(q, torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.uint8), n_bits=3,
                                           signed=False, block_sizes=(1, 5))
    tensors = {name: tensor.clone() for name, tensor in weight.to_tensors("w").items()}
    metadata = weight.metadata("w")
    corrupt(tensors, metadata)
    with pytest.raises(ValueError, match=match):
        QuantizedWeight.from_tensors(tensors, metadata, "w")
