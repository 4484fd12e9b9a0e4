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


def test_overrides_change_hash_and_differences(tmp_path):
    r = Recipe.from_yaml(write(tmp_path, GOOD))
    o = r.with_overrides(model="/some/folder", text="notes.txt")
    assert o.model == "/some/folder" and o.data.text == "notes.txt"
    assert o.sha256 != r.sha256
    assert o.differences(r) == ["model", "data"]
    assert r.with_overrides().sha256 == r.sha256


def test_shipped_recipes_parse():
    from pathlib import Path

    paths = sorted(Path(__file__).resolve().parents[1].glob("recipes/*.yaml"))
    assert len(paths) >= 4
    bits = set()
    for p in paths:
        r = Recipe.from_yaml(str(p))
        g = r.stages[0].config.global_config
        bits.add((g.n_bits, g.granularity, g.group_size))
    assert {(4, "per_grouped_channel", 16), (3, "per_grouped_channel", 16), (2, "per_grouped_channel", 16), (8, "per_channel", None)} <= bits
