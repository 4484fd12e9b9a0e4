"""Round-to-nearest linear quantization: the uniform grid, `PostTrainingQuantizer`, and parity with Core ML Tools.

Core ML Tools' `PostTrainingQuantizer.compress()` leaves the dequantized weight in each module it
quantized and registers `_COREML_/weight/quantization_scale` (and `_COREML_/weight/zero_point` for
affine or unsigned grids) on it, shaped like our `scale` (one entry per block, the weight's rank).
Its integers come from `coremltools.optimize._utils.compute_qparams`, which the quantizer calls;
the tests call it too, with the per-axis block sizes the quantizer would pass. Where llmpalette
differs on purpose (it raises where Core ML Tools skips or does something other than documented),
the test asserts both behaviours, so it fails if either tool changes.
"""
import copy
import dataclasses
import inspect
import itertools
import logging
import typing

import pytest
import torch
from torch import nn

from llmpalette.errors import ConfigError
from llmpalette.layout import QuantizedWeight
from llmpalette.maths.uniform import (
    dequantize_blocks,
    quant_range,
    quantize_blocks,
    UniformColumns,
    uniform_grid,
)
from llmpalette.quantization import (
    ModulePostTrainingQuantizerConfig,
    PostTrainingQuantizer,
    PostTrainingQuantizerConfig,
    rtn_compress_unit,
    rtn_quantize_weight,
)
from llmpalette.quantization import post_training

from tests.conftest import tiny_llama

ctq = pytest.importorskip("coremltools.optimize.torch.quantization")
ct_utils = pytest.importorskip("coremltools.optimize._utils")
ct_ptq = pytest.importorskip("coremltools.optimize.torch.quantization.post_training_quantization")
attrs = pytest.importorskip("attrs")

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # Core ML Tools divides by the zero scale of an all-zero block and casts NaN to an integer
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]
CT_LOGGER = "coremltools.optimize.torch"
SCALE, ZERO_POINT = "_COREML_/weight/quantization_scale", "_COREML_/weight/zero_point"
DTYPES = ("int8", "uint8", "int4", "uint4")
GRANULARITIES = ("per_tensor", "per_channel", "per_block")
SCHEMES = ("symmetric", "affine")


@pytest.fixture(autouse=True)
def quiet_coremltools():
    """Core ML Tools logs on its own handler; keep errors only (the tests check its skips by their effect)."""
    logger = logging.getLogger(CT_LOGGER)
    before = logger.level
    logger.setLevel(logging.ERROR)
    yield logger
    logger.setLevel(before)


def run_theirs(model: nn.Module, config: dict) -> nn.Module:
    return ctq.PostTrainingQuantizer(model, ctq.PostTrainingQuantizerConfig.from_dict(config)).compress()


def run_ours(model: nn.Module, config: dict) -> tuple[nn.Module, PostTrainingQuantizer]:
    quantizer = PostTrainingQuantizer(model, PostTrainingQuantizerConfig.from_dict(config))
    return quantizer.compress(), quantizer


