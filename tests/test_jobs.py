"""Job directory: manifest, checksums, resume that keeps intact layers, kill -9 and byte-identical resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llmpalette
from llmpalette.errors import JobError
from llmpalette.jobs import Manifest, run_job
from llmpalette.palettization import PostTrainingPalettizer
from llmpalette.recipe import Recipe
from tests.conftest import REPO, TINY_RECIPE, tiny_llama


def layer_bytes(job_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((job_dir / "layers").iterdir())}


def recipe_for(model_dir, bits=3) -> Recipe:
    return Recipe.from_dict(__import__("yaml").safe_load(TINY_RECIPE.format(model=model_dir, bits=bits)))


def test_run_writes_manifest_with_checksums_and_layers(tmp_path, tiny_llama_dir):
    recipe = recipe_for(tiny_llama_dir)
    summary = run_job(recipe, tmp_path / "job", progress=False)
    assert (summary.units, summary.computed, summary.kept) == (14, 14, 0)
    m = json.loads((tmp_path / "job" / "manifest.json").read_text())
    assert m["format"] == "llmpalette-job/1" and m["world_size"] == 1 and m["recipe_sha256"] == recipe.sha256
    assert m["model"]["kind"] == "folder"
    stage = m["stages"][0]
    assert stage["status"] == "done" and len(stage["units"]) == 14
    unit = stage["units"]["model.layers.1.mlp.down_proj"]
    (rel, meta), = unit["files"].items()
    assert rel == "layers/model.layers.1.mlp.down_proj.safetensors"
    import hashlib
    assert hashlib.sha256((tmp_path / "job" / rel).read_bytes()).hexdigest() == meta["sha256"]
    assert 0 < unit["metrics"]["rel_sq_error"] < 0.2 and unit["metrics"]["nbytes"] < unit["metrics"]["fp16_bytes"]
    assert Recipe.from_yaml(str(tmp_path / "job" / "recipe.yaml")).sha256 == recipe.sha256
    assert not list((tmp_path / "job").rglob("*.tmp-*"))


def test_from_pretrained_equals_in_memory_palettizer(tmp_path, tiny_llama_dir):
    recipe = recipe_for(tiny_llama_dir)
    run_job(recipe, tmp_path / "job", progress=False)
    model = llmpalette.from_pretrained(tmp_path / "job")
    from transformers import AutoModelForCausalLM
    reference = PostTrainingPalettizer(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), recipe.stages[0].config).compress()
    ours = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        assert torch.equal(ours[name], p), name
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_existing_job_needs_resume_and_same_recipe(tmp_path, tiny_llama_dir):
    run_job(recipe_for(tiny_llama_dir), tmp_path / "job", progress=False)
    with pytest.raises(JobError, match="--resume"):
        run_job(recipe_for(tiny_llama_dir), tmp_path / "job", progress=False)
    with pytest.raises(JobError, match=r"compresses differently from the job's \(stages\[0\].config.global_config.n_bits: 3 -> 2\)"):
        run_job(recipe_for(tiny_llama_dir, bits=2), tmp_path / "job", resume=True, progress=False)
    again = run_job(recipe_for(tiny_llama_dir), tmp_path / "job", resume=True, progress=False)
    assert (again.computed, again.kept) == (0, 14)
    assert [r["resumed"] for r in Manifest.load(tmp_path / "job").data["runs"]] == [False, True]


def test_corrupt_or_missing_layer_is_detected_and_redone(tmp_path, tiny_llama_dir):
    job = tmp_path / "job"
    run_job(recipe_for(tiny_llama_dir), job, progress=False)
    good = layer_bytes(job)
    victim = job / "layers" / "model.layers.0.mlp.up_proj.safetensors"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    (job / "layers" / "model.layers.1.self_attn.o_proj.safetensors").unlink()
    (job / "layers" / "model.layers.0.self_attn.q_proj.safetensors.tmp-999").write_bytes(b"half")
    with pytest.raises(JobError, match="corrupt"):
        llmpalette.from_pretrained(job)
    summary = run_job(recipe_for(tiny_llama_dir), job, resume=True, progress=False)
    assert (summary.computed, summary.kept) == (2, 12)
    assert sorted(summary.redone) == [
        ("model.layers.0.mlp.up_proj", "layers/model.layers.0.mlp.up_proj.safetensors is corrupt (sha256 mismatch)"),
        ("model.layers.1.self_attn.o_proj", "layers/model.layers.1.self_attn.o_proj.safetensors is missing"),
    ]
    assert layer_bytes(job) == good


def test_corrupt_manifest_is_a_clear_error(tmp_path, tiny_llama_dir):
    job = tmp_path / "job"
    run_job(recipe_for(tiny_llama_dir), job, progress=False)
    (job / "manifest.json").write_text('{"format": "llmpalette-job/1", "stages": [')
    with pytest.raises(JobError, match="not valid JSON"):
        run_job(recipe_for(tiny_llama_dir), job, resume=True, progress=False)


SLOW_RECIPE = """
model: {model}
stages:
  - algorithm: kmeans
    config:
      global_config: {{n_bits: 8, granularity: per_tensor, weight_threshold: 0}}
      module_name_configs: {{lm_head: null, model.embed_tokens: null}}
evaluate: {{windows: 0}}
"""


def test_sigkill_mid_job_then_resume_is_byte_identical(tmp_path):
    """A real subprocess is killed with SIGKILL part-way; --resume finishes with the same bytes."""
    model_dir = tmp_path / "model"
    tiny_llama(seed=3, hidden=128, layers=6).save_pretrained(model_dir)
    from tests.conftest import byte_tokenizer
    byte_tokenizer().save_pretrained(model_dir)
    recipe_path = tmp_path / "slow.yaml"
    recipe_path.write_text(SLOW_RECIPE.format(model=model_dir))
    reference = tmp_path / "reference"
    run_job(Recipe.from_yaml(str(recipe_path)), reference, progress=False)

    job = tmp_path / "job"
    cmd = [sys.executable, "-m", "llmpalette", "compress", str(recipe_path), "--job-dir", str(job), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = len(json.loads((job / "manifest.json").read_text())["stages"][0]["units"])
        except (FileNotFoundError, json.JSONDecodeError, IndexError, KeyError):
            done = 0
        if done >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed; make it slower"
    units_total = 42
    assert done < units_total
    resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    kept = int(resumed.stdout.split(" kept")[0].split(", ")[-1])
    assert kept >= done
    assert layer_bytes(job) == layer_bytes(reference)
    ours = Manifest.load(job).units(0)
    theirs = Manifest.load(reference).units(0)
    assert {n: u["files"] for n, u in ours.items()} == {n: u["files"] for n, u in theirs.items()}


def test_resume_checks_the_model_fingerprint_not_its_path(tmp_path, tiny_llama_dir):
    job = tmp_path / "job"
    run_job(recipe_for(tiny_llama_dir), job, progress=False)
    manifest = Manifest.load(job)
    manifest.data["model"]["location"] = "/another/machine/model"
    manifest.save()
    assert run_job(recipe_for(tiny_llama_dir), job, resume=True, progress=False).kept == 14
    manifest = Manifest.load(job)
    manifest.data["model"]["config_sha256"] = "0" * 64
    manifest.save()
    with pytest.raises(JobError, match="fingerprint differs"):
        run_job(recipe_for(tiny_llama_dir), job, resume=True, progress=False)
