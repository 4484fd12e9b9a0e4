"""RTN jobs: `algorithm: rtn` writes linear-quantized layer files that decode to exactly what
PostTrainingQuantizer gives, the report and from_pretrained read them, and 2 gloo ranks write the same
bytes as 1."""
import json
from pathlib import Path

import torch

import llmpalette
from llmpalette.evaluate.report import build_report
from llmpalette.jobs import run_job
from llmpalette.layout import QuantizedWeight, read_layer_file
from llmpalette.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig
from llmpalette.recipe import Recipe
from tests.test_jobs import layer_bytes
from tests.test_skm_jobs import compress

CONFIG = {"global_config": {"weight_dtype": "int4", "granularity": "per_block", "block_size": 16, "quantization_scheme": "affine"},
          "module_name_configs": {"lm_head": None, "model.embed_tokens": None}}
RTN_RECIPE = """
model: {model}
data: {{text: default, seq_len: 64}}
stages:
  - algorithm: rtn
    config: {config}
evaluate: {{windows: 0}}
"""


def write(tmp_path: Path, model) -> Path:
    path = tmp_path / "rtn.yaml"
    path.write_text(RTN_RECIPE.format(model=model, config=json.dumps(CONFIG)))
    return path


def test_an_rtn_job_writes_what_the_python_api_computes(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    run_job(Recipe.from_yaml(str(write(tmp_path, tiny_llama_dir))), tmp_path / "job", progress=False, evaluate=False)
    files = sorted((tmp_path / "job" / "layers").glob("*.safetensors"))
    assert len(files) == 14
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    quantizer = PostTrainingQuantizer(model, PostTrainingQuantizerConfig.from_dict(CONFIG))
    quantizer.compress()
    for file in files:
        layer = read_layer_file(file)
        assert isinstance(layer.weight, QuantizedWeight) and layer.weight.n_bits == 4
        assert layer.weight == quantizer.compressed[layer.module], layer.module
    loaded = llmpalette.from_pretrained(str(tmp_path / "job"))
    weight = loaded.get_submodule("model.layers.1.mlp.down_proj").weight
    assert torch.equal(weight, quantizer.compressed["model.layers.1.mlp.down_proj"].decode().to(weight.dtype))
    report = build_report(tmp_path / "job", progress=False)  # the recipe evaluates 0 windows
    rows = {layer["name"]: layer for layer in report["layers"]}
    assert rows["model.layers.0.self_attn.q_proj"]["n_bits"] == 4 and rows["model.layers.0.self_attn.q_proj"]["group_size"] == 16


def test_two_ranks_write_the_one_rank_bytes(tmp_path, tiny_llama_dir):
    recipe = write(tmp_path, tiny_llama_dir)
    compress(recipe, tmp_path / "one")
    compress(recipe, tmp_path / "two", ranks=2)
    assert layer_bytes(tmp_path / "two") == layer_bytes(tmp_path / "one") and len(layer_bytes(tmp_path / "one")) == 14
