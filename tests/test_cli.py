"""The CLI end to end on a tiny random Llama saved to a local folder."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_RECIPE


def cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "llmpalette", *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_compress_evaluate_report(tmp_path, tiny_recipe):
    job = tmp_path / "job"
    run = cli("compress", tiny_recipe, "--job-dir", job, "--quiet")
    assert run.returncode == 0, run.stderr
    assert "compressed 14 layers (14 computed, 0 kept" in run.stdout
    report = json.loads((job / "report.json").read_text())
    assert "s (this run's wall time, model loading included) -> " in run.stdout
    assert (f"\ncompression time {report['compression_seconds']:.1f} s (layers; no sensitivity pass), "
            "as the job records it (passes summed over its runs, each layer's latest computation)\n") in run.stdout
    ev = report["evaluation"]
    assert ev["windows"] == 4 and ev["seq_len"] == 64
    assert ev["perplexity_before"] > 1 and ev["perplexity_after"] > 1
    assert ev["text"]["rule"] and ev["text"]["source"] == "default"
    size = report["size"]
    assert size["compressed_bytes"] < size["float16_bytes"] and size["compression_ratio_vs_float16"] > 1
    assert len(report["layers"]) == 14 and all(0 < layer["rel_sq_error"] < 1 for layer in report["layers"])
    assert (job / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = cli("report", job)
    assert printed.returncode == 0
    assert printed.stdout == (job / "report.md").read_text()
    assert "| compressed (after) |" in printed.stdout and "model.layers.1.mlp.down_proj" in printed.stdout
    assert json.loads(cli("report", job, "--json").stdout)["size"] == size


def test_model_and_data_overrides(tmp_path, tiny_recipe, tiny_llama_dir):
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog. " * 20 for i in range(60)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe.read_text().replace(str(tiny_llama_dir), "/does/not/exist"))
    job = tmp_path / "job"
    run = cli("compress", recipe, "--job-dir", job, "--model", tiny_llama_dir, "--data", text, "--quiet")
    assert run.returncode == 0, run.stderr
    report = json.loads((job / "report.json").read_text())
    assert report["evaluation"]["text"]["source"] == str(text)
    assert json.loads((job / "manifest.json").read_text())["recipe"]["model"] == str(tiny_llama_dir)


def run_main(capsys, *args):
    from llmpalette.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bad_recipe_is_one_line_naming_file_and_field(tmp_path, tiny_recipe, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(tiny_recipe.read_text().replace("group_size: 8", "group_size: 0"))
    code, _, err = run_main(capsys, "compress", bad, "--job-dir", tmp_path / "job")
    assert code == 2
    assert err == f"llmpalette: error: {bad}: stages[0].config.global_config.group_size: must be a positive integer, got 0\n"


@pytest.mark.parametrize("model, words", [
    ("/does/not/exist.gguf", "/does/not/exist.gguf"),
    ("no-such-org/no-such-model", "no-such-org/no-such-model"),
])
def test_bad_model_is_one_line(tmp_path, tiny_recipe, capsys, model, words):
    code, _, err = run_main(capsys, "compress", tiny_recipe, "--job-dir", tmp_path / "job", "--model", model)
    assert code == 2
    assert err.startswith("llmpalette: error: ") and err.count("\n") == 1 and words in err


def test_report_of_a_non_job(tmp_path, capsys):
    code, _, err = run_main(capsys, "report", tmp_path)
    assert code == 2 and "not a job directory" in err


def test_job_dir_in_use_needs_resume(tmp_path, tiny_recipe, capsys):
    assert run_main(capsys, "compress", tiny_recipe, "--job-dir", tmp_path / "job", "--no-eval", "--quiet")[0] == 0
    code, _, err = run_main(capsys, "compress", tiny_recipe, "--job-dir", tmp_path / "job", "--no-eval", "--quiet")
    assert code == 2 and "pass --resume" in err
    code, out, _ = run_main(capsys, "compress", tiny_recipe, "--job-dir", tmp_path / "job", "--no-eval", "--quiet", "--resume")
    assert code == 0 and "(0 computed, 14 kept from an earlier run)" in out


def test_report_of_a_no_eval_job_says_it_evaluates_or_skips_it(tmp_path, tiny_recipe, capsys):
    from llmpalette.evaluate.report import NO_EVAL

    job = tmp_path / "job"
    assert run_main(capsys, "compress", tiny_recipe, "--job-dir", job, "--no-eval", "--quiet")[0] == 0
    assert not (job / "report.json").exists()

    code, out, err = run_main(capsys, "report", job, "--no-eval")
    assert code == 0 and err == ""
    report = json.loads((job / "report.json").read_text())
    assert report["evaluation"]["reason"] == NO_EVAL and len(report["layers"]) == 14
    assert out == (job / "report.md").read_text() and f"(skipped with --no-eval; `llmpalette report {job}` measures it)" in out
    assert run_main(capsys, "report", job, "--no-eval")[1] == out  # the report is there now: printed as it is

    code, out, err = run_main(capsys, "report", job)
    assert code == 0
    said = [line for line in err.splitlines() if "has no perplexity yet" in line]
    assert said == [f"llmpalette: {job} has no perplexity yet: evaluating the float and compressed models on 4 held-out "
                    f"windows of 64 tokens first (`llmpalette report {job} --no-eval` skips it)"]
    assert json.loads((job / "report.json").read_text())["evaluation"]["measured"] is True
    assert "| compressed (after) |" in out
    assert run_main(capsys, "report", job) == (0, out, "")  # evaluated once


def test_report_refuses_a_job_being_written(tmp_path, tiny_recipe, capsys):
    from llmpalette.jobs.lock import JobLock

    job = tmp_path / "job"
    assert run_main(capsys, "compress", tiny_recipe, "--job-dir", job, "--no-eval", "--quiet")[0] == 0
    with JobLock(job):
        code, _, err = run_main(capsys, "report", job, "--no-eval")
    assert code == 2 and f"job {job} is being written by pid {os.getpid()} on " in err
    assert not (job / "report.json").exists()


def test_help_says_what_no_eval_skips(capsys):
    from llmpalette.cli import main

    for command, says in [("compress", "skip the perplexity evaluation and write no report"),
                          ("report", "skip the perplexity evaluation: a job without a report gets one from the compression figures only")]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert says in " ".join(capsys.readouterr().out.split())


def test_report_warns_about_layers_that_grew():
    from llmpalette.evaluate.report import format_report

    layer = {"name": "a.q_proj", "tied_names": [], "shape": [4, 8], "n_bits": 8, "granularity": "per_channel",
             "group_size": None, "rel_sq_error": 1e-5, "nbytes": 1100, "fp16_bytes": 64}
    report = {"job_dir": "j", "model": {"spec": "m", "kind": "folder"}, "stages": [], "world_size": 1,
              "compression_seconds": 0.1, "evaluation": {"windows": 0, "seq_len": 8},
              "size": {"float16_bytes": 64, "compressed_bytes": 1100, "compression_ratio_vs_float16": 64 / 1100},
              "layers": [layer]}
    assert "**Warning:** 1 layer(s) are not smaller than in float16 (e.g. `a.q_proj`)" in format_report(report)
    layer["nbytes"] = 40
    assert "Warning" not in format_report(report)


def test_version(capsys):
    from llmpalette import __version__
    from llmpalette.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"llmpalette {__version__}\n"


def test_report_json_into_a_closed_pipe_ends_quietly(tmp_path, tiny_recipe):
    job = tmp_path / "job"
    assert cli("compress", tiny_recipe, "--job-dir", job, "--quiet").returncode == 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    piped = subprocess.run(f"{sys.executable} -m llmpalette report {job} --json | head -n 2", shell=True, cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=120)
    assert piped.stdout.count("\n") == 2 and "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr


def test_weights_only_model_compresses_and_says_why_it_is_not_evaluated(tmp_path, tiny_recipe):
    from tests.conftest import tiny_llama

    folder = tmp_path / "weights-only"
    tiny_llama(seed=2).save_pretrained(folder)
    job = tmp_path / "job"
    run = cli("compress", tiny_recipe, "--job-dir", job, "--model", folder)
    assert run.returncode == 0, run.stderr
    assert "compressed 14 layers" in run.stdout
    warnings = [line for line in run.stderr.splitlines() if "not measured" in line]
    assert len(warnings) == 1 and "--tokenizer" in warnings[0]
    report = json.loads((job / "report.json").read_text())
    assert report["evaluation"]["measured"] is False and len(report["layers"]) == 14
    assert cli("report", job).returncode == 0


def test_report_refuses_a_corrupt_job_at_once(tmp_path, tiny_recipe):
    job = tmp_path / "job"
    assert cli("compress", tiny_recipe, "--job-dir", job, "--quiet", "--no-eval").returncode == 0
    (job / "layers" / "model.layers.0.mlp.up_proj.safetensors").write_bytes(b"broken")
    run = cli("report", job)
    assert run.returncode == 2 and "model.layers.0.mlp.up_proj" in run.stderr and "corrupt" in run.stderr
    assert not (job / "report.json").exists()


def test_quiet_silences_library_progress_bars(tmp_path, tiny_recipe):
    run = cli("compress", tiny_recipe, "--job-dir", tmp_path / "job", "--quiet")
    assert run.returncode == 0 and run.stderr == "", run.stderr
