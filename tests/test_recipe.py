"""Recipes: errors name the file and the field; overrides; the hash that guards resume."""
import pytest

from llmpalette.errors import ConfigError
from llmpalette.recipe import Recipe

GOOD = """
model: default
data: {text: default, samples: 0, seq_len: 512}
stages:
  - algorithm: kmeans
    config:
      global_config: {n_bits: 4, granularity: per_grouped_channel, group_size: 16}
      module_name_configs: {lm_head: null, model.embed_tokens: null}
evaluate: {windows: 16, seq_len: 512}
"""


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_good_recipe(tmp_path):
    r = Recipe.from_yaml(write(tmp_path, GOOD))
    assert r.model == "default" and r.data.seq_len == 512 and r.evaluate.windows == 16
    cfg = r.stages[0].config
    assert cfg.global_config.group_size == 16 and cfg.module_name_configs == {"lm_head": None, "model.embed_tokens": None}
    assert Recipe.from_dict(r.as_dict()).sha256 == r.sha256


@pytest.mark.parametrize(
    "old, new, field",
    [
        ("group_size: 16}", "group_size: -16}", "stages[0].config.global_config.group_size"),
        ("group_size: 16}", "group_size: sixteen}", "stages[0].config.global_config.group_size"),
        ("n_bits: 4", "n_bits: 9", "stages[0].config.global_config.n_bits"),
        ("algorithm: kmeans", "algorithm: kmeens", "stages[0].algorithm"),
        ("seq_len: 512}\nstages", "seq_len: 1}\nstages", "data.seq_len"),
        ("windows: 16", "windws: 16", "evaluate.windws"),
        ("model: default", "model: default\nmodle: x", "modle"),
        ("samples: 0", "samples: lots", "data.samples"),
        ("{lm_head: null", "{lm_head: {n_bits: 0}", "stages[0].config.module_name_configs.lm_head.n_bits"),
    ],
)
def test_bad_recipe_names_file_and_field(tmp_path, old, new, field):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        Recipe.from_yaml(path)
    assert err.value.field == field
    assert str(err.value).startswith(f"{path}: {field}: ")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        Recipe.from_yaml(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        Recipe.from_yaml(write(tmp_path, "stages: [\n"))
    with pytest.raises(ConfigError, match="stages"):
        Recipe.from_yaml(write(tmp_path, "model: default\n"))


def test_overrides_keep_the_hash_of_what_compresses(tmp_path):
    """Where the model lies, the evaluation text (kmeans reads no text) and the tokenizer do not change
    the compressed bytes, so they do not change the hash; the job's model fingerprint guards the model."""
    r = Recipe.from_yaml(write(tmp_path, GOOD))
    o = r.with_overrides(model="/some/folder", text="notes.txt", tokenizer="/tok")
    assert (o.model, o.data.text, o.tokenizer) == ("/some/folder", "notes.txt", "/tok")
    assert o.sha256 == r.sha256 and o.differences(r) == []
    assert r.with_overrides().sha256 == r.sha256


def test_reformatted_recipe_has_the_same_hash(tmp_path):
    r = Recipe.from_yaml(write(tmp_path, GOOD))
    same = """# the same job, written differently
evaluate: {seq_len: 512, windows: 8}      # evaluation settings are not the compression
stages:
  - config:
      module_name_configs: {model.embed_tokens: null, lm_head: null}
      global_config: {group_size: 16, granularity: per_grouped_channel, lut_dtype: fp32, n_bits: 4, channel_axis: 0}
    algorithm: kmeans
model: /elsewhere/SmolLM2.gguf
"""
    assert Recipe.from_yaml(write(tmp_path, same)).sha256 == r.sha256


def test_a_real_change_names_the_field_and_both_values(tmp_path):
    r = Recipe.from_yaml(write(tmp_path, GOOD))
    changed = Recipe.from_yaml(write(tmp_path, GOOD.replace("n_bits: 4", "n_bits: 3").replace("group_size: 16", "group_size: 8")))
    assert changed.sha256 != r.sha256
    assert changed.differences(r) == [
        "stages[0].config.global_config.n_bits: 4 -> 3",
        "stages[0].config.global_config.group_size: 16 -> 8",
    ]
    seeded = Recipe.from_yaml(write(tmp_path, GOOD + "seed: 7\n"))
    assert seeded.differences(r) == ["seed: 0 -> 7"]


def test_shipped_recipes_parse():
    from pathlib import Path

    paths = sorted(Path(__file__).resolve().parents[1].glob("recipes/*.yaml"))
    assert len(paths) >= 4
    bits = set()
    for p in paths:
        r = Recipe.from_yaml(str(p))
        g = r.stages[0].config.global_config
        if hasattr(g, "weight_dtype"):
            bits.add((r.stages[0].algorithm, g.weight_dtype, g.granularity))
        elif r.stages[0].algorithm == "gptq":
            bits.add((g.algorithm, g.n_bits, g.granularity, g.group_size))
        else:
            bits.add((g.n_bits, g.granularity, g.group_size))
    assert {(4, "per_grouped_channel", 16), (3, "per_grouped_channel", 16), (2, "per_grouped_channel", 16), (8, "per_channel", None)} <= bits
    assert {("rtn", "int8", "per_channel"), ("rtn", "int4", "per_channel")} <= bits
    assert {("gptq", "int4", "per_channel"), ("gptq", "int3", "per_block"), ("lut_gptq", 4, "per_grouped_channel", 16)} <= bits
