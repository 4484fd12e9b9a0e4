"""Config mechanism: Core ML Tools-shaped dicts in, typed configs out, errors that name the field."""
import pytest
import torch
from torch import nn

from llmpalette.errors import ConfigError
from llmpalette.palettization import ModulePostTrainingPalettizerConfig as ModuleCfg
from llmpalette.palettization import PostTrainingPalettizerConfig as Cfg
from llmpalette.palettization.post_training import plan_units
from tests.conftest import tiny_llama


def test_defaults_match_core_ml_tools():
    """Every field both classes have defaults to the installed Core ML Tools' value."""
    ct = pytest.importorskip("coremltools.optimize.torch.palettization")
    theirs, ours = ct.ModulePostTrainingPalettizerConfig(), ModuleCfg()
    shared = {"n_bits", "granularity", "group_size", "channel_axis", "cluster_dim", "enable_per_channel_scale"}
    assert shared <= set(ours.as_dict())
    for field in sorted(shared):
        value = getattr(theirs, field)
        assert getattr(ours, field) == getattr(value, "value", value), field
    assert theirs.lut_dtype is None and ours.lut_dtype == "float32"   # None: an unquantized LUT in both
    assert ours.weight_threshold == 0  # Core ML Tools has no threshold: every supported layer is palettized
    assert Cfg().global_config == ModuleCfg()
    assert ct.PostTrainingPalettizerConfig().global_config == theirs


@pytest.mark.parametrize(
    "raw, field, words",
    [
        ({"global_config": {"n_bits": 9}}, "global_config.n_bits", "between 1 and 8"),
        ({"global_config": {"n_bits": 0}}, "global_config.n_bits", "between 1 and 8"),
        ({"global_config": {"n_bits": "4"}}, "global_config.n_bits", "integer"),
        ({"global_config": {"n_bits": True}}, "global_config.n_bits", "integer"),
        ({"global_config": {"granularity": "per_block"}}, "global_config.granularity", "per_grouped_channel"),
        ({"global_config": {"granularity": "per_grouped_channel"}}, "global_config.group_size", "required"),
        ({"global_config": {"granularity": "per_grouped_channel", "group_size": 0}}, "global_config.group_size", "positive"),
        ({"global_config": {"group_size": 4}}, "global_config.group_size", "per_grouped_channel"),
        ({"global_config": {"channel_axis": 2}}, "global_config.channel_axis", "0 or 1"),
        ({"global_config": {"cluster_dim": 2, "enable_per_channel_scale": True}}, "global_config.enable_per_channel_scale", "cluster_dim"),
        ({"global_config": {"lut_dtype": "int4"}}, "global_config.lut_dtype", "uint8"),
        ({"global_config": {"nbits": 4}}, "global_config.nbits", "unknown field of ModulePostTrainingPalettizerConfig; did you mean 'n_bits'?"),
        ({"global_config": {"zzz": 4}}, "global_config.zzz", "unknown field of ModulePostTrainingPalettizerConfig; known fields:"),
        ({"global_config": {"enable_fast_kmeans_mode": True}}, "global_config.enable_fast_kmeans_mode", "exact"),
        ({"module_name_configs": {"a": {"n_bits": 12}}}, "module_name_configs.a.n_bits", "between 1 and 8"),
        ({"module_type_configs": {"Linear": [{"n_bits": 2}, {"n_bits": 77}]}}, "module_type_configs.Linear[1].n_bits", "between"),
        ({"globl_config": {}}, "globl_config", "did you mean 'global_config'?"),
    ],
)
def test_bad_values_name_the_field(raw, field, words):
    with pytest.raises(ConfigError) as err:
        Cfg.from_dict(raw)
    assert err.value.field == field
    assert words in str(err.value)


