"""A job holds the tensors it works on, not the model: read from the model's safetensors files one
weight (data-free k-means, RTN) or one decoder block (GPTQ) at a time. Measured as the growth of a
child process's peak RSS over the job, for a model with 4 and with 8 decoder blocks: doubling the
blocks must add about one block (GPTQ) or less than one layer (k-means), not the 4 extra blocks.
The control, the same job given the whole loaded model (`run_job(loaded=...)`), shows the test can fail."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, byte_tokenizer

HIDDEN, INTER = 512, 1024
BLOCK_BYTES = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER) * 4  # float32 weights of one decoder block, ~10.5 MB
LAYER_BYTES = HIDDEN * INTER * 4

CHILD = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from llmpalette.jobs import run_job
    from llmpalette.recipe import Recipe
    from llmpalette.sources.models import load_model

    def hwm():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    recipe = Recipe.from_dict(json.loads(sys.argv[1]))
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    before = hwm()
    loaded = load_model(recipe.model) if sys.argv[3] == "whole" else None
    run_job(recipe, sys.argv[2], progress=False, evaluate=False, loaded=loaded)
    print(json.dumps({"growth": hwm() - before}))
''')


def model_dir(root: Path, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = root / f"m{layers}"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=257, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def growth(tmp_path: Path, model: Path, stage: dict, name: str, how: str = "lazy") -> int:
    recipe = {"model": str(model), "data": {"text": "default", "seq_len": 32}, "stages": [stage], "evaluate": {"windows": 0}}
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(recipe), str(tmp_path / name), how], cwd=REPO,
                            env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["growth"]


KMEANS = {"algorithm": "kmeans", "config": {"global_config": {"n_bits": 2, "granularity": "per_grouped_channel", "group_size": 64},
                                             "module_name_configs": {"lm_head": None, "model.embed_tokens": None}}}
GPTQ = {"algorithm": "gptq", "config": {"global_config": {"algorithm": "gptq", "weight_dtype": "int4"}, "calibration_nsamples": 2}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    root = tmp_path_factory.mktemp("memory")
    return {n: model_dir(root, n) for n in (4, 8)}


@pytest.mark.parametrize("stage, limit", [(KMEANS, LAYER_BYTES), (GPTQ, 1.5 * BLOCK_BYTES)], ids=["kmeans", "gptq"])
def test_twice_the_blocks_adds_about_one_block_not_the_model(tmp_path, models, stage, limit):
    added = growth(tmp_path, models[8], stage, "j8") - growth(tmp_path, models[4], stage, "j4")
    whole = growth(tmp_path, models[8], stage, "w8", "whole") - growth(tmp_path, models[4], stage, "w4", "whole")
    assert whole > 3 * BLOCK_BYTES, f"control: loading the whole model should add ~4 blocks, added {whole / 1e6:.1f} MB"
    print(f"added {added / 1e6:.2f} MB lazily, {whole / 1e6:.2f} MB whole")
    assert added < limit, f"4 more blocks added {added / 1e6:.1f} MB to the peak (limit {limit / 1e6:.1f} MB)"