def their_params(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{module name: (scale, zero point or None)} of every module Core ML Tools quantized."""
    found = {}
    for name, module in model.named_modules():
        buffers = dict(module.named_buffers(recurse=False))
        if SCALE in buffers:
            found[name] = (buffers[SCALE], buffers.get(ZERO_POINT))
    return found


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return tiny_llama(layers=1)  # tied lm_head = embed_tokens, whose padding row (token 256) is all zeros


# -- 1. the same weights, scales and zero points as Core ML Tools ----------------------------------
@pytest.mark.parametrize(("weight_dtype", "granularity", "scheme"), itertools.product(DTYPES, GRANULARITIES, SCHEMES))
def test_same_dequantized_weights_scales_and_zero_points_as_coremltools(llama, weight_dtype, granularity, scheme):
    module_config = {"weight_dtype": weight_dtype, "granularity": granularity, "quantization_scheme": scheme}
    if granularity == "per_block":
        module_config["block_size"] = 16
    config = {"global_config": module_config}
    theirs = run_theirs(llama, config)
    ours, quantizer = run_ours(llama, config)
    for (name, their_param), (_, our_param) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert torch.equal(their_param, our_param), name
    params = their_params(theirs)
    linears = {name for name, m in llama.named_modules() if isinstance(m, nn.Linear)}
    assert set(params) == linears
    for name, (their_scale, their_zero_point) in params.items():
        ours_q = quantizer.compressed["model.embed_tokens" if name == "lm_head" else name]  # one tied unit
        assert torch.equal(ours_q.decode(), ours.get_submodule(name).weight)
        assert (their_zero_point is None) == (ours_q.zero_point is None)
        assert their_scale.shape == ours_q.scale.shape
        live = their_scale > 0  # a block of zeros: Core ML Tools' scale is 0, ours 1 (both decode to 0)
        assert torch.equal(their_scale[live], ours_q.scale[live])
        assert torch.equal(ours_q.scale[~live], torch.ones_like(ours_q.scale[~live]))
        if their_zero_point is not None:
            assert their_zero_point.dtype == ours_q.zero_point.dtype
            assert torch.equal(their_zero_point[live], ours_q.zero_point[live])
    if granularity != "per_tensor":
        assert (params["lm_head"][0] == 0).any(), "the padding row should make an all-zero block"


def _their_integers(weight, block_sizes, weight_dtype, scheme):
    """Core ML Tools' integers, scale and zero point for a weight (what its quantizer computes)."""
    n_bits, signed = int(weight_dtype.lstrip("uint")), not weight_dtype.startswith("u")
    mode = "LINEAR_SYMMETRIC" if scheme == "symmetric" else "LINEAR"
    return ct_utils.compute_qparams(weight.numpy(), nbits=n_bits, signed=signed, quantization_mode=mode, dtype=None,
                                    block_sizes=list(block_sizes))


@pytest.mark.parametrize(("weight_dtype", "scheme"), itertools.product(DTYPES, SCHEMES))
@pytest.mark.parametrize(
    ("shape", "config", "their_block_sizes"),
    [
        ((48, 64), {"granularity": "per_tensor"}, [0, 0]),
        ((48, 64), {"granularity": "per_channel"}, [1, 0]),
        ((48, 64), {"granularity": "per_block", "block_size": 16}, [1, 16]),
        ((48, 64), {"granularity": "per_block", "block_size": (4, 32)}, [4, 32]),
        ((8, 6, 3, 3), {"granularity": "per_block", "block_size": 2}, [1, 2, 0, 0]),
        ((8, 6, 3, 3), {"granularity": "per_channel"}, [1, 0, 0, 0]),
    ],
)
def test_same_integers_as_coremltools(shape, config, their_block_sizes, weight_dtype, scheme):
    generator = torch.Generator().manual_seed(len(shape) * 100 + their_block_sizes[1])
    for weight in (torch.randn(shape, generator=generator), torch.rand(shape, generator=generator) + 0.5):
        module_config = ModulePostTrainingQuantizerConfig.from_dict(
            {**config, "weight_dtype": weight_dtype, "quantization_scheme": scheme})
        ours = rtn_quantize_weight(weight, module_config)
        q, scale, zero_point = _their_integers(weight, their_block_sizes, weight_dtype, scheme)
        assert torch.equal(ours.integers(), torch.from_numpy(q))
        assert torch.equal(ours.scale, torch.from_numpy(scale))
        assert (zero_point is None) == (ours.zero_point is None)
        if zero_point is not None:
            assert torch.equal(ours.zero_point, torch.from_numpy(zero_point))
        assert torch.equal(ours.decode(), torch.from_numpy(ct_utils.dequantize_by_scale_and_zp(q, scale, zero_point)))


def test_conv_weights_match_coremltools_in_a_model():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv1d(8, 8, 2))
    for module_config in ({"granularity": "per_channel"}, {"weight_dtype": "uint4", "granularity": "per_block", "block_size": 2}):
        config = {"global_config": module_config}
        theirs, (ours, _) = run_theirs(model, config), run_ours(model, config)
        for their_param, our_param in zip(theirs.parameters(), ours.parameters()):
            assert torch.equal(their_param, our_param)