def test_lut_dtype_spellings():
    for spelling in ("int8", "i8", torch.int8, "torch.int8"):
        assert ModuleCfg(lut_dtype=spelling).lut_dtype == "int8"
    for spelling in ("f16", "fp16", torch.float16):
        assert ModuleCfg(lut_dtype=spelling).lut_dtype == "float16"
    assert ModuleCfg(lut_dtype=None).lut_dtype == "float32"


def test_resolution_name_then_type_then_global():
    model = tiny_llama()
    cfg = Cfg.from_dict({
        "global_config": {"n_bits": 2},
        "module_type_configs": {"Linear": {"n_bits": 3}, "Embedding": None},
        "module_name_configs": {"model.layers.0.mlp.up_proj": {"n_bits": 5}, "model.layers.1.mlp.up_proj": None, "lm_head": None},
    })
    get = lambda n: cfg.get_module_config(n, model.get_submodule(n))
    assert get("model.layers.0.mlp.up_proj").n_bits == 5
    assert get("model.layers.1.mlp.up_proj") is None
    assert get("model.layers.0.self_attn.q_proj").n_bits == 3
    assert get("model.embed_tokens") is None
    assert get("model.norm").n_bits == 2  # global applies to any module; plan_units only visits supported ones


def test_type_keys_as_class_and_dotted_name():
    model = tiny_llama()
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    for key in (nn.Linear, "Linear", "torch.nn.Linear", "torch.nn.modules.linear.Linear"):
        cfg = Cfg(module_type_configs={key: ModuleCfg(n_bits=6)})
        assert cfg.get_module_config("x", q).n_bits == 6


def test_type_config_list_picks_by_weight_threshold():
    cfg = Cfg.from_dict({"module_type_configs": {"Linear": [
        {"n_bits": 4, "weight_threshold": 1000},
        {"n_bits": 2, "weight_threshold": 300},
    ]}})
    assert cfg.get_module_config("a", nn.Linear(40, 40)).n_bits == 4   # 1600 > 1000
    assert cfg.get_module_config("b", nn.Linear(20, 20)).n_bits == 2   # 400 > 300
    assert cfg.get_module_config("c", nn.Linear(10, 10)) is None       # 100: below both


def test_unknown_module_name_is_an_error():
    model = tiny_llama()
    cfg = Cfg.from_dict({"module_name_configs": {"lm_hed": None}})
    with pytest.raises(ConfigError, match="lm_hed: matches no module of the model"):
        plan_units(model, cfg)


def test_tied_weights_are_one_unit_and_must_agree():
    model = tiny_llama(tie=True)
    only_head = Cfg.from_dict({"global_config": {"weight_threshold": 0}, "module_name_configs": {"lm_head": None}})
    with pytest.raises(ConfigError) as err:
        plan_units(model, only_head)
    assert "model.embed_tokens" in str(err.value) and "lm_head" in str(err.value) and "tied" in str(err.value)
    both = Cfg.from_dict({"global_config": {"weight_threshold": 0}})
    units = {p.unit.name: p.unit for p in plan_units(model, both)}
    assert units["model.embed_tokens"].aliases == ("lm_head",)
    assert "lm_head" not in units


def test_from_yaml_path_stream_and_text(tmp_path):
    text = "global_config:\n  n_bits: 3\n  granularity: per_grouped_channel\n  group_size: 8\n"
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with open(path) as stream:
        configs = [Cfg.from_yaml(str(path)), Cfg.from_yaml(stream), Cfg.from_yaml(text)]
    assert all(c.global_config == ModuleCfg(n_bits=3, granularity="per_grouped_channel", group_size=8) for c in configs)
    assert Cfg.from_dict(configs[0].as_dict()).as_dict() == configs[0].as_dict()


def test_setters_mirror_core_ml_tools():
    cfg = Cfg().set_global(ModuleCfg(n_bits=2)).set_module_type(nn.Linear, None).set_module_name("x", ModuleCfg(n_bits=7))
    assert cfg.global_config.n_bits == 2 and cfg.module_type_configs[nn.Linear] is None and cfg.module_name_configs["x"].n_bits == 7
