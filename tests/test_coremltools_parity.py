"""Parity with Core ML Tools: its `PostTrainingPalettizer` and ours, side by side on the same tiny modules.

Each test runs both tools on one seeded model and compares what they compressed, the LUT shapes
and, where both clusterings are exact, the LUT entries and the decoded weights. Where llmpalette
differs on purpose (it raises where Core ML Tools ignores or skips), the test asserts both
behaviours, so it fails if either tool changes.

Reading Core ML Tools' result: `compress()` registers, on each compressed module, the buffer
`_COREML_/weight/lut` (`CompressionMetadata.register`); a module it left alone has no such
buffer and its weight unchanged. Its LUT has one axis per weight axis and then `[K, cluster_dim]`:
the number of LUTs sits at `channel_axis`, every other axis is 1 (Linear, channel_axis 0:
`[out / group_size, 1, K, cluster_dim]`; Conv2d, channel_axis 1: `[1, in / group_size, 1, 1, K,
cluster_dim]`). Ours is `[groups, K, cluster_dim]`, so the mapping is a reshape to
`[-1, K, cluster_dim]`, once the other axes are checked to be 1 (`_as_our_layout`).
"""
import dataclasses
import inspect
import logging
import math

import pytest
import torch
from torch import nn

ct = pytest.importorskip("coremltools.optimize.torch.palettization")
attrs = pytest.importorskip("attrs")  # Core ML Tools' configs are attrs classes

from llmpalette.errors import ConfigError  # noqa: E402
from llmpalette.palettization import ModulePostTrainingPalettizerConfig as OurModuleCfg  # noqa: E402
from llmpalette.palettization import PostTrainingPalettizer as OurPalettizer  # noqa: E402
from llmpalette.palettization import PostTrainingPalettizerConfig as OurCfg  # noqa: E402

CT_LOGGER = "coremltools.optimize.torch"  # its own stderr handler, INFO, propagate=False
LUT_BUFFER = "_COREML_/weight/lut"


@pytest.fixture(autouse=True)
def quiet_coremltools():
    """Core ML Tools logs every block at INFO on its own handler; keep warnings only."""
    logger = logging.getLogger(CT_LOGGER)
    before = logger.level
    logger.setLevel(logging.WARNING)
    yield logger
    logger.setLevel(before)


# -- running both tools ---------------------------------------------------------------------------
def _theirs_dict(config: dict) -> dict:
    """`config` for Core ML Tools, exact k-means: `enable_fast_kmeans_mode` off in every module config
    (on by default, it rounds weights to 4 decimals before clustering)."""

    def exact(module_config):
        return None if module_config is None else {**module_config, "enable_fast_kmeans_mode": False}

    out = dict(config)
    if config.get("global_config") is not None:
        out["global_config"] = exact(config["global_config"])
    for key in ("module_type_configs", "module_name_configs"):
        if key in config:
            out[key] = {k: exact(v) for k, v in config[key].items()}
    return out


def run_ours(model: nn.Module, config: dict | None) -> tuple[nn.Module, dict[str, torch.Tensor], OurPalettizer]:
    """(compressed model, {module name: LUT [groups, K, cluster_dim]}, the palettizer)."""
    palettizer = OurPalettizer(model, None if config is None else OurCfg.from_dict(config))
    out = palettizer.compress()
    return out, {name: pw.decoded_lut() for name, pw in palettizer.compressed.items()}, palettizer


def run_theirs(model: nn.Module, config: dict | None, *, exact: bool = True) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(compressed model, {module name: LUT as Core ML Tools registers it})."""
    if config is None:
        ct_config = None
    else:
        ct_config = ct.PostTrainingPalettizerConfig.from_dict(_theirs_dict(config) if exact else config)
    out = ct.PostTrainingPalettizer(model, ct_config).compress()
    return out, coreml_luts(out)


def coreml_luts(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module name: its `_COREML_/weight/lut` buffer} for every module Core ML Tools palettized."""
    luts = {}
    for name, module in model.named_modules():
        lut = dict(module.named_buffers(recurse=False)).get(LUT_BUFFER)
        if lut is not None:
            luts[name] = lut
    return luts