# -- 2. block_size: Core ML Tools' reading, and errors where it skips the layer -------------------
@pytest.mark.parametrize(
    ("block_size", "block_sizes"),
    [
        (16, (1, 16)),
        ((4, 16), (4, 16)),
        ((32, 16), (1, 16)),  # the output axis is not split by its full length: per channel when the input is split
        ((0, 16), (1, 16)),
        ((4, 0), (4, 64)),
        ((4, 64), (4, 64)),
        ((1, 0), (1, 64)),
    ],
)
def test_block_size_reads_as_coremltools_reads_it(block_size, block_sizes):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 32))
    config = {"global_config": {"weight_dtype": "int4", "granularity": "per_block", "block_size": block_size}}
    theirs, (ours, quantizer) = run_theirs(model, config), run_ours(model, config)
    assert quantizer.compressed["0"].block_sizes == block_sizes
    assert their_params(theirs)["0"][0].shape == quantizer.compressed["0"].scale.shape
    assert torch.equal(theirs[0].weight, ours[0].weight)


@pytest.mark.parametrize(
    ("shape", "block_size", "match"),
    [
        ((32, 64), 64, r"layer '0': block_size 64 splits neither axis of shape \[32, 64\]"),
        ((32, 64), 24, r"layer '0': block size 24 does not divide its 64 elements along axis 1"),
        ((32, 64), (4, 128), "block size 128 along axis 1 does not divide its 64 elements"),
        ((32, 64), (6, 16), "block size 6 does not divide its 32 elements along axis 0"),
        ((8, 4, 3, 3), (1, 2, 1, 1), r"axis 2 of shape \[8, 4, 3, 3\] cannot be split"),
        ((32, 64), (1, 16, 1), r"has more entries than its shape"),
    ],
)
def test_a_block_size_coremltools_skips_is_an_error_naming_the_layer(shape, block_size, match):
    torch.manual_seed(5)
    layer = nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(shape[1], shape[0], shape[2:])
    model = nn.Sequential(layer)
    config = {"global_config": {"weight_dtype": "int4", "granularity": "per_block", "block_size": block_size}}
    theirs = run_theirs(model, config)
    assert their_params(theirs) == {} and torch.equal(theirs[0].weight, layer.weight)  # skipped, with a warning
    with pytest.raises(ConfigError, match=match) as caught:
        run_ours(model, config)
    assert caught.value.field == "global_config.block_size"


# -- 3. API surface read from the installed Core ML Tools ---------------------------------------
def test_config_fields_and_defaults_are_coremltools():
    theirs = {f.name: f for f in attrs.fields(ct_ptq.ModulePostTrainingQuantizerConfig) if f.init}
    ours = {f.name: f for f in dataclasses.fields(ModulePostTrainingQuantizerConfig)}
    assert set(theirs) == {"weight_dtype", "granularity", "quantization_scheme", "block_size"}
    assert set(ours) == set(theirs) | {"weight_threshold"}
    default = ModulePostTrainingQuantizerConfig()
    their_default = ct_ptq.ModulePostTrainingQuantizerConfig()
    assert default.weight_dtype == "int8" and their_default.weight_dtype == torch.int8
    assert default.weight_n_bits == their_default.weight_n_bits == 8
    assert default.granularity == their_default.granularity.value
    assert default.quantization_scheme == their_default.quantization_scheme.value
    assert default.block_size is their_default.block_size is None
    assert set(typing.get_args(post_training.Granularity)) == {g.value for g in ct_ptq.QuantizationGranularity}
    assert set(typing.get_args(post_training.QuantizationScheme)) == {s.value for s in ctq.QuantizationScheme}
    integer_dtypes = {d for d in ct_ptq._SUPPORTED_WEIGHT_DTYPE if isinstance(d, str) and "int" in d}
    assert integer_dtypes == set(post_training._CORE_ML_TOOLS_DTYPES)
    assert integer_dtypes <= set(post_training.WEIGHT_DTYPES)


