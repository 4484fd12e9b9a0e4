"""A job that never traps its user: checks before the long work, nothing left behind on a failed
start, resume that compares what matters, repairs that are named, one layer-file reader."""
import logging
import shutil

import pytest
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import llmpalette
from llmpalette.errors import ConfigError, JobError, SourceError
from llmpalette.jobs import Manifest, run_job
from llmpalette.layout import PalettizedWeight, read_layer_file
from llmpalette.recipe import Recipe
from tests.conftest import TINY_RECIPE, tiny_llama


def recipe_for(model, bits=3, **changes) -> Recipe:
    raw = yaml.safe_load(TINY_RECIPE.format(model=model, bits=bits))
    raw.update(changes)
    return Recipe.from_dict(raw)


@pytest.fixture(scope="module")
def weights_only_dir(tmp_path_factory):
    """A fine-tuned checkpoint as often saved: config and weights, no tokenizer."""
    folder = tmp_path_factory.mktemp("weights-only")
    tiny_llama(seed=1).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("change, words", [
    ({"group_size": 24}, "layer 'model.layers.0.self_attn.q_proj': group_size 24 does not divide its 64 channels"),
    ({"cluster_dim": 3}, "cluster_dim 3 does not divide the 8 channels"),
])
def test_a_config_the_model_cannot_take_leaves_no_job_dir(tmp_path, tiny_llama_dir, change, words):
    raw = yaml.safe_load(TINY_RECIPE.format(model=tiny_llama_dir, bits=3))
    raw["stages"][0]["config"]["global_config"].update(change)
    job = tmp_path / "job"
    with pytest.raises(ConfigError) as err:
        run_job(Recipe.from_dict(raw, source="r.yaml"), job, progress=False)
    assert words in str(err.value) and str(err.value).startswith("r.yaml: stages[0].config.")
    assert not job.exists()


def test_a_misspelt_module_name_leaves_no_job_dir(tmp_path, tiny_llama_dir):
    raw = yaml.safe_load(TINY_RECIPE.format(model=tiny_llama_dir, bits=3))
    raw["stages"][0]["config"]["module_name_configs"]["lm_hed"] = None
    with pytest.raises(ConfigError, match="module_name_configs.lm_hed: matches no module"):
        run_job(Recipe.from_dict(raw), tmp_path / "job", progress=False)
    assert not (tmp_path / "job").exists()


def test_a_missing_text_file_is_found_before_any_work(tmp_path, tiny_llama_dir, monkeypatch):
    import llmpalette.jobs.runner as runner

    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the text was checked"))
    recipe = recipe_for(tiny_llama_dir).with_overrides(text=str(tmp_path / "missing.txt"))
    with pytest.raises(SourceError, match="missing.txt"):
        run_job(recipe, tmp_path / "job", progress=False)
    assert not (tmp_path / "job").exists()
    monkeypatch.undo()
    assert run_job(recipe, tmp_path / "job", progress=False, evaluate=False).computed == 14  # --no-eval needs no text


def test_a_failed_start_can_simply_be_retried(tmp_path, tiny_llama_dir):
    raw = yaml.safe_load(TINY_RECIPE.format(model=tiny_llama_dir, bits=3))
    raw["stages"][0]["config"]["global_config"]["group_size"] = 24
    with pytest.raises(ConfigError):
        run_job(Recipe.from_dict(raw), tmp_path / "job", progress=False)
    assert run_job(recipe_for(tiny_llama_dir), tmp_path / "job", progress=False).computed == 14


def test_weights_only_folder_compresses_without_a_tokenizer(tmp_path, weights_only_dir):
    job = tmp_path / "job"
    summary = run_job(recipe_for(weights_only_dir), job, progress=False)
    assert summary.computed == 14 and summary.loaded is None  # read lazily: no loaded model to hand back
    assert not (job / "tokenizer").exists()
    model, tokenizer = llmpalette.load(job)
    assert tokenizer is None and model.model.layers[0].mlp.up_proj.weight.shape == (128, 64)