def _as_our_layout(lut: torch.Tensor, weight_shape: tuple[int, ...], channel_axis: int) -> torch.Tensor:
    """Core ML Tools' LUT `[1, .., groups (at channel_axis), .., 1, K, d]` as ours, `[groups, K, d]`."""
    lut_axes = list(lut.shape[:-2])
    assert len(lut_axes) == len(weight_shape), (lut.shape, weight_shape)
    assert all(size == 1 for axis, size in enumerate(lut_axes) if axis != channel_axis), lut.shape
    return lut.reshape(-1, *lut.shape[-2:])


def _sorted_rows(lut: torch.Tensor) -> list[list[tuple[float, ...]]]:
    """Per LUT, its entries as a sorted list of tuples (the LUT as a set, order-free). lut [G, K, d]."""
    return [sorted(map(tuple, group.tolist())) for group in lut]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}


def _model(**children: nn.Module) -> nn.Sequential:
    model = nn.Sequential()
    for name, child in children.items():
        model.add_module(name, child)
    return model.eval()


# -- 1. module_name_configs: regular expressions, re.fullmatch, first matching key wins ----------
def _convs_and_fc() -> nn.Sequential:
    torch.manual_seed(1)
    return _model(conv1=nn.Conv2d(2, 4, 3), conv2=nn.Conv2d(2, 4, 3), conv10=nn.Conv2d(2, 4, 3), fc=nn.Linear(8, 4))


@pytest.mark.parametrize(
    "name_configs, expected",
    [
        # "conv\d+" comes first and matches conv1: conv1's own key is never reached
        ({"conv\\d+": {"n_bits": 2}, "conv1": None}, {"conv1": 4, "conv2": 4, "conv10": 4, "fc": 8}),
        # "conv1" first skips conv1 only: fullmatch, so "conv1" does not take conv10
        ({"conv1": None, "conv\\d+": {"n_bits": 2}}, {"conv2": 4, "conv10": 4, "fc": 8}),
    ],
)
def test_name_keys_are_regexes_first_full_match_wins(name_configs, expected):
    model = _convs_and_fc()
    config = {"global_config": {"n_bits": 3}, "module_name_configs": name_configs}
    _, ours, _ = run_ours(model, config)
    _, theirs = run_theirs(model, config)
    assert {n: lut.shape[1] for n, lut in ours.items()} == expected  # LUT size 2**n_bits per module
    assert {n: lut.shape[-2] for n, lut in theirs.items()} == expected
    for name, lut in theirs.items():
        assert tuple(_as_our_layout(lut, tuple(model.get_submodule(name).weight.shape), 0).shape) == tuple(ours[name].shape)


def test_name_key_matching_no_module_is_an_error_here_and_ignored_by_core_ml_tools():
    """Deliberate difference: a key that configures nothing is a typo; llmpalette refuses it, naming it."""
    model = _convs_and_fc()
    config = {"global_config": {"n_bits": 2}, "module_name_configs": {"cnov1": None}}
    with pytest.raises(ConfigError) as err:
        run_ours(model, config)
    assert err.value.field == "module_name_configs.cnov1" and "matches no module" in str(err.value)
    _, theirs = run_theirs(model, config)
    assert set(theirs) == {"conv1", "conv2", "conv10", "fc"}  # Core ML Tools: the key is ignored