def test_api_signatures_are_coremltools():
    def parameters(function):
        return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]

    assert parameters(PostTrainingQuantizer.__init__) == parameters(ctq.PostTrainingQuantizer.__init__)
    assert parameters(PostTrainingQuantizer.compress) == parameters(ctq.PostTrainingQuantizer.compress)
    assert parameters(PostTrainingQuantizer.report) == parameters(ctq.PostTrainingQuantizer.report)
    assert callable(PostTrainingQuantizerConfig.from_yaml) and callable(ctq.PostTrainingQuantizerConfig.from_yaml)


def test_coremltools_enums_and_dtypes_are_accepted():
    config = PostTrainingQuantizerConfig.from_dict({"global_config": {
        "weight_dtype": torch.uint8,
        "granularity": ct_ptq.QuantizationGranularity.per_block,
        "quantization_scheme": ctq.QuantizationScheme.affine,
        "block_size": 8,
    }})
    module_config = config.global_config
    assert (module_config.weight_dtype, module_config.granularity, module_config.quantization_scheme) == (
        "uint8", "per_block", "affine")
    assert ModulePostTrainingQuantizerConfig(weight_dtype="torch.int8").weight_dtype == "int8"


def test_from_yaml_takes_a_list_block_size_where_coremltools_needs_a_tuple():
    text = """
global_config: {weight_dtype: int4, granularity: per_block, block_size: [1, 16]}
module_name_configs: {lm_head: null, model.embed_tokens: null}
"""
    config = PostTrainingQuantizerConfig.from_yaml(text)
    assert config.global_config.block_size == (1, 16)
    assert config.global_config.block_sizes_for((64, 128)) == (1, 16)
    with pytest.raises(Exception, match="ModulePostTrainingQuantizerConfig"):
        ctq.PostTrainingQuantizerConfig.from_dict({"global_config": {"granularity": "per_block", "block_size": [1, 16]}})


# -- 4. where llmpalette differs on purpose -------------------------------------------------------
def test_tied_weights_skipped_under_one_name_only_is_refused():
    model = tiny_llama(layers=1)
    config = {"module_name_configs": {"lm_head": None}, "global_config": {"weight_dtype": "int4"}}
    theirs = run_theirs(model, config)
    assert torch.equal(theirs.lm_head.weight, model.lm_head.weight)  # Embedding is not a type it quantizes
    with pytest.raises(ConfigError, match="model.embed_tokens and lm_head share one tensor"):
        run_ours(model, config)
    both = {**config, "module_name_configs": {"lm_head": None, "model.embed_tokens": None}}
    ours, quantizer = run_ours(model, both)
    assert torch.equal(ours.lm_head.weight, model.lm_head.weight) and "model.embed_tokens" not in quantizer.compressed


