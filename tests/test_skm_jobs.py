"""Sensitive K-Means jobs: 2 gloo ranks equal 1 rank, byte for byte (sensitivities and layers); kill -9
during the sensitivity step, then --resume, gives the same bytes; a damaged checkpoint is redone."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmpalette.errors import ConfigError
from llmpalette.jobs import Manifest, run_job
from llmpalette.recipe import Recipe
from tests.conftest import REPO, byte_tokenizer, tiny_llama
from tests.test_distributed import free_port
from tests.test_jobs import layer_bytes

SKM_RECIPE = """
model: {model}
data: {{text: default, seq_len: {seq_len}}}
stages:
  - algorithm: skm
    config:
      global_config: {{n_bits: 3, granularity: per_grouped_channel, group_size: 8, outlier_fraction: {outliers}}}
      module_name_configs: {{lm_head: null, model.embed_tokens: null}}
      calibration_nsamples: {samples}
      calibration_shard_size: {shard}
evaluate: {{windows: 0}}
"""
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def write_recipe(tmp_path: Path, model, *, samples=6, shard=1, seq_len=64, outliers=0.01) -> Path:
    path = tmp_path / "skm.yaml"
    path.write_text(SKM_RECIPE.format(model=model, samples=samples, shard=shard, seq_len=seq_len, outliers=outliers))
    return path


def stats_bytes(job: Path) -> dict[str, bytes]:
    record = json.loads((job / "manifest.json").read_text())["stages"][0]["stats"]
    return {rel: (job / rel).read_bytes() for rel in record["files"]}


def compress(recipe: Path, job: Path, *extra: str, ranks: int = 1, check=True) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                    str(ranks), "--master_port", str(free_port())]
    result = subprocess.run([*launcher, "-m", "llmpalette", "compress", str(recipe), "--job-dir", str(job), "--quiet", "--no-eval", *extra],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def kill_when(cmd: list[str], job: Path, progress, at: int) -> int:
    """Start `cmd` (a compress of `job`), SIGKILL it once `progress(stage 0 of the manifest) >= at`;
    returns the progress it was killed at. Fails if the job finished first."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done, deadline = 0, time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            done = progress(json.loads((job / "manifest.json").read_text())["stages"][0])
        except (FileNotFoundError, json.JSONDecodeError, IndexError, KeyError, TypeError):
            done = 0
        if done >= at:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed; make it slower"
    return done


def test_two_ranks_equal_one_rank_sensitivities_and_layers(tmp_path, tiny_llama_dir):
    recipe = write_recipe(tmp_path, tiny_llama_dir, samples=5, shard=1)
    compress(recipe, tmp_path / "one")
    two = compress(recipe, tmp_path / "two", ranks=2)
    assert "on 2 rank(s)" in two.stdout
    assert stats_bytes(tmp_path / "two") == stats_bytes(tmp_path / "one")
    assert layer_bytes(tmp_path / "two") == layer_bytes(tmp_path / "one")
    m1, m2 = (json.loads((tmp_path / j / "manifest.json").read_text()) for j in ("one", "two"))
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    s1, s2 = m1["stages"][0]["stats"], m2["stages"][0]["stats"]
    assert s1["files"] == s2["files"] and s1["samples"] == s2["samples"] == 5 and s1["shards_done"] == 5
    assert all(u["metrics"]["outliers"] > 0 and u["metrics"]["fisher_rel_sq_error"] >= 0 for u in m1["stages"][0]["units"].values())