# -- 2. vector LUTs run along channel_axis ---------------------------------------------------------
def _planted(shape: tuple[int, ...], axis: int, d: int, group_size: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight whose d-vectors along `axis` (d consecutive channels, the other axes fixed) are, in each
    group of `group_size` channels, exactly k planted vectors, each used at least once.

    Entries are multiples of 1/4 in [-2, 2], so a cluster's mean of equal vectors is exact in float32
    and any k-means that finds the k distinct points returns them bit for bit.
    Returns (weight of `shape`, planted vectors [groups, k, d]).
    """
    gen = torch.Generator().manual_seed(seed)
    channels = shape[axis]
    rest = shape[:axis] + shape[axis + 1:]
    m = math.prod(rest)
    groups, rows_per_group = channels // group_size, group_size // d
    codes = torch.stack([torch.randperm(17**d, generator=gen)[:k] for _ in range(groups)])  # [G, k] distinct
    digits = torch.stack([(codes // 17**i) % 17 for i in range(d)], dim=-1)  # [G, k, d] in 0..16
    points = (digits.to(torch.float32) - 8) / 4
    labels = torch.arange(rows_per_group * m) % k  # every planted vector used
    labels = torch.stack([labels[torch.randperm(labels.numel(), generator=gen)] for _ in range(groups)])
    vectors = points[torch.arange(groups)[:, None], labels]  # [G, rows_per_group * m, d]
    vectors = vectors.reshape(channels // d, m, d)  # vector row r belongs to group r * d // group_size
    base = vectors.permute(0, 2, 1).reshape(channels, *rest)  # base[r * d + t, j] = vectors[r, j, t]
    return base.movedim(0, axis).contiguous(), points


def _planted_model(axis: int, d: int, group_size: int | None, seed: int) -> tuple[nn.Sequential, dict, dict]:
    """Linear [8, 16] and Conv2d [8, 8, 2, 2] with 4 vectors planted along `axis` per group of
    `group_size` channels (None: one group); returns (model, weights, planted vectors [G, 4, d])."""
    torch.manual_seed(seed)
    model = _model(fc=nn.Linear(16, 8), conv=nn.Conv2d(8, 8, 2))
    weights, planted = {}, {}
    for i, (name, module) in enumerate(model.named_children()):
        shape = tuple(module.weight.shape)
        weights[name], planted[name] = _planted(shape, axis, d, group_size or shape[axis], 4, seed=seed + i)
        with torch.no_grad():
            module.weight.copy_(weights[name])
    return model, weights, planted


def _vector_config(d: int, axis: int, group_size: int | None) -> dict:
    config = {"n_bits": 2, "granularity": "per_tensor", "channel_axis": axis, "cluster_dim": d}
    if group_size is not None:
        config.update(granularity="per_grouped_channel", group_size=group_size)
    return {"global_config": config}


@pytest.mark.parametrize("group_size", [None, 4], ids=["per_tensor", "per_grouped_channel"])
@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
@pytest.mark.parametrize("d", [2, 4], ids=["cluster_dim2", "cluster_dim4"])
def test_vector_luts_recover_vectors_planted_along_the_channel_axis(d, axis, group_size):
    model, weights, planted = _planted_model(axis, d, group_size, seed=10 * d + axis)
    config = _vector_config(d, axis, group_size)
    ours_model, ours, palettizer = run_ours(model, config)
    theirs_model, theirs = run_theirs(model, config)
    assert set(ours) == set(theirs) == {"fc", "conv"}
    for name, lut in theirs.items():
        shape = tuple(weights[name].shape)
        groups = shape[axis] // (group_size or shape[axis])
        mapped = _as_our_layout(lut, shape, axis)
        assert tuple(ours[name].shape) == tuple(mapped.shape) == (groups, 4, d), name
        assert palettizer.compressed[name].vector_axis == axis
        assert int(dict(theirs_model.get_submodule(name).named_buffers(recurse=False))["_COREML_/weight/vector_axis"]) == axis
        assert _sorted_rows(ours[name]) == _sorted_rows(mapped) == _sorted_rows(planted[name]), name
        assert torch.equal(palettizer.compressed[name].decode(), weights[name]), name
        assert torch.equal(ours_model.get_submodule(name).weight, weights[name]), name
        assert torch.equal(theirs_model.get_submodule(name).weight, weights[name]), name


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
@pytest.mark.parametrize("d", [2, 4], ids=["cluster_dim2", "cluster_dim4"])
def test_vectors_planted_along_the_other_axis_are_not_recovered_by_either_tool(d, axis):
    """The same kind of weight with its vectors across the channel axis: both tools lose information,
    so the vector axis really is channel_axis in both."""
    model, weights, _ = _planted_model(1 - axis, d, None, seed=10 * d + axis)
    config = _vector_config(d, axis, None)
    ours_model, ours, _ = run_ours(model, config)
    theirs_model, theirs = run_theirs(model, config)
    assert set(ours) == set(theirs) == {"fc", "conv"}
    for name, weight in weights.items():
        assert float((ours_model.get_submodule(name).weight.detach() - weight).abs().max()) > 0.1, name
        assert float((theirs_model.get_submodule(name).weight.detach() - weight).abs().max()) > 0.1, name


def test_cluster_dim_not_dividing_the_channels_core_ml_tools_skips_llmpalette_refuses(quiet_coremltools, caplog):
    """Deliberate difference: Core ML Tools warns and leaves the layer alone; llmpalette raises, naming it."""
    torch.manual_seed(2)
    model = _model(fc=nn.Linear(16, 8), odd=nn.Linear(16, 6))
    config = {"global_config": {"n_bits": 2, "cluster_dim": 4}}
    before = _weights(model)
    quiet_coremltools.addHandler(caplog.handler)
    try:
        theirs_model, theirs = run_theirs(model, config)
    finally:
        quiet_coremltools.removeHandler(caplog.handler)
    assert set(theirs) == {"fc"}
    assert torch.equal(theirs_model.odd.weight, before["odd"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("odd.weight" in w and "cluster_dim=4" in w for w in warnings), warnings
    with pytest.raises(ConfigError) as err:
        run_ours(model, config)
    assert err.value.field == "global_config.cluster_dim"
    assert "layer 'odd'" in str(err.value) and "does not divide the 6 channels along axis 0" in str(err.value)


# -- scalar LUTs: both exact 1-D k-means, so the same LUTs and weights -----------------------------
@pytest.mark.parametrize(
    "global_config",
    [
        {"n_bits": 2},
        {"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 4},
        {"n_bits": 2, "granularity": "per_grouped_channel", "group_size": 2, "channel_axis": 1},
    ],
    ids=["per_tensor", "grouped-axis0", "grouped-axis1"],
)
def test_scalar_luts_same_shape_and_values(global_config):
    torch.manual_seed(3)
    model = _model(fc=nn.Linear(8, 12), conv=nn.Conv2d(4, 8, 3), emb=nn.Embedding(12, 8))
    config = {"global_config": global_config}
    ours_model, ours, _ = run_ours(model, config)
    theirs_model, theirs = run_theirs(model, config)
    assert set(ours) == set(theirs) == {"fc", "conv", "emb"}
    axis = global_config.get("channel_axis", 0)
    for name, lut in theirs.items():
        mapped = _as_our_layout(lut, tuple(model.get_submodule(name).weight.shape), axis)
        assert mapped.shape == ours[name].shape, name
        torch.testing.assert_close(mapped.sort(dim=1).values, ours[name].sort(dim=1).values, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours_model.get_submodule(name).weight, theirs_model.get_submodule(name).weight, rtol=0, atol=1e-6)


# -- 3. no default weight threshold; what is left alone is said ------------------------------------
def _tiny_and_big() -> nn.Sequential:
    torch.manual_seed(4)
    return _model(fc=nn.Linear(4, 4), proj=nn.Linear(16, 32))  # fc: 16 weights


def test_default_configs_compress_every_supported_layer_however_small():
    model = _tiny_and_big()
    _, ours, palettizer = run_ours(model, None)
    _, theirs = run_theirs(model, None, exact=False)
    assert set(ours) == set(theirs) == {"fc", "proj"}
    for name, lut in theirs.items():
        assert tuple(_as_our_layout(lut, tuple(model.get_submodule(name).weight.shape), 0).shape) == tuple(ours[name].shape) == (1, 16, 1)
    assert palettizer.plan(model).skipped == []


def test_left_alone_modules_are_listed_and_logged(caplog):
    model = _tiny_and_big()
    config = {"global_config": {"n_bits": 2}, "module_name_configs": {"fc": None}}
    with caplog.at_level(logging.INFO, logger="llmpalette"):
        _, ours, palettizer = run_ours(model, config)
    _, theirs = run_theirs(model, config)
    assert set(ours) == set(theirs) == {"proj"}
    [skipped] = palettizer.plan(model).skipped
    assert skipped.names == ("fc",) and "config null" in skipped.reason
    assert any("fc" in r.getMessage() and "config null" in r.getMessage() for r in caplog.records if r.name == "llmpalette")


def test_weight_threshold_is_named_when_it_leaves_a_module_alone(caplog):
    """weight_threshold is llmpalette's own field (Core ML Tools' PostTrainingPalettizer has none)."""
    model = _tiny_and_big()
    config = OurCfg.from_dict({"global_config": {"n_bits": 2, "weight_threshold": 16}})
    palettizer = OurPalettizer(model, config)
    with caplog.at_level(logging.INFO, logger="llmpalette"):
        palettizer.compress()
    assert set(palettizer.compressed) == {"proj"}
    [skipped] = palettizer.plan(model).skipped
    assert skipped.names == ("fc",) and "weight_threshold 16" in skipped.reason
    assert any("fc" in r.getMessage() and "weight_threshold 16" in r.getMessage() for r in caplog.records if r.name == "llmpalette")


# -- 4. compress(num_kmeans_workers=1, inplace=False) ----------------------------------------------
def _palettizer(tool: str, model: nn.Module, config: dict):
    if tool == "ours":
        return OurPalettizer(model, OurCfg.from_dict(config))
    return ct.PostTrainingPalettizer(model, ct.PostTrainingPalettizerConfig.from_dict(config))


def test_compress_signature_and_positional_arguments():
    ours_params = inspect.signature(OurPalettizer.compress).parameters
    theirs_params = inspect.signature(ct.PostTrainingPalettizer.compress).parameters
    assert list(ours_params) == list(theirs_params) == ["self", "num_kmeans_workers", "inplace"]
    assert ours_params["inplace"].default is theirs_params["inplace"].default is False
    assert theirs_params["num_kmeans_workers"].default == 1
    assert ours_params["num_kmeans_workers"].default in (None, 1)  # ours may default to every core
    config = {"global_config": {"n_bits": 2}}
    torch.manual_seed(5)
    # The first positional is the worker count, not `inplace`: a truthy one leaves the model alone.
    # (Core ML Tools runs with 1: any count above 1 spawns worker processes, ~15 s here.)
    for tool, workers in (("ours", 2), ("theirs", 1)):
        model = _model(fc=nn.Linear(8, 8))
        before = model.fc.weight.detach().clone()
        out = _palettizer(tool, model, config).compress(workers)
        assert out is not model and torch.equal(model.fc.weight, before), tool
        assert out.fc.weight.unique().numel() <= 4, tool
    for tool in ("ours", "theirs"):
        model = _model(fc=nn.Linear(8, 8))
        out = _palettizer(tool, model, config).compress(1, True)
        assert out is model and model.fc.weight.unique().numel() <= 4, tool


# -- 5. one type under its class and its name -------------------------------------------------------
@pytest.mark.parametrize("class_first", [True, False])
def test_set_module_type_class_key_beats_name_key(class_first):
    torch.manual_seed(6)
    model = _model(fc=nn.Linear(8, 8))
    by_name, by_class = {"n_bits": 1}, {"n_bits": 3}
    ours_cfg, theirs_cfg = OurCfg(), ct.PostTrainingPalettizerConfig()
    for cfg, module_cfg in ((ours_cfg, OurModuleCfg), (theirs_cfg, ct.ModulePostTrainingPalettizerConfig)):
        keyed = [(nn.Linear, module_cfg(**by_class)), ("Linear", module_cfg(**by_name))]
        for key, value in keyed if class_first else keyed[::-1]:
            cfg.set_module_type(key, value)
    ours = OurPalettizer(model, ours_cfg)
    ours.compress()
    theirs = coreml_luts(ct.PostTrainingPalettizer(model, theirs_cfg).compress())
    assert ours.compressed["fc"].lut.shape[1] == theirs["fc"].shape[-2] == 8


@pytest.mark.parametrize("class_first", [True, False])
def test_class_and_name_keys_with_different_configs_in_one_dict(class_first):
    """Deliberate difference: llmpalette refuses the ambiguous dict; Core ML Tools folds the name into
    the class and keeps whichever entry comes later."""
    torch.manual_seed(6)
    model = _model(fc=nn.Linear(8, 8))
    entries = [(nn.Linear, {"n_bits": 3}), ("Linear", {"n_bits": 1})]
    if not class_first:
        entries.reverse()
    type_configs = dict(entries)
    with pytest.raises(ConfigError) as err:
        OurCfg.from_dict({"module_type_configs": type_configs})
    assert err.value.field == "module_type_configs.Linear" and "differently" in str(err.value)
    with pytest.raises(ConfigError):
        OurCfg(module_type_configs={k: OurModuleCfg(**v) for k, v in type_configs.items()})
    later_bits = entries[-1][1]["n_bits"]
    from_dict = ct.PostTrainingPalettizerConfig.from_dict({"module_type_configs": type_configs})
    built = ct.PostTrainingPalettizerConfig(
        module_type_configs={k: ct.ModulePostTrainingPalettizerConfig(**v) for k, v in type_configs.items()}
    )
    for theirs_cfg in (from_dict, built):
        assert list(theirs_cfg.module_type_configs) == [nn.Linear]
        lut = coreml_luts(ct.PostTrainingPalettizer(model, theirs_cfg).compress())["fc"]
        assert lut.shape[-2] == 2**later_bits


# -- 6. type keys that name no supported type --------------------------------------------------------
@pytest.mark.parametrize("key", ["Linaer", "MultiheadAttention", "LayerNorm"])
def test_unsupported_type_key_is_refused_naming_it_and_the_supported_types(key):
    torch.manual_seed(7)
    model = _model(fc=nn.Linear(8, 8), norm=nn.LayerNorm(8))
    with pytest.raises(ConfigError) as err:
        run_ours(model, {"module_type_configs": {key: {"n_bits": 2}}})
    assert err.value.field == f"module_type_configs.{key}"
    assert f"'{key}' names no supported module type" in str(err.value)
    assert "supported: Linear, Embedding, Conv1d, Conv2d, Conv3d" in str(err.value)


def test_core_ml_tools_silently_compresses_nothing_for_a_misspelled_type():
    torch.manual_seed(7)
    model = _model(fc=nn.Linear(8, 8))
    before = _weights(model)
    out, theirs = run_theirs(model, {"module_type_configs": {"Linaer": {"n_bits": 2}}})
    assert theirs == {}
    assert torch.equal(out.fc.weight, before["fc"])


# -- field compatibility of the per-module configs -------------------------------------------------
def test_every_core_ml_tools_field_is_ours_or_rejected_with_a_reason():
    theirs = [f.name for f in attrs.fields(ct.ModulePostTrainingPalettizerConfig)]
    ours = {f.name for f in dataclasses.fields(OurModuleCfg)}
    rejected = OurModuleCfg._rejected_fields
    assert all(name in ours or name in rejected for name in theirs), [n for n in theirs if n not in ours and n not in rejected]
    compress_args = inspect.signature(ct.PostTrainingPalettizer.compress).parameters
    for name in rejected:  # a Core ML Tools config field, or its compress() argument pasted into a config
        assert name in theirs or name in compress_args, name
        with pytest.raises(ConfigError) as err:
            OurModuleCfg.from_dict({name: 1})
        assert err.value.field == name and err.value.message == rejected[name]
    defaults = {k: getattr(v, "value", v) for k, v in ct.ModulePostTrainingPalettizerConfig().as_dict().items() if k not in rejected}
    assert OurModuleCfg.from_dict(defaults) == OurModuleCfg()
    model_fields = [f.name for f in attrs.fields(ct.PostTrainingPalettizerConfig)]
    assert model_fields == [f.name for f in dataclasses.fields(OurCfg)]