def test_an_untied_embedding_is_quantized_by_llmpalette_and_left_alone_by_coremltools():
    model = tiny_llama(layers=1, tie=False)
    config = {"global_config": {"weight_dtype": "int8"}}
    theirs, (ours, quantizer) = run_theirs(model, config), run_ours(model, config)
    assert torch.equal(theirs.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(ours.model.embed_tokens.weight, quantizer.compressed["model.embed_tokens"].decode())
    assert not torch.equal(ours.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(theirs.lm_head.weight, ours.lm_head.weight)


def test_different_schemes_per_module_are_allowed():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    config = {"global_config": {"quantization_scheme": "affine"}, "module_name_configs": {"1": {"quantization_scheme": "symmetric"}}}
    with pytest.raises(ValueError, match="quantization_scheme cannot be different"):
        ctq.PostTrainingQuantizerConfig.from_dict(config)
    _, quantizer = run_ours(model, config)
    assert quantizer.compressed["0"].zero_point is not None and quantizer.compressed["1"].zero_point is None


def test_float_weight_dtypes_are_refused_where_coremltools_quantizes_anyway():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(16, 8))
    theirs = run_theirs(model, {"global_config": {"weight_dtype": "float32"}})  # documented: "not quantized"
    assert not torch.equal(theirs[0].weight, model[0].weight)  # but quantized to int32
    fp8 = run_theirs(model, {"global_config": {"weight_dtype": "fp8_e5m2"}})
    assert torch.equal(fp8[0].weight, run_theirs(model, {"global_config": {"weight_dtype": "int8"}})[0].weight)
    for dtype, match in (("float32", "quantizes it to int32; to leave a module alone"), ("fp8_e5m2", "write int8"),
                         (torch.float32, "float32")):
        with pytest.raises(ConfigError, match=match) as caught:
            PostTrainingQuantizerConfig.from_dict({"global_config": {"weight_dtype": dtype}})
        assert caught.value.field == "global_config.weight_dtype"


# -- 5. the quantizer -----------------------------------------------------------------------------
def test_compress_returns_a_copy_unless_inplace_and_reports(llama):
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    config = PostTrainingQuantizerConfig.from_dict({"global_config": {"weight_dtype": "int4"},
                                                    "module_name_configs": {"model.layers.0.mlp.down_proj": None}})
    quantizer = PostTrainingQuantizer(llama, config)
    quantized = quantizer.compress()
    assert all(torch.equal(p, before[n]) for n, p in llama.named_parameters())
    assert torch.equal(quantized.model.layers[0].mlp.down_proj.weight, llama.model.layers[0].mlp.down_proj.weight)
    report = quantizer.report()
    assert "model.layers.0.mlp.down_proj" not in report
    up = report["model.layers.0.mlp.up_proj"]
    weight = llama.model.layers[0].mlp.up_proj.weight.detach()
    assert up["weight_dtype"] == "int4" and up["n_bits"] == 4 and up["granularity"] == "per_channel"
    assert up["num_params"] == weight.numel() and up["scale_shape"] == [weight.shape[0], 1]
    assert up["nbytes"] == weight.numel() // 2 + weight.shape[0] * 4
    decoded = quantized.model.layers[0].mlp.up_proj.weight.detach()
    assert up["error"] == pytest.approx(float((decoded - weight).square().mean().sqrt()), rel=1e-6)
    assert report["model.embed_tokens"]["tied_names"] == ["lm_head"]
    duplicate = copy.deepcopy(llama)
    in_place = PostTrainingQuantizer(duplicate, config).compress(inplace=True)
    assert in_place is duplicate and torch.equal(duplicate.model.layers[0].mlp.up_proj.weight, decoded)


def test_a_default_config_is_int8_per_channel_symmetric(llama):
    quantizer = PostTrainingQuantizer(llama)
    quantizer.compress()
    q = quantizer.compressed["model.layers.0.self_attn.q_proj"]
    assert (q.n_bits, q.signed, q.zero_point, q.block_sizes) == (8, True, None, (1, 64))


def test_compress_unit_is_rtn_and_data_free():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(8))
    config = ModulePostTrainingQuantizerConfig(weight_dtype="uint4", granularity="per_block", block_size=16,
                                               quantization_scheme="affine")
    quantized = rtn_compress_unit(weight, config, seed=0)
    assert isinstance(quantized, QuantizedWeight) and quantized == rtn_quantize_weight(weight, config)
    assert rtn_compress_unit(weight, config, seed=123) == quantized
    with pytest.raises(ValueError, match="rtn is data-free"):
        rtn_compress_unit(weight, config, seed=0, sensitivity=torch.ones_like(weight))
    assert rtn_quantize_weight(weight.to(torch.bfloat16), config) == rtn_quantize_weight(weight.to(torch.bfloat16).float(), config)


def test_the_error_of_an_unclipped_grid_is_at_most_half_a_step():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(9))
    for weight_dtype, scheme in itertools.product(("int3", "uint3", "int4", "int8"), SCHEMES):
        config = ModulePostTrainingQuantizerConfig(weight_dtype=weight_dtype, granularity="per_block", block_size=8,
                                                   quantization_scheme=scheme)
        quantized = rtn_quantize_weight(weight, config)
        step = quantized.scale.repeat_interleave(8, dim=1)
        assert bool(((quantized.decode() - weight).abs() <= step / 2 * (1 + 1e-5)).all()), (weight_dtype, scheme)


