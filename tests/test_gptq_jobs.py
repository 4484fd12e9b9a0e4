"""GPTQ jobs (`algorithm: gptq`): the files are what `LayerwiseCompressor` computes from the same
calibration windows; 2 gloo ranks write the 1-rank bytes; kill -9 between blocks then --resume gives
the same bytes; a damaged layer file redoes its block and the ones after; LUT-GPTQ writes the palettized
kind; bad settings fail before any work, naming the field."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmpalette
from llmpalette.errors import ConfigError
from llmpalette.evaluate.report import build_report, format_report
from llmpalette.jobs import Manifest, run_job
from llmpalette.layout import PalettizedWeight, QuantizedWeight, read_layer_file
from llmpalette.quantization.layerwise_compressor import LayerwiseCompressor, LayerwiseCompressorConfig
from llmpalette.recipe import Recipe
from llmpalette.sources.models import load_model
from llmpalette.sources.text import calibration_windows
from tests.conftest import REPO, byte_tokenizer, tiny_llama
from tests.test_jobs import layer_bytes
from tests.test_skm_jobs import ENV, compress, kill_when

INT4 = {"algorithm": "gptq", "weight_dtype": "int4", "granularity": "per_channel", "use_activation_order_heuristic": True}
INT3_BLOCK = {"algorithm": "gptq", "weight_dtype": "int3", "granularity": "per_block", "block_size": 16}
LUT = {"algorithm": "lut_gptq", "n_bits": 3, "granularity": "per_grouped_channel", "group_size": 8}


def write_recipe(tmp_path: Path, model, global_config=INT4, *, samples=5, shard=1, seq_len=64, extra=None) -> Path:
    config = {"global_config": global_config, "calibration_nsamples": samples, "calibration_shard_size": shard, **(extra or {})}
    recipe = {"model": str(model), "data": {"text": "default", "seq_len": seq_len},
              "stages": [{"algorithm": "gptq", "config": config}], "evaluate": {"windows": 0}}
    path = tmp_path / "gptq.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


@pytest.mark.parametrize("global_config", [INT4, INT3_BLOCK, LUT], ids=["int4", "int3-block16", "lut3-g8"])
def test_a_gptq_job_writes_what_the_layerwise_compressor_computes(tmp_path, tiny_llama_dir, global_config):
    recipe = Recipe.from_yaml(str(write_recipe(tmp_path, tiny_llama_dir, global_config)))
    summary = run_job(recipe, tmp_path / "job", progress=False, evaluate=False)
    assert (summary.units, summary.computed, summary.kept) == (14, 14, 0)  # 7 Linear per block; embedding/lm_head left alone
    model, tokenizer = load_model(str(tiny_llama_dir))
    windows = [w for _, w in calibration_windows(tokenizer, "default", seq_len=64, count=5)]
    compressor = LayerwiseCompressor(model, LayerwiseCompressorConfig.from_dict(recipe.stages[0].raw_config))
    compressed = compressor.compress(windows, device="cpu")
    kind = PalettizedWeight if global_config is LUT else QuantizedWeight
    files = sorted((tmp_path / "job" / "layers").glob("*.safetensors"))
    assert len(files) == 14
    for file in files:
        layer = read_layer_file(file)
        assert isinstance(layer.weight, kind)
        assert torch.equal(layer.weight.decode(), compressor.compressed[layer.module].decode()), layer.module
        assert torch.equal(compressed.get_submodule(layer.module).weight, layer.weight.decode()), layer.module
    loaded = llmpalette.from_pretrained(str(tmp_path / "job"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), compressed.state_dict().values()))
    units = Manifest.load(tmp_path / "job").units(0)
    assert all(0 < u["metrics"]["output_rel_error"] < u["metrics"].get("kmeans_output_rel_error", 1) for u in units.values())
    report = build_report(tmp_path / "job", progress=False)
    assert {row["n_bits"] for row in report["layers"]} == {3 if global_config is not INT4 else 4}
    assert " output rel. error |" in format_report(report) and "Fallbacks" not in format_report(report)
    assert (" k-means start output rel. error |" in format_report(report)) == (global_config is LUT)
    assert report["passes_seconds"] > 0  # the block forwards and Hessians are counted, not only each layer's maths
    assert "calibration passes" in format_report(report)


def test_two_ranks_write_the_one_rank_bytes_whatever_the_thread_count(tmp_path, monkeypatch):
    model_dir = tmp_path / "model"  # wide enough for torch to split its matmuls across threads
    tiny_llama(seed=3, hidden=256, layers=2).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    recipe = write_recipe(tmp_path, model_dir, samples=5, shard=2)
    monkeypatch.setitem(ENV, "OMP_NUM_THREADS", "2")  # the 1-process job with 2 threads; torchrun gives each rank 1
    compress(recipe, tmp_path / "one")
    monkeypatch.setitem(ENV, "OMP_NUM_THREADS", "1")
    compress(recipe, tmp_path / "two", ranks=2)
    assert layer_bytes(tmp_path / "two") == layer_bytes(tmp_path / "one") and len(layer_bytes(tmp_path / "one")) == 14
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["world_size"] == 2


def test_sigkill_between_blocks_then_resume_is_byte_identical(tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama(seed=5, hidden=128, layers=6).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    recipe = write_recipe(tmp_path, model_dir, LUT, samples=24, seq_len=128)
    compress(recipe, tmp_path / "reference")

    job = tmp_path / "job"
    cmd = [sys.executable, "-m", "llmpalette", "compress", str(recipe), "--job-dir", str(job), "--no-eval"]
    done = kill_when(cmd, job, lambda stage: len(stage["units"]), 7)  # 7: the first block is recorded
    assert 7 <= done < 42
    resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at block" in resumed.stderr
    assert layer_bytes(job) == layer_bytes(tmp_path / "reference") and len(layer_bytes(job)) == 42


def test_a_damaged_layer_file_redoes_its_block_and_the_ones_after(tmp_path, tiny_llama_dir, caplog):
    recipe = Recipe.from_yaml(str(write_recipe(tmp_path, tiny_llama_dir, INT3_BLOCK, samples=3)))
    reference = tmp_path / "reference"
    run_job(recipe, reference, progress=False, evaluate=False)
    job = tmp_path / "job"
    import shutil

    shutil.copytree(reference, job)
    victim = job / "layers" / "model.layers.1.self_attn.o_proj.safetensors"
    victim.write_bytes(victim.read_bytes()[:-7])
    with caplog.at_level("INFO", logger="llmpalette"):
        summary = run_job(recipe, job, resume=True, progress=False, evaluate=False)
    assert (summary.kept, summary.computed) == (7, 7)
    assert [name for name, _ in summary.redone] == ["model.layers.1.self_attn.o_proj"]
    assert "resuming at block 1" in caplog.text and "sha256" in summary.redone[0][1]
    assert layer_bytes(job) == layer_bytes(reference)
    again = run_job(recipe, job, resume=True, progress=False, evaluate=False)
    assert (again.kept, again.computed) == (14, 0)


@pytest.mark.parametrize("config, field, words", [
    ({"global_config": {**INT3_BLOCK, "block_size": 48}}, "config.global_config.block_size", "does not divide"),
    ({"global_config": {**INT4, "weight_dtype": "int0"}}, "weight_dtype", ""),
    ({"global_config": {**INT4, "hessian_dampening": 1.5}}, "hessian_dampening", "[0, 1)"),
    ({"global_config": {**LUT, "cluster_dim": 2}}, "cluster_dim", "scalar"),
    ({"global_config": {**INT4, "algorithm": "sparse_gpt"}}, "algorithm", "available: gptq, lut_gptq"),
    ({"global_config": INT4, "layers": ["model\\.blocks\\.\\d+"]}, "layers[0]", "matches no module"),
    ({"global_config": INT4, "calibration_nsamples": 0}, "calibration_nsamples", ">= 1"),
])
def test_bad_settings_fail_before_any_work_naming_the_field(tmp_path, tiny_llama_dir, config, field, words):
    global_config = config.pop("global_config")
    path = write_recipe(tmp_path, tiny_llama_dir, global_config, extra=config)
    with pytest.raises(ConfigError) as error:
        run_job(Recipe.from_yaml(str(path)), tmp_path / "job", progress=False, evaluate=False)
    assert field in error.value.field and words in str(error.value) and str(path) in str(error.value)
    assert not (tmp_path / "job").exists()


def test_layers_choose_the_blocks_and_the_rest_is_left_alone(tmp_path, tiny_llama_dir, caplog):
    path = write_recipe(tmp_path, tiny_llama_dir, INT4, samples=2, extra={"layers": ["model\\.layers\\.1"]})
    with caplog.at_level("INFO", logger="llmpalette"):
        summary = run_job(Recipe.from_yaml(str(path)), tmp_path / "job", progress=False, evaluate=False)
    assert summary.units == 7
    assert sorted(p.stem for p in (tmp_path / "job" / "layers").iterdir())[0].startswith("model.layers.1.")
    assert "left alone: 7 modules" not in caplog.text and "model.layers.0.mlp.up_proj (Linear): outside the blocks" in caplog.text


def test_a_hessian_no_dampening_can_fix_falls_back_to_rounding():
    from llmpalette.quantization import ModuleGPTQConfig, rtn_quantize_weight
    from llmpalette.quantization.gptq import float16_exact
    from llmpalette.quantization.layerwise_compressor import compress_linear

    torch.manual_seed(0)
    weight = torch.randn(16, 32)
    config = ModuleGPTQConfig.from_dict({"weight_dtype": "int4", "clipping_search": False})  # RTN's own grid
    result = compress_linear(weight, torch.full((32, 32), float("nan")), config)  # e.g. activations that overflowed
    assert "identity Hessian" in result.metrics["fallback"]
    scale = float16_exact(rtn_quantize_weight(weight, config).scale)  # RTN's grid, float16 scales (as every GPTQ)
    nearest = torch.clamp(torch.round(weight / scale), -7, 7) * scale  # int4 symmetric: [-7, 7]
    assert torch.equal(result.weight.decode(), nearest)


def test_the_callers_model_is_not_modified_and_the_summary_does_not_keep_a_compressed_one(tmp_path, tiny_llama_dir):
    recipe = Recipe.from_yaml(str(write_recipe(tmp_path, tiny_llama_dir, INT4, samples=2)))
    model, tokenizer = load_model(str(tiny_llama_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = run_job(recipe, tmp_path / "given", progress=False, evaluate=False, loaded=(model, tokenizer))
    assert summary.loaded[0] is model and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert run_job(recipe, tmp_path / "own", progress=False, evaluate=False).loaded is None  # read lazily: nothing to reuse
    assert layer_bytes(tmp_path / "given") == layer_bytes(tmp_path / "own")


def test_a_window_longer_than_the_text_blames_the_data_not_the_count_and_the_job_recipe_hides_samples(tmp_path, tiny_llama_dir):
    path = write_recipe(tmp_path, tiny_llama_dir, INT4, samples=4, seq_len=10**7)
    with pytest.raises(ConfigError) as error:
        run_job(Recipe.from_yaml(str(path)), tmp_path / "job", progress=False, evaluate=False)
    assert error.value.field == "data" and "too short" in str(error.value)
    run_job(Recipe.from_yaml(str(write_recipe(tmp_path, tiny_llama_dir, INT4, samples=1))), tmp_path / "ok",
            progress=False, evaluate=False)
    assert "samples: 0" not in (tmp_path / "ok" / "recipe.yaml").read_text()


def test_the_api_takes_batches_and_fewer_samples_than_asked_with_a_warning(tiny_llama_dir, caplog):
    model, tokenizer = load_model(str(tiny_llama_dir))
    windows = torch.stack([w for _, w in calibration_windows(tokenizer, "default", seq_len=32, count=3)])
    config = LayerwiseCompressorConfig.from_dict({"global_config": INT4, "calibration_nsamples": 8})
    with caplog.at_level("WARNING", logger="llmpalette"):
        batched = LayerwiseCompressor(model, config).compress([windows[:2], windows[2:]])
    assert "gave 3 samples, fewer than calibration_nsamples=8" in caplog.text
    config3 = LayerwiseCompressorConfig.from_dict({"global_config": INT4, "calibration_nsamples": 3})
    one_by_one = LayerwiseCompressor(model, config3).compress(list(windows))
    assert all(torch.equal(a, b) for a, b in zip(batched.state_dict().values(), one_by_one.state_dict().values()))
    assert not torch.equal(batched.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
