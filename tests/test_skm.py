"""Sensitive K-Means: importance-weighted palettization checked against exact oracles (kmeans_1d on the
right weights, a brute-force outlier choice), dense-and-sparse outliers in the layout and layer files,
the configs and API against Core ML Tools 9.0, and `SKMPalettizer` end to end on a tiny Llama."""
import dataclasses
import inspect
import logging
import math

import pytest
import torch
from torch import nn

from llmpalette.errors import ConfigError
from llmpalette.layout.layer_file import LayerFile, layer_file_bytes, read_layer_file
from llmpalette.layout.palettized import group_view
from llmpalette.maths.kmeans1d import kmeans_1d
from llmpalette.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig
from llmpalette.palettization.post_training import palettize_weight, relative_error
from llmpalette.palettization.sensitive_k_means import (
    ModuleSKMPalettizerConfig as ModuleCfg,
    SKMPalettizer,
    SKMPalettizerConfig,
    load_sensitivities,
    outlier_mask,
    skm_palettize_weight,
)
from llmpalette.sources.text import calibration_windows
from tests.conftest import byte_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEQ = 32
SKIP_EMBEDDINGS = {"lm_head": None, "model.embed_tokens": None}
CT_LOGGER = "coremltools.optimize.torch"




def random_weight(shape=(16, 32), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, a positive heavy-tailed importance) of `shape`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.rand(shape, generator=gen) ** 4 + 1e-4


def weighted_error(weight, decoded, importance) -> float:
    return float((importance.double() * (weight.double() - decoded.double()).square()).sum())


# --- weighted palettize_weight ------------------------------------------------------------------------------

SCALAR_CONFIGS = {
    "per_tensor": dict(n_bits=3),
    "per_grouped_channel": dict(n_bits=3, granularity="per_grouped_channel", group_size=4),
    "per_channel": dict(n_bits=2, granularity="per_channel"),
    "axis1": dict(n_bits=2, granularity="per_grouped_channel", group_size=8, channel_axis=1),
}


@pytest.mark.parametrize("config", [*SCALAR_CONFIGS.values(), dict(n_bits=2, cluster_dim=2), dict(n_bits=3, lut_dtype="int8")],
                         ids=[*SCALAR_CONFIGS, "cluster_dim2", "int8_lut"])
def test_importance_all_ones_is_plain_k_means(config):
    weight, _ = random_weight()
    cfg = ModuleCfg(**config)
    assert palettize_weight(weight, cfg, importance=torch.ones_like(weight)) == palettize_weight(weight, cfg)