def test_the_tokenizer_is_kept_in_the_job(tmp_path, weights_only_dir, tiny_llama_dir):
    job = tmp_path / "job"
    run_job(recipe_for(weights_only_dir).with_overrides(tokenizer=str(tiny_llama_dir)), job, progress=False)
    assert (job / "tokenizer" / "tokenizer.json").is_file()
    _, tokenizer = llmpalette.load(job)
    assert tokenizer is not None and tokenizer.eos_token == "<eos>"


def test_a_stage_that_reads_text_refuses_without_a_tokenizer(tmp_path, weights_only_dir):
    recipe = recipe_for(weights_only_dir)
    raw = recipe.as_dict()
    raw["stages"][0]["algorithm"] = "skm"
    with pytest.raises(JobError, match="has no tokenizer; pass --tokenizer"):
        run_job(Recipe.from_dict(raw), tmp_path / "job", progress=False)
    assert not (tmp_path / "job").exists()


def test_resume_with_the_model_elsewhere_and_a_reformatted_recipe(tmp_path, tiny_llama_dir):
    job = tmp_path / "job"
    run_job(recipe_for(tiny_llama_dir), job, progress=False)
    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_llama_dir, moved)
    raw = yaml.safe_load(TINY_RECIPE.format(model=moved, bits=3))
    raw["stages"][0]["config"]["global_config"] = {"weight_threshold": 0, "group_size": 8, "n_bits": 3,
                                                  "granularity": "per_grouped_channel", "lut_dtype": "fp32"}
    raw["evaluate"]["windows"] = 2
    again = run_job(Recipe.from_dict(raw), job, resume=True, progress=False)
    assert (again.computed, again.kept) == (0, 14)
    stored = Manifest.load(job).data
    assert stored["recipe"]["model"] == str(moved) and stored["recipe"]["evaluate"]["windows"] == 2


def test_resume_names_each_repair(tmp_path, tiny_llama_dir, caplog):
    job = tmp_path / "job"
    run_job(recipe_for(tiny_llama_dir), job, progress=False)
    victim = job / "layers" / "model.layers.1.mlp.gate_proj.safetensors"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    with caplog.at_level(logging.INFO, logger="llmpalette"):
        summary = run_job(recipe_for(tiny_llama_dir), job, resume=True, progress=False)
    assert summary.redone == (("model.layers.1.mlp.gate_proj", "layers/model.layers.1.mlp.gate_proj.safetensors is corrupt (sha256 mismatch)"),)
    assert "redone model.layers.1.mlp.gate_proj: layers/model.layers.1.mlp.gate_proj.safetensors is corrupt" in caplog.text


def test_left_alone_modules_are_logged(tmp_path, tiny_llama_dir, caplog):
    with caplog.at_level(logging.INFO, logger="llmpalette"):
        run_job(recipe_for(tiny_llama_dir), tmp_path / "job", progress=False)
    assert "left alone: model.embed_tokens = lm_head (Embedding): config null (module_name_configs['model.embed_tokens'])" in caplog.text
    assert "LlamaRMSNorm module(s): a type this algorithm does not compress" in caplog.text


def test_a_layer_file_from_a_real_job_reads_as_the_readme_says(tmp_path, tiny_llama_dir):
    job = tmp_path / "job"
    run_job(recipe_for(tiny_llama_dir), job, progress=False)
    path = job / "layers" / "model.layers.0.mlp.down_proj.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert list(metadata) == ["weight.__palettized__"]
    plain = PalettizedWeight.from_tensors(load_file(str(path)), metadata, "weight")
    layer = read_layer_file(path)
    assert layer.weight == plain and (layer.module, layer.param, layer.aliases) == ("model.layers.0.mlp.down_proj", "weight", ())
    model = llmpalette.from_pretrained(job)
    assert (model.model.layers[0].mlp.down_proj.weight == plain.decode()).all()
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_layer_file(path)


def test_a_folder_with_other_files_is_not_taken_for_a_job(tmp_path, tiny_llama_dir):
    with pytest.raises(JobError, match="holds other files .*config.json.* and no job"):
        run_job(recipe_for(tiny_llama_dir), tiny_llama_dir, progress=False)
    assert not (tiny_llama_dir / "manifest.json").exists()