@pytest.mark.parametrize(
    ("module_config", "field", "match"),
    [
        ({"granularity": "per_block"}, "block_size", "is required with granularity per_block"),
        ({"block_size": 16}, "block_size", "only applies to granularity per_block, not per_channel"),
        ({"granularity": "per_block", "block_size": 0}, "block_size", "must be a positive integer, got 0"),
        ({"granularity": "per_block", "block_size": [1, -2]}, "block_size", "list of non-negative integers"),
        ({"granularity": "per_block", "block_size": "16"}, "block_size", "must be a positive integer or a list"),
        ({"weight_dtype": "int9"}, "weight_dtype", "expected one of int8, uint8, int4, uint4"),
        ({"weight_dtype": "uint1"}, "weight_dtype", "got 'uint1'"),
        ({"granularity": "per_grouped_channel"}, "granularity", "expected one of 'per_tensor'"),
        ({"quantization_scheme": "asymmetric"}, "quantization_scheme", "expected one of 'symmetric' | 'affine'"),
        ({"weight_threshold": -1}, "weight_threshold", "must be >= 0"),
        ({"n_bits": 4}, "n_bits", "unknown field of ModulePostTrainingQuantizerConfig"),
    ],
)
def test_config_errors_name_the_field(module_config, field, match):
    with pytest.raises(ConfigError, match=match) as caught:
        PostTrainingQuantizerConfig.from_dict({"global_config": module_config})
    assert caught.value.field == f"global_config.{field}"


def test_weights_that_cannot_be_quantized():
    config = ModulePostTrainingQuantizerConfig()
    with pytest.raises(ConfigError, match="weight of shape \\[8\\] has no input axis"):
        rtn_quantize_weight(torch.ones(8), config)
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        rtn_quantize_weight(torch.tensor([[1.0, float("nan")]]), config)


# -- 6. the grid functions GPTQ calls ---------------------------------------------------------------
def test_quant_ranges_are_coremltools():
    for n_bits, signed, scheme in itertools.product(range(2, 9), (True, False), SCHEMES):
        mode = "LINEAR_SYMMETRIC" if scheme == "symmetric" else "LINEAR"
        assert quant_range(n_bits, signed, scheme) == ct_utils.get_quant_range(n_bits, signed, mode)


def test_gptqs_column_quantizer_is_the_whole_weight_column_by_column():
    weight = torch.randn(12, 32, generator=torch.Generator().manual_seed(10))
    block_sizes = (2, 8)
    for signed, scheme in itertools.product((True, False), SCHEMES):
        scale, zero_point = uniform_grid(weight, block_sizes, 4, signed, scheme)
        qmin, qmax = quant_range(4, signed, scheme)
        whole = quantize_blocks(weight, scale, zero_point, block_sizes, qmin, qmax)
        values = dequantize_blocks(whole, scale, zero_point, block_sizes)
        columns = UniformColumns(scale, zero_point, block_sizes, qmin, qmax, weight.shape[1])  # GPTQ's quantizer
        for column in range(weight.shape[1]):
            v = columns(weight[:, column], column)
            assert torch.equal(v, values[:, column])
        assert torch.equal(columns.integers, whole.to(torch.int32))


def test_an_all_zero_block_gets_scale_one_and_decodes_to_zero():
    weight = torch.zeros(4, 8)
    weight[0] = torch.linspace(-1, 1, 8)
    for weight_dtype, scheme in itertools.product(DTYPES, SCHEMES):
        config = ModulePostTrainingQuantizerConfig(weight_dtype=weight_dtype, quantization_scheme=scheme)
        quantized = rtn_quantize_weight(weight, config)
        assert torch.equal(quantized.scale[1:], torch.ones(3, 1))
        assert torch.equal(quantized.decode()[1:], torch.zeros(3, 8))