@pytest.mark.parametrize("config", SCALAR_CONFIGS.values(), ids=SCALAR_CONFIGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scalar_skm_is_the_fisher_weighted_optimum(config, seed):
    """Exact weighted 1-D k-means: no LUT (plain k-means' included) has a lower Fisher-weighted error,
    and the LUT is kmeans_1d's on the group rows with the importances as weights."""
    weight, importance = random_weight(seed=seed)
    cfg = ModuleCfg(**config)
    skm = palettize_weight(weight, cfg, importance=importance)
    plain = palettize_weight(weight, cfg)
    assert weighted_error(weight, skm.decode(), importance) <= weighted_error(weight, plain.decode(), importance) * (1 + 1e-6)
    assert relative_error(weight, skm.decode(), importance) < relative_error(weight, plain.decode(), importance)
    group_size = cfg.channels_per_lut(tuple(weight.shape))
    rows = group_view(weight, cfg.channel_axis, group_size)[..., 0]
    row_weights = group_view(importance, cfg.channel_axis, group_size)[..., 0]
    centroids, _ = kmeans_1d(rows, 2**cfg.n_bits, row_weights)
    torch.testing.assert_close(skm.lut[..., 0], centroids.float(), rtol=0, atol=1e-6)


def test_concentrated_importance_puts_those_weights_in_the_lut():
    weight, _ = random_weight(seed=3)
    importance = torch.full_like(weight, 1e-3)
    chosen = torch.tensor([5, 77, 300, 411])
    importance.view(-1)[chosen] = 1e6
    palettized = palettize_weight(weight, ModuleCfg(n_bits=2), importance=importance)
    lut = palettized.decoded_lut().flatten()
    for value in weight.view(-1)[chosen]:
        assert float((lut - value).abs().min()) < 1e-5
    torch.testing.assert_close(palettized.decode().view(-1)[chosen], weight.view(-1)[chosen], rtol=0, atol=1e-5)


def test_concentrated_importance_on_vectors_puts_those_vectors_in_the_lut():
    weight, _ = random_weight((16, 24), seed=4)
    importance = torch.full_like(weight, 1e-3)
    cfg = ModuleCfg(n_bits=2, cluster_dim=2)
    positions = group_view(torch.arange(weight.numel()).view(weight.shape), 0, 16, 2, 0)[0]  # [n, 2] flat positions
    chosen = torch.tensor([3, 50, 101, 170])
    importance.view(-1)[positions[chosen].flatten()] = 1e6
    skm = palettize_weight(weight, cfg, importance=importance)
    vectors = weight.view(-1)[positions[chosen]]  # [4, 2]
    assert float(torch.cdist(vectors, skm.decoded_lut()[0]).min(dim=1).values.max()) < 1e-5
    plain = palettize_weight(weight, cfg)
    assert weighted_error(weight, skm.decode(), importance) < 1e-3 * weighted_error(weight, plain.decode(), importance)


def test_zero_importance_weights_do_not_move_the_lut():
    weight, importance = random_weight(seed=5)
    importance[:, :10] = 0
    lut = palettize_weight(weight, ModuleCfg(n_bits=3), importance=importance).lut
    others, _ = kmeans_1d(weight[:, 10:].reshape(1, -1), 8, importance[:, 10:].reshape(1, -1))
    assert torch.equal(lut.view(-1), others.float().view(-1))
    moved = weight.clone()
    moved[:, :10] = 100 * torch.randn(16, 10)  # wild values with zero importance change nothing
    assert torch.equal(palettize_weight(moved, ModuleCfg(n_bits=3), importance=importance).lut, lut)


def decode_scaled(lut: torch.Tensor, scaled: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """Nearest-entry decoding of a channel-scaled weight (channel_axis 0) with `lut` [G, K], times the scale."""
    rows = scaled.reshape(lut.shape[0], -1)
    index = (rows[:, :, None] - lut[:, None, :].to(rows.dtype)).abs().argmin(dim=-1)
    return lut.to(rows.dtype).gather(1, index).view(scaled.shape) * scale[:, None]


@pytest.mark.parametrize("granularity", [dict(), dict(granularity="per_grouped_channel", group_size=4)],
                         ids=["per_tensor", "grouped"])
def test_per_channel_scale_weighs_the_error_of_the_unscaled_weight(granularity):
    """With a channel scale s the decoded weight is s * c, so SKM minimises sum F s^2 (w / s - c)^2: its LUT
    is kmeans_1d's with weights F s^2, and beats both plain k-means and k-means weighted by F alone."""
    weight, importance = random_weight(seed=6)
    weight = weight * torch.logspace(-1, 1, 16)[:, None]  # channels of very different ranges
    cfg = ModuleCfg(n_bits=3, enable_per_channel_scale=True, **granularity)
    skm = palettize_weight(weight, cfg, importance=importance)
    scale = weight.abs().amax(dim=1)
    assert torch.equal(skm.channel_scale, scale)
    group_size = cfg.channels_per_lut(tuple(weight.shape))
    scaled = (weight / scale[:, None]).reshape(16 // group_size, -1)
    oracle, _ = kmeans_1d(scaled, 8, (importance * scale[:, None].square()).reshape(16 // group_size, -1))
    torch.testing.assert_close(skm.lut[..., 0], oracle.float(), rtol=0, atol=1e-6)
    naive, _ = kmeans_1d(scaled, 8, importance.reshape(16 // group_size, -1))  # F on the scaled error: wrong
    ours = weighted_error(weight, skm.decode(), importance)
    assert ours < weighted_error(weight, decode_scaled(naive.float(), weight / scale[:, None], scale, group_size), importance)
    assert ours < weighted_error(weight, palettize_weight(weight, cfg).decode(), importance)
    ones = palettize_weight(weight, cfg, importance=torch.ones_like(weight))  # the unscaled error: not plain's
    assert relative_error(weight, ones.decode()) < relative_error(weight, palettize_weight(weight, cfg).decode())


def test_relative_error_with_and_without_importance():
    weight, importance = random_weight(seed=7)
    decoded = weight + 0.1 * torch.randn_like(weight)
    plain = float((weight.double() - decoded.double()).square().sum() / weight.double().square().sum())
    weighted = weighted_error(weight, decoded, importance) / float((importance.double() * weight.double().square()).sum())
    assert relative_error(weight, decoded) == pytest.approx(plain, rel=1e-12)
    assert relative_error(weight, decoded, torch.ones_like(weight)) == pytest.approx(plain, rel=1e-12)
    assert relative_error(weight, decoded, importance) == pytest.approx(weighted, rel=1e-12)
    assert relative_error(torch.zeros(3, 3), torch.ones(3, 3)) == 0.0


# --- outliers --------------------------------------------------------------------------------------------


def top_positions(score: list[float], count: int, exclude=()) -> set[int]:
    """Brute force: the `count` largest scores, the first position winning ties."""
    order = sorted((i for i in range(len(score)) if i not in exclude), key=lambda i: (-score[i], i))
    return set(order[:count])


def tied_weight_and_sensitivity() -> tuple[torch.Tensor, torch.Tensor]:
    """[8, 8] values and sensitivities drawn from a few levels, so both have many ties."""
    gen = torch.Generator().manual_seed(8)
    weight = torch.randint(-3, 4, (8, 8), generator=gen).float() / 2
    return weight, torch.randint(0, 4, (8, 8), generator=gen).float()


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25])
@pytest.mark.parametrize("selection", ["sensitivity", "magnitude", "sensitivity_and_magnitude"])
def test_outlier_mask_is_the_brute_force_choice_with_first_position_winning_ties(selection, fraction):
    weight, sensitivity = tied_weight_and_sensitivity()
    count = math.floor(fraction * 64)
    magnitude, score = weight.abs().flatten().tolist(), sensitivity.flatten().tolist()
    if selection == "magnitude":
        expected = top_positions(magnitude, count)
    elif selection == "sensitivity":
        expected = top_positions(score, count)
    else:
        by_magnitude = top_positions(magnitude, (count + 1) // 2)
        expected = by_magnitude | top_positions(score, count - len(by_magnitude), exclude=by_magnitude)
    mask = outlier_mask(weight, sensitivity, fraction, selection)
    assert mask.shape == weight.shape and mask.dtype == torch.bool
    assert set(mask.flatten().nonzero().flatten().tolist()) == expected and len(expected) == count
    assert torch.equal(outlier_mask(weight, sensitivity, fraction, selection), mask)


def test_outlier_mask_without_outliers_or_sensitivities():
    weight, sensitivity = tied_weight_and_sensitivity()
    assert outlier_mask(weight, sensitivity, 0.0) is None
    assert outlier_mask(weight, sensitivity, 1 / 65) is None  # floor(64 / 65) = 0
    assert int(outlier_mask(weight, None, 0.1, "magnitude").sum()) == 6
    for selection in ("sensitivity", "sensitivity_and_magnitude"):
        with pytest.raises(ValueError, match=f"'{selection}' needs sensitivities"):
            outlier_mask(weight, None, 0.1, selection)


@pytest.mark.parametrize("config", [dict(n_bits=2), dict(n_bits=3, granularity="per_grouped_channel", group_size=4),
                                    dict(n_bits=3, enable_per_channel_scale=True), dict(n_bits=2, cluster_dim=2)],
                         ids=["per_tensor", "grouped", "channel_scale", "cluster_dim2"])
def test_outliers_decode_exactly_and_take_no_part_in_the_lut(config):
    weight, importance = random_weight(seed=9)
    weight.view(-1)[[7, 100, 260]] = torch.tensor([40.0, -25.0, 0.123456789])
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask.view(-1)[[7, 100, 260, 301]] = True
    cfg = ModuleCfg(**config)
    with_outliers = palettize_weight(weight, cfg, importance=importance, outliers=mask)
    assert with_outliers.n_outliers == 4
    assert with_outliers.outlier_positions.dtype == torch.int32 and with_outliers.outlier_positions.tolist() == [7, 100, 260, 301]
    assert with_outliers.outlier_values.dtype == torch.float16
    decoded = with_outliers.decode()
    assert torch.equal(decoded[mask], weight[mask].half().float())
    # the outliers' values take no part: other values there give the same LUT, indices and scales
    moved = weight.clone()
    moved[mask] = torch.tensor([-3.0, 7.5, 1e3, -0.5])
    other = palettize_weight(moved, cfg, importance=importance, outliers=mask)
    assert torch.equal(with_outliers.lut, other.lut) and torch.equal(with_outliers.indices, other.indices)
    assert (with_outliers.channel_scale is None) == (other.channel_scale is None)
    if with_outliers.channel_scale is not None:
        assert torch.equal(with_outliers.channel_scale, other.channel_scale)
    assert torch.equal(decoded[~mask], other.decode()[~mask])
    ignoring = palettize_weight(weight, cfg, importance=importance.masked_fill(mask, 0.0))
    if cfg.vector_size == 1 and not cfg.enable_per_channel_scale:
        # scalar LUTs: exactly the LUT fitted with the outliers' importance set to zero
        # (indices equal too, except under the outliers, where they are 0)
        assert torch.equal(with_outliers.lut, ignoring.lut) and torch.equal(decoded[~mask], ignoring.decode()[~mask])
        assert torch.equal(with_outliers.labels().view(-1)[[7, 100, 260, 301]], torch.zeros(4, dtype=torch.int64))
    assert with_outliers.nbytes == ignoring.nbytes + 4 * (4 + 2)


def test_outliers_without_importance_are_left_out_of_plain_k_means():
    weight, _ = random_weight(seed=10)
    weight[0, 0] = 50.0
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[0, 0] = True
    palettized = palettize_weight(weight, ModuleCfg(n_bits=2), outliers=mask)
    assert float(palettized.lut.abs().max()) < 10  # no entry is spent on the outlier
    assert palettized.lut.equal(palettize_weight(weight, ModuleCfg(n_bits=2), importance=(~mask).float()).lut)
    assert float(palettized.decode()[0, 0]) == 50.0


def with_outlier_value(weight: torch.Tensor, value: float) -> torch.Tensor:
    changed = weight.clone()
    changed[0, 0] = value
    return changed


def test_vector_outliers_take_no_part_in_the_lut():
    weight, _ = random_weight((16, 24), seed=14)
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[0, 0] = True  # one element of the vector (rows 0..1, column 0)
    cfg = ModuleCfg(n_bits=2, cluster_dim=2)
    large, zero = (palettize_weight(with_outlier_value(weight, v), cfg, outliers=mask) for v in (1000.0, 0.0))
    assert float(large.decoded_lut().abs().max()) < 10
    assert torch.equal(large.lut, zero.lut)


def test_outliers_do_not_set_the_channel_scale():
    weight, _ = random_weight((16, 24), seed=14)
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[0, 0] = True
    cfg = ModuleCfg(n_bits=3, enable_per_channel_scale=True)
    large, zero = (palettize_weight(with_outlier_value(weight, v), cfg, outliers=mask) for v in (1000.0, 0.0))
    assert float(large.channel_scale[0]) < 10
    assert torch.equal(large.decode()[~mask], zero.decode()[~mask])


def test_outliers_survive_a_layer_file_round_trip(tmp_path):
    weight, importance = random_weight(seed=11)
    config = ModuleCfg(n_bits=3, granularity="per_grouped_channel", group_size=4, outlier_fraction=0.05)
    palettized = skm_palettize_weight(weight, config, sensitivity=importance)
    assert palettized.n_outliers == math.floor(0.05 * weight.numel())
    tensors = palettized.to_tensors("weight")
    assert tensors["weight.outlier_positions"].dtype == torch.int32 and tensors["weight.outlier_values"].dtype == torch.float16
    path = tmp_path / "layer.safetensors"
    path.write_bytes(layer_file_bytes(LayerFile("fc", "weight", (), palettized)))
    read = read_layer_file(path).weight
    assert read == palettized and read.n_outliers == palettized.n_outliers
    assert torch.equal(read.decode(), palettized.decode())
    without = dataclasses.replace(palettized, outlier_positions=None, outlier_values=None)
    assert read != without and without.nbytes == palettized.nbytes - palettized.n_outliers * 6


@pytest.mark.parametrize(
    "positions, values, field",
    [
        ([3, 1], [1.0, 2.0], "outlier_positions"),  # not ascending
        ([1, 1], [1.0, 2.0], "outlier_positions"),  # duplicate
        ([-1, 2], [1.0, 2.0], "outlier_positions"),  # negative
        ([2, 512], [1.0, 2.0], "outlier_positions"),  # numel is 512
        ([1, 2, 3], [1.0, 2.0], "outlier_values"),  # lengths differ
        ([1, 2], None, "outlier_positions"),  # values missing
        (None, [1.0], "outlier_positions"),  # positions missing
        (torch.tensor([1, 2]), [1.0, 2.0], "outlier_positions"),  # int64
        ([1, 2], torch.tensor([1.0, 2.0]), "outlier_values"),  # float32
    ],
)
def test_bad_outliers_are_refused_naming_the_field(positions, values, field):
    weight, _ = random_weight()
    palettized = palettize_weight(weight, ModuleCfg(n_bits=2))
    def stored(given, dtype):
        return given if given is None or isinstance(given, torch.Tensor) else torch.tensor(given, dtype=dtype)

    as_positions, as_values = stored(positions, torch.int32), stored(values, torch.float16)
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(palettized, outlier_positions=as_positions, outlier_values=as_values)
    assert err.value.field == field


def test_skm_palettize_weight_is_palettize_weight_with_its_outlier_mask():
    weight, sensitivity = random_weight(seed=12)
    config = ModuleCfg(n_bits=3, outlier_fraction=0.02, outlier_selection="sensitivity_and_magnitude")
    mask = outlier_mask(weight, sensitivity, 0.02, "sensitivity_and_magnitude")
    expected = palettize_weight(weight, config, importance=sensitivity, outliers=mask)
    assert skm_palettize_weight(weight, config, sensitivity=sensitivity) == expected
    assert skm_palettize_weight(weight, ModuleCfg(n_bits=3), sensitivity=sensitivity).n_outliers == 0
    with pytest.raises(ValueError, match=r"sensitivity of shape \[32, 16\] does not match the weight's \[16, 32\]"):
        skm_palettize_weight(weight, config, sensitivity=sensitivity.T)


# --- configs ---------------------------------------------------------------------------------------------


def test_skm_config_defaults_and_core_ml_tools_example_dict():
    config = SKMPalettizerConfig.from_dict({"global_config": {"n_bits": 4}, "calibration_nsamples": 16})
    assert config.global_config == ModuleCfg(n_bits=4) and config.calibration_nsamples == 16
    assert isinstance(config.global_config, ModuleCfg)
    default = SKMPalettizerConfig()
    assert default.calibration_nsamples == 128 and default.calibration_shard_size >= 1 and not default.gradient_checkpointing
    assert default.global_config == ModuleCfg()
    assert (ModuleCfg().outlier_fraction, ModuleCfg().outlier_selection) == (0.0, "sensitivity")


@pytest.mark.parametrize("fraction", [-0.01, 0.5, 0.75])
def test_outlier_fraction_outside_zero_to_half_is_refused_naming_it(fraction):
    with pytest.raises(ConfigError) as err:
        ModuleCfg(outlier_fraction=fraction)
    assert err.value.field == "outlier_fraction" and "[0, 0.5)" in err.value.message
    with pytest.raises(ConfigError) as err:
        SKMPalettizerConfig.from_dict({"module_name_configs": {"fc": {"outlier_fraction": fraction}}})
    assert err.value.field == "module_name_configs.fc.outlier_fraction"


@pytest.mark.parametrize(
    "config, field",
    [
        ({"global_config": {"outlier_selection": "largest"}}, "global_config.outlier_selection"),
        ({"calibration_nsamples": 0}, "calibration_nsamples"),
        ({"calibration_nsamples": "16"}, "calibration_nsamples"),
        ({"calibration_shard_size": 0}, "calibration_shard_size"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
        ({"calibration_samples": 16}, "calibration_samples"),
        ({"global_config": {"n_bits": 4, "outliers": 0.01}}, "global_config.outliers"),
    ],
)
def test_bad_skm_configs_are_refused_naming_the_field(config, field):
    with pytest.raises(ConfigError) as err:
        SKMPalettizerConfig.from_dict(config)
    assert err.value.field == field


# --- parity with Core ML Tools 9.0 ------------------------------------------------------------------------


@pytest.fixture
def ct():
    module = pytest.importorskip("coremltools.optimize.torch.palettization")
    logger = logging.getLogger(CT_LOGGER)
    before = logger.level
    logger.setLevel(logging.WARNING)
    yield module
    logger.setLevel(before)


def test_every_core_ml_tools_module_field_is_ours_with_the_same_default(ct):
    attrs = pytest.importorskip("attrs")
    theirs = {f.name: f for f in attrs.fields(ct.ModuleSKMPalettizerConfig)}
    ours = {f.name for f in dataclasses.fields(ModuleCfg)}
    assert set(theirs) <= ours, set(theirs) - ours
    defaults = {k: getattr(v, "value", v) for k, v in ct.ModuleSKMPalettizerConfig().as_dict().items()}
    assert set(defaults) == set(theirs)
    for name, value in defaults.items():  # lut_dtype None there is float32 here
        assert ModuleCfg.from_dict({name: value}) == ModuleCfg(), name
    assert ModuleCfg.from_dict(defaults) == ModuleCfg()
    model_fields = [f.name for f in attrs.fields(ct.SKMPalettizerConfig)]
    assert [f.name for f in dataclasses.fields(SKMPalettizerConfig)][: len(model_fields)] == model_fields
    assert SKMPalettizerConfig().calibration_nsamples == ct.SKMPalettizerConfig().calibration_nsamples == 128


def parameters(function) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()
            if p.name != "self" and p.kind is not inspect.Parameter.KEYWORD_ONLY]


def test_compress_and_compute_sensitivity_take_core_ml_tools_arguments_in_order(ct):
    ours, theirs = dict(parameters(SKMPalettizer.compress)), dict(parameters(ct.SKMPalettizer.compress))
    assert list(ours) == list(theirs)
    # the one deliberate difference (as in PostTrainingPalettizer): k-means threads default to every core
    assert (ours.pop("num_kmeans_workers"), theirs.pop("num_kmeans_workers")) == (None, 1)
    assert ours == theirs
    assert [name for name, _ in parameters(SKMPalettizer.compute_sensitivity)] == \
        [name for name, _ in parameters(ct.SKMPalettizer.compute_sensitivity)]
    assert [name for name, _ in parameters(SKMPalettizer.__init__)] == [name for name, _ in parameters(ct.SKMPalettizer.__init__)]


def test_example_dict_parses_alike(ct):
    example = {"global_config": {"n_bits": 4}, "calibration_nsamples": 16}
    ours, theirs = SKMPalettizerConfig.from_dict(example), ct.SKMPalettizerConfig.from_dict(example)
    assert (ours.global_config.n_bits, ours.calibration_nsamples) == (theirs.global_config.n_bits, theirs.calibration_nsamples)


@pytest.mark.parametrize("global_config", [{"n_bits": 2}, {"n_bits": 2, "granularity": "per_grouped_channel", "group_size": 4}],
                         ids=["per_tensor", "grouped"])
def test_same_weights_as_core_ml_tools_from_one_sensitivity_file(ct, tmp_path, global_config):
    """Given one torch-saved sensitivity file (Core ML Tools' format, positive values, so its clipping does
    nothing), both tools' weighted k-means are exact and give the same weights."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 8)).eval()
    gen = torch.Generator().manual_seed(13)
    sensitivities = {f"{i}.weight": torch.rand(model[i].weight.shape, generator=gen) ** 3 + 1e-3 for i in (0, 1)}
    path = tmp_path / "sensitivity.pt"
    torch.save(sensitivities, path)
    config = {"global_config": global_config}
    theirs = ct.SKMPalettizer(model, ct.SKMPalettizerConfig.from_dict(config)).compress(sensitivity_path=str(path))
    palettizer = SKMPalettizer(model, SKMPalettizerConfig.from_dict(config))
    ours = palettizer.compress(sensitivity_path=str(path))
    for i in (0, 1):
        torch.testing.assert_close(ours[i].weight, theirs[i].weight, rtol=0, atol=1e-6)
        assert not torch.equal(ours[i].weight, model[i].weight)
    assert set(palettizer.compressed) == {"0", "1"}


# --- SKMPalettizer end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def windows() -> list[torch.Tensor]:
    return [window for _, window in calibration_windows(byte_tokenizer(), "default", seq_len=SEQ, count=4)]


def skm_config(samples=4, **global_config) -> SKMPalettizerConfig:
    return SKMPalettizerConfig.from_dict({
        "global_config": {"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 8, **global_config},
        "module_name_configs": SKIP_EMBEDDINGS,
        "calibration_nsamples": samples,
        "calibration_shard_size": 2,
    })


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_compress_returns_the_decoded_weights_and_leaves_the_original_alone(windows):
    model = tiny_llama(seed=1)
    before = state(model)
    palettizer = SKMPalettizer(model, skm_config(outlier_fraction=0.01))
    out = palettizer.compress(windows)
    assert out is not model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters()) and not model.training
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert sorted(palettizer.compressed) == sorted(linears) and len(linears) == 14
    for name, palettized in palettizer.compressed.items():
        assert torch.equal(out.get_submodule(name).weight, palettized.decode()), name
        assert palettized.n_outliers == math.floor(0.01 * palettized.decode().numel()) > 0
    assert torch.equal(out.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    report = palettizer.report()
    assert set(report) == set(palettizer.compressed)
    for name, row in report.items():
        weight, decoded = before[f"{name}.weight"], out.get_submodule(name).weight.detach()
        sensitivity = palettizer.sensitivities[f"{name}.weight"]
        assert row["outliers"] == palettizer.compressed[name].n_outliers
        assert row["nbytes"] == palettizer.compressed[name].nbytes and row["num_params"] == weight.numel()
        assert row["fisher_rel_sq_error"] == pytest.approx(relative_error(weight, decoded, sensitivity))
        assert row["rel_sq_error"] == pytest.approx(relative_error(weight, decoded))


def test_inplace_compresses_the_model_passed_in(windows):
    model = tiny_llama(seed=1)
    reference = SKMPalettizer(tiny_llama(seed=1), skm_config()).compress(windows)
    palettizer = SKMPalettizer(model, skm_config())
    assert palettizer.compress(windows, inplace=True) is model
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


def test_saved_sensitivities_give_the_same_compression(windows, tmp_path):
    model = tiny_llama(seed=2)
    inline = SKMPalettizer(model, skm_config())
    inline.compress(windows)
    path = tmp_path / "fisher.safetensors"
    first = SKMPalettizer(model, skm_config())
    computed = first.compute_sensitivity(windows, sensitivity_path=str(path))
    assert sorted(computed) == sorted(f"{name}.weight" for name in inline.compressed)
    loaded = load_sensitivities(path)
    assert all(torch.equal(loaded[k], inline.sensitivities[k]) for k in inline.sensitivities)
    assert not isinstance(loaded, dict) and len(loaded) == len(computed)  # read one tensor at a time
    torch.save(dict(loaded), tmp_path / "fisher.pt")  # Core ML Tools' format
    for saved in (path, tmp_path / "fisher.pt"):
        again = SKMPalettizer(model, skm_config())
        again.compress(sensitivity_path=str(saved))
        assert again.compressed.keys() == inline.compressed.keys()
        assert all(again.compressed[n] == inline.compressed[n] for n in inline.compressed), saved


def test_batches_are_split_into_samples(windows):
    """[2, L] batches, or dicts a custom loss_fn reads, give the sensitivities of the single windows; a batch
    that passes calibration_nsamples is cut inside."""
    model = tiny_llama(seed=3)
    single = SKMPalettizer(model, skm_config()).compute_sensitivity(windows)
    batched = SKMPalettizer(model, skm_config()).compute_sensitivity([torch.stack(windows[:2]), torch.stack(windows[2:])])
    assert all(torch.equal(batched[k], single[k]) for k in single)

    def dict_loss(model, batch):
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss

    dicts = SKMPalettizer(model, skm_config()).compute_sensitivity([{"input_ids": torch.stack(windows)}], dict_loss)
    assert all(torch.equal(dicts[k], single[k]) for k in single)
    three = SKMPalettizer(model, skm_config(samples=3)).compute_sensitivity(windows[:3])
    cut = SKMPalettizer(model, skm_config(samples=3)).compute_sensitivity([torch.stack(windows)])
    assert all(torch.equal(cut[k], three[k]) for k in three)
    assert not torch.equal(three["model.layers.0.mlp.up_proj.weight"], single["model.layers.0.mlp.up_proj.weight"])


def test_fewer_samples_than_asked_are_used_with_a_warning(windows, caplog):
    model = tiny_llama(seed=3)
    with caplog.at_level("WARNING", logger="llmpalette"):
        short = SKMPalettizer(model, skm_config(samples=6)).compute_sensitivity(windows)
    assert "the dataloader gave 4 samples, fewer than calibration_nsamples=6" in caplog.text
    exact = SKMPalettizer(model, skm_config(samples=4)).compute_sensitivity(windows)
    assert all(torch.equal(short[k], exact[k]) for k in exact)


def test_missing_data_or_sensitivities_are_named(windows, tmp_path):
    model = tiny_llama(seed=3)
    with pytest.raises(ConfigError) as err:
        SKMPalettizer(model, skm_config()).compress()
    assert err.value.field == "dataloader"
    with pytest.raises(ConfigError) as err:
        SKMPalettizer(model, skm_config()).compress([])
    assert err.value.field == "dataloader" and "no samples" in err.value.message
    with pytest.raises(ConfigError) as err:
        SKMPalettizer(model, skm_config()).compress(sensitivity_path=str(tmp_path / "absent.safetensors"))
    assert err.value.field == "sensitivity_path"
    partial = tmp_path / "partial.pt"
    torch.save({"model.layers.0.self_attn.q_proj.weight": torch.ones(64, 64)}, partial)
    with pytest.raises(ConfigError, match="has no sensitivity for 'model.layers.0.self_attn.k_proj.weight'") as err:
        SKMPalettizer(model, skm_config()).compress(sensitivity_path=str(partial))
    assert err.value.field == "sensitivity_path"


def test_the_tied_embedding_is_compressed_once_under_its_parameter_name(windows):
    model = tiny_llama(seed=5)
    config = SKMPalettizerConfig.from_dict({"global_config": {"n_bits": 3}, "calibration_nsamples": 2,
                                            "module_name_configs": {"model\\.layers\\..*": None}})
    palettizer = SKMPalettizer(model, config)
    out = palettizer.compress(windows)
    assert list(palettizer.sensitivities) == ["model.embed_tokens.weight"]  # Core ML Tools' key, named_parameters'
    assert list(palettizer.compressed) == ["model.embed_tokens"]
    assert out.lm_head.weight is out.model.embed_tokens.weight
    assert torch.equal(out.lm_head.weight, palettizer.compressed["model.embed_tokens"].decode())
    both_uses = palettizer.sensitivities["model.embed_tokens.weight"]
    assert bool((both_uses > 0).all())  # lm_head's gradient reaches every row, not only the tokens seen


def test_skm_beats_plain_k_means_on_the_fisher_weighted_error(windows):
    model = tiny_llama(seed=4)
    skm = SKMPalettizer(model, skm_config())
    skm_model = skm.compress(windows)
    plain_config = PostTrainingPalettizerConfig.from_dict({
        "global_config": {"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 8},
        "module_name_configs": SKIP_EMBEDDINGS,
    })
    plain_model = PostTrainingPalettizer(model, plain_config).compress()
    ours, plain = [], []
    for name in skm.compressed:
        weight, sensitivity = model.get_submodule(name).weight, skm.sensitivities[f"{name}.weight"]
        ours.append(relative_error(weight, skm_model.get_submodule(name).weight.detach(), sensitivity))
        plain.append(relative_error(weight, plain_model.get_submodule(name).weight.detach(), sensitivity))
        assert ours[-1] <= plain[-1] * (1 + 1e-6), name
    assert sum(ours) / len(ours) < 0.95 * sum(plain) / len(plain)