def test_sensitivities_are_the_per_sample_fisher_sums(tmp_path, tiny_llama_dir):
    """The job's stored sensitivities equal sum_i (d loss_i / d W)^2 computed by a plain loop."""
    from llmpalette.sources.text import calibration_windows
    from transformers import AutoModelForCausalLM

    recipe = Recipe.from_yaml(str(write_recipe(tmp_path, tiny_llama_dir, samples=3, shard=2)))
    run_job(recipe, tmp_path / "job", progress=False, evaluate=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    weight = model.model.layers[1].mlp.down_proj.weight
    reference = torch.zeros_like(weight, dtype=torch.float64)
    for _, window in calibration_windows(byte_tokenizer(), "default", seq_len=64, count=3):
        ids = window.view(1, -1)
        (grad,) = torch.autograd.grad(model(input_ids=ids, labels=ids, use_cache=False).loss, weight)
        reference += grad.double().square()
    record = Manifest.load(tmp_path / "job").stats(0)
    stored = load_file(str(tmp_path / "job" / record["folder"] / "s00002" / "model.layers.1.mlp.down_proj.safetensors"))["fisher"]
    assert stored.dtype == torch.float32
    torch.testing.assert_close(stored.double(), reference, rtol=1e-4, atol=0)


def test_sigkill_during_sensitivities_then_resume_is_byte_identical(tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama(seed=5, hidden=128, layers=4).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    recipe = write_recipe(tmp_path, model_dir, samples=48, shard=2, seq_len=128)
    compress(recipe, tmp_path / "reference")

    job = tmp_path / "job"
    cmd = [sys.executable, "-m", "llmpalette", "compress", str(recipe), "--job-dir", str(job), "--no-eval"]
    done = kill_when(cmd, job, lambda stage: stage["stats"]["shards_done"], 2)
    assert 2 <= done < 24
    assert not (job / "layers").exists() or not any((job / "layers").iterdir())
    resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "sensitivities: resuming after" in resumed.stderr
    assert stats_bytes(job) == stats_bytes(tmp_path / "reference")
    assert layer_bytes(job) == layer_bytes(tmp_path / "reference")
    leftovers = [p for p in (job / "stats").rglob("*") if p.is_file() and str(p.relative_to(job)) not in stats_bytes(job)]
    assert leftovers == []


def test_a_damaged_sensitivity_checkpoint_is_redone_from_the_start(tmp_path, tiny_llama_dir, caplog):
    recipe = Recipe.from_yaml(str(write_recipe(tmp_path, tiny_llama_dir, samples=4, shard=2)))
    reference = tmp_path / "reference"
    run_job(recipe, reference, progress=False, evaluate=False)
    job = tmp_path / "job"
    shutil.copytree(reference, job)
    manifest = Manifest.load(job)
    victim = sorted(manifest.stats(0)["files"])[0]
    (job / victim).write_bytes(b"garbage")
    del manifest.data["stages"][0]["units"]["model.layers.0.mlp.up_proj"]
    manifest.set_stage_status(0, "running")
    manifest.save()
    with caplog.at_level("WARNING", logger="llmpalette"):
        summary = run_job(recipe, job, resume=True, progress=False, evaluate=False)
    assert "redone sensitivities from the first sample" in caplog.text and "corrupt" in caplog.text
    assert summary.computed == 1
    assert stats_bytes(job) == stats_bytes(reference)
    assert layer_bytes(job) == layer_bytes(reference)


def test_a_finished_job_does_not_redo_its_sensitivities(tmp_path, tiny_llama_dir, caplog):
    recipe = Recipe.from_yaml(str(write_recipe(tmp_path, tiny_llama_dir, samples=4, shard=2)))
    job = tmp_path / "job"
    run_job(recipe, job, progress=False, evaluate=False)
    before = layer_bytes(job)
    shutil.rmtree(job / "stats")
    with caplog.at_level("INFO", logger="llmpalette"):
        summary = run_job(recipe, job, resume=True, progress=False, evaluate=False)
    assert summary.computed == 0 and summary.kept == 14
    assert "every layer is done; its statistics are not needed" in caplog.text
    assert not (job / "stats").exists() and layer_bytes(job) == before


def test_too_little_calibration_text_is_refused_before_the_job_starts(tmp_path, tiny_llama_dir):
    text = tmp_path / "short.txt"
    text.write_text("A short text.\n\nIt has two paragraphs.\n")
    recipe = Recipe.from_yaml(str(write_recipe(tmp_path, tiny_llama_dir, samples=4))).with_overrides(text=str(text))
    with pytest.raises(ConfigError, match=r"skm.yaml: data: text .* is too short "
                                          "for 4 calibration windows of 64 tokens"):
        run_job(recipe, tmp_path / "job", progress=False, evaluate=False)
    assert not (tmp_path / "job").exists()


def test_recipe_fields_for_calibration(tmp_path, tiny_llama_dir):
    raw = __import__("yaml").safe_load(write_recipe(tmp_path, tiny_llama_dir).read_text())
    raw["data"]["samples"] = 16
    with pytest.raises(ConfigError, match="data.samples: the number of calibration samples is each stage's `calibration_nsamples`"):
        Recipe.from_dict(raw)
    raw["data"]["samples"] = 0
    raw["stages"][0]["config"]["calibration_nsamples"] = 0
    with pytest.raises(ConfigError, match=r"stages\[0\].config.calibration_nsamples: must be >= 1"):
        Recipe.from_dict(raw)
    raw["stages"][0]["config"]["calibration_nsamples"] = 8
    assert Recipe.from_dict(raw).needs_text
    changed = json.loads(json.dumps(raw))
    changed["stages"][0]["config"]["calibration_shard_size"] = 4
    assert Recipe.from_dict(changed).sha256 != Recipe.from_dict(raw).sha256


def test_the_report_shows_calibration_fisher_errors_and_outliers(tmp_path, tiny_llama_dir):
    from llmpalette.evaluate.report import build_report

    recipe = Recipe.from_yaml(str(write_recipe(tmp_path, tiny_llama_dir, samples=3, shard=2, outliers=0.02)))
    run_job(recipe, tmp_path / "job", progress=False, evaluate=False)
    report = build_report(tmp_path / "job", progress=False)
    calibration = report["stages"][0]["calibration"]
    assert calibration["samples"] == 3 and calibration["shard_size"] == 2 and calibration["seconds"] > 0
    layer = report["layers"][0]
    shape = layer["shape"]
    assert layer["outliers"] == int(0.02 * shape[0] * shape[1])
    assert 0 < layer["fisher_rel_sq_error"] and 0 < layer["rel_sq_error"]
    markdown = (tmp_path / "job" / "report.md").read_text()
    assert "sensitivities from 3 calibration samples" in markdown
    assert "Fisher-weighted rel. sq. error | outliers |" in markdown
    # outliers are in the size: int32 position + float16 value each, beyond LUT and indices
    record = Manifest.load(tmp_path / "job").units(0)[layer["name"]]
    from llmpalette.jobs.runner import read_unit
    weight = read_unit(Manifest.load(tmp_path / "job"), 0, layer["name"])
    assert weight.n_outliers == layer["outliers"] and record["metrics"]["nbytes"] == weight.nbytes
    assert weight.nbytes == weight.lut.numel() * 4 + weight.indices.numel() + 6 * weight.n_outliers


def test_a_jobs_sensitivities_serve_the_python_api(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from llmpalette.palettization import SKMPalettizer
    from llmpalette.palettization.sensitive_k_means import SKMPalettizerConfig

    recipe = Recipe.from_yaml(str(write_recipe(tmp_path, tiny_llama_dir, samples=3, shard=1)))
    run_job(recipe, tmp_path / "job", progress=False, evaluate=False)
    record = Manifest.load(tmp_path / "job").stats(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    skm = SKMPalettizer(model, SKMPalettizerConfig.from_dict(recipe.stages[0].raw_config))
    skm.compress(sensitivity_path=tmp_path / "job" / record["folder"] / "s00003")
    from llmpalette.jobs.runner import read_unit
    for name, weight in skm.compressed.items():
        assert weight == read_unit(Manifest.load(tmp_path / "job"), 0, name)


def test_gradient_checkpointing_may_change_on_resume(tmp_path, tiny_llama_dir):
    """It changes how the sensitivities are computed, not their bits: a job started without it resumes
    with it (the out-of-memory fix), also a job whose stored recipe hash still counted it."""
    path = write_recipe(tmp_path, tiny_llama_dir, samples=3)
    without = Recipe.from_yaml(str(path))
    path.write_text(path.read_text().replace("calibration_shard_size: 1", "calibration_shard_size: 1\n      gradient_checkpointing: true"))
    with_it = Recipe.from_yaml(str(path))
    assert with_it.stages[0].config.gradient_checkpointing and with_it.sha256 == without.sha256
    job = tmp_path / "job"
    run_job(without, job, progress=False, evaluate=False)
    reference = layer_bytes(job)
    manifest = Manifest.load(job)
    manifest.data["recipe_sha256"] = "0" * 64  # as an earlier version hashed it
    del manifest.data["stages"][0]["units"]["model.layers.1.mlp.up_proj"]
    manifest.save()
    summary = run_job(with_it, job, resume=True, progress=False, evaluate=False)
    assert summary.computed == 1 and layer_bytes(job) == reference


def test_two_ranks_equal_a_two_thread_single_process(tmp_path, monkeypatch):
    """The bytes do not depend on torch's thread count (a launcher gives each rank one thread): a model wide
    enough for torch to split its matmuls across threads."""
    model_dir = tmp_path / "model"
    tiny_llama(seed=3, hidden=256, layers=2).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    recipe = write_recipe(tmp_path, model_dir, samples=4, shard=2)
    monkeypatch.setitem(ENV, "OMP_NUM_THREADS", "2")
    compress(recipe, tmp_path / "one")
    monkeypatch.setitem(ENV, "OMP_NUM_THREADS", "1")
    compress(recipe, tmp_path / "two", ranks=2)
    assert stats_bytes(tmp_path / "two") == stats_bytes(tmp_path / "one")
    assert layer_bytes(tmp_path / "two") == layer_bytes(tmp_path / "one")
