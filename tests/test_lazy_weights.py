"""Lazy weights: one tensor read at a time equals what `load_model` holds, and a skeleton model runs a block."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from llmpalette.errors import SourceError
from llmpalette.sources.lazy import DEQUANTIZE_ROWS, WeightReader, _dequantize, empty_model, loaded, materialize, release
from llmpalette.sources.models import load_model, resolve_model
from tests.conftest import REPO, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DTYPES = [torch.float32, torch.bfloat16]


def tiny_qwen2(seed: int = 0, *, tie: bool = False, hidden: int = 64, layers: int = 2):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=257, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie, eos_token_id=256, bos_token_id=256)
    return Qwen2ForCausalLM(config).eval()


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


@pytest.fixture(scope="module", params=[(arch, sharded) for arch in MODELS for sharded in (False, True)],
                ids=lambda p: f"{p[0]}-{'sharded' if p[1] else 'single'}")
def saved(request, tmp_path_factory) -> Path:
    """A tiny model saved as safetensors: one file, or shards of about 20 kB under an index."""
    arch, sharded = request.param
    folder = tmp_path_factory.mktemp(f"{arch}-{sharded}")
    MODELS[arch](seed=3).save_pretrained(folder, **({"max_shard_size": "20KB"} if sharded else {}))
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    return folder


def assert_reads_equal_loaded(reader: WeightReader, model) -> None:
    assert reader.names() == [name for name, _ in model.named_parameters()]
    for name, parameter in model.named_parameters(remove_duplicate=False):
        value = reader.read(name, parameter.dtype)
        assert value.dtype == parameter.dtype, name
        assert torch.equal(value, parameter.detach()), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_each_safetensors_read_is_the_loaded_parameter_bit_for_bit(saved, dtype):
    model, _ = load_model(str(saved), dtype=dtype)
    assert_reads_equal_loaded(WeightReader(str(saved)), model)


def test_a_tie_is_listed_once_and_read_under_either_name(tiny_llama_dir):
    reader = WeightReader(str(tiny_llama_dir))
    assert "lm_head.weight" not in reader.names() and "model.embed_tokens.weight" in reader.names()
    assert torch.equal(reader.read("lm_head.weight"), reader.read("model.embed_tokens.weight"))
    assert torch.equal(reader.read("lm_head.weight"), load_model(str(tiny_llama_dir))[0].lm_head.weight)


def test_an_untied_head_is_its_own_parameter(tmp_path):
    tiny_llama(seed=4, tie=False).save_pretrained(tmp_path)
    reader = WeightReader(str(tmp_path))
    assert "lm_head.weight" in reader.names()
    assert not torch.equal(reader.read("lm_head.weight"), reader.read("model.embed_tokens.weight"))


def test_bin_weights_are_refused_with_what_to_do(tmp_path):
    model = tiny_llama(seed=4)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(SourceError, match=r"holds \.bin/\.pt weights; lazy reading needs safetensors or GGUF"):
        WeightReader(str(tmp_path))


def test_an_unknown_parameter_is_named(tiny_llama_dir):
    with pytest.raises(SourceError, match="has no parameter 'model.layers.9.mlp.up_proj.weight'"):
        WeightReader(str(tiny_llama_dir)).read("model.layers.9.mlp.up_proj.weight")


# --- GGUF -------------------------------------------------------------------------------------------------

def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), which transformers' GGUF loader undoes."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def gguf_tensor(name: str, weights: np.ndarray) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Norms and biases in F32, MLP weights as Q8_0, attention weights in F16, the embedding in F32."""
    if weights.ndim == 1 or name.startswith("token_embd"):
        return weights, gguf.GGMLQuantizationType.F32
    if ".ffn_" in name:
        return gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return weights.astype(np.float16), gguf.GGMLQuantizationType.F16


def write_gguf(model, path: Path) -> Path:
    """`model` as llama.cpp would convert it: GGUF names, the llama q/k permutation, mixed tensor types."""
    config, arch = model.config, model.config.model_type
    tensor_names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                            config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        stem, suffix = name.rsplit(".", 1)
        gguf_name = f"{tensor_names.get_name(stem)}.{suffix}"
        weights = tensor.numpy()
        if arch == "llama" and ".attn_q." in gguf_name:
            weights = llama_cpp_permute(weights, config.num_attention_heads)
        if arch == "llama" and ".attn_k." in gguf_name:
            weights = llama_cpp_permute(weights, config.num_key_value_heads)
        data, kind = gguf_tensor(gguf_name, weights)
        writer.add_tensor(gguf_name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def gguf_model(request, tmp_path_factory):
    """(the model written, its .gguf path): a tied Llama, an untied Qwen2 with q/k/v biases."""
    model = tiny_llama(seed=5) if request.param == "llama" else tiny_qwen2(seed=5)
    return model, write_gguf(model, tmp_path_factory.mktemp(f"gguf-{request.param}") / "tiny.gguf")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_each_gguf_read_is_the_parameter_transformers_loads(gguf_model, dtype):
    _, path = gguf_model
    loaded_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    assert_reads_equal_loaded(WeightReader(str(path)), loaded_model)


def test_gguf_attention_weights_come_back_unpermuted(gguf_model):
    """Q and K are stored permuted (llama) and in F16: reading them undoes the permutation exactly."""
    model, path = gguf_model
    reader = WeightReader(str(path))
    for name in ("q_proj", "k_proj", "v_proj"):
        key = f"model.layers.1.self_attn.{name}.weight"
        assert torch.equal(reader.read(key), model.get_parameter(key).detach().half().float()), key


@pytest.mark.parametrize("kind", [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16], ids=str)
def test_dequantizing_by_slabs_of_rows_gives_the_whole_tensor_dequantization(kind):
    weights = np.random.default_rng(0).standard_normal((2 * DEQUANTIZE_ROWS + 5, 64), dtype=np.float32)
    data = gguf.quants.quantize(weights, kind)
    assert np.array_equal(_dequantize(data, kind), gguf.dequantize(data, kind))


def test_gguf_of_another_architecture_is_refused(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "phi.gguf", "phi3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SourceError, match="lazy reading of GGUF architecture 'phi3' is not supported"):
        WeightReader(str(tmp_path / "phi.gguf"))


# --- the skeleton model -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_model_holds_no_weights_and_the_loaded_buffers(tiny_llama_dir, dtype):
    reader = WeightReader(str(tiny_llama_dir))
    skeleton, full = empty_model(reader.config, dtype), load_model(str(tiny_llama_dir), dtype=dtype)[0]
    assert not skeleton.training
    assert all(p.device.type == "meta" and p.dtype == dtype for p in skeleton.parameters())
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    buffers = dict(full.named_buffers())
    assert [name for name, _ in skeleton.named_buffers()] == list(buffers)
    for name, buffer in skeleton.named_buffers():
        assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name


def block_inputs(model, seed: int = 0):
    """Hidden states [1, 12, hidden] and the rotary (cos, sin) a decoder block takes."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 12, model.config.hidden_size, generator=generator)
    positions = torch.arange(12)[None]
    return hidden, model.model.rotary_emb(hidden, positions)


@pytest.mark.parametrize("arch", list(MODELS))
def test_a_materialized_block_computes_what_the_loaded_block_does(tmp_path, arch):
    MODELS[arch](seed=7, layers=3).save_pretrained(tmp_path)
    reader, full = WeightReader(str(tmp_path)), load_model(str(tmp_path))[0]
    skeleton = empty_model(reader.config)
    hidden, rotary = block_inputs(full)
    expected = full.model.layers[1](hidden, position_embeddings=rotary)
    with torch.no_grad(), loaded(skeleton, reader, "model.layers.1") as block:
        assert block is skeleton.model.layers[1]
        got = block(hidden, position_embeddings=block_inputs(skeleton)[1])
        assert torch.equal(got, expected)
        assert skeleton.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    assert all(p.device.type == "meta" for p in skeleton.parameters())


def test_materializing_a_tie_fills_both_names_with_one_tensor(tiny_llama_dir):
    reader = WeightReader(str(tiny_llama_dir))
    skeleton = empty_model(reader.config, torch.bfloat16)
    materialize(skeleton, ["lm_head.weight"], reader)
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    assert torch.equal(skeleton.lm_head.weight, reader.read("model.embed_tokens.weight", torch.bfloat16))
    assert skeleton.lm_head.weight.requires_grad
    release(skeleton, ["model.embed_tokens.weight"])
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    assert skeleton.lm_head.weight.device.type == "meta" and skeleton.lm_head.weight.dtype == torch.bfloat16


# --- memory -----------------------------------------------------------------------------------------------

MEASURE = textwrap.dedent("""
    import json, sys
    from llmpalette.sources.lazy import WeightReader
    from llmpalette.sources.models import load_model

    def status(field):  # bytes
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

    def reset_peak():  # Linux: VmHWM starts again from the current RSS
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")

    spec, how = sys.argv[1], sys.argv[2]
    figures = {"imported": status("VmRSS")}
    reset_peak()
    if how == "lazy":
        reader = WeightReader(spec)
        reader.read(reader.names()[1])  # the first read's one-off costs
        figures |= {"open_peak": status("VmHWM"), "opened": status("VmRSS")}
        reset_peak()
        for name in reader.names():
            reader.read(name)
        figures["read_peak"] = status("VmHWM")
    else:
        model = load_model(spec)[0]
        figures["load_peak"] = status("VmHWM")
    print(json.dumps(figures))
""")


def peak_rss(spec: str, how: str) -> dict[str, int]:
    """RSS figures (bytes) of a fresh process reading every parameter of `spec`, `how` = 'lazy' or 'full'.

    `imported`: RSS after the imports. lazy: `open_peak` (peak while opening the reader and reading one
    tensor), `opened` (RSS then), `read_peak` (peak while reading every parameter once). full: `load_peak`
    (peak during `load_model`). (Not `ru_maxrss`: a child starts with its parent's.)
    """
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("measuring peak memory needs Linux's /proc/self/clear_refs")
    # Large blocks mmapped and unmapped when freed (as `return_freed_memory` sets): RSS then follows live memory.
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
                        "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", MEASURE, spec, how], capture_output=True, text=True, cwd=REPO,
                         check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_reading_one_tensor_at_a_time_holds_about_one_block_not_the_model(tmp_path):
    torch.manual_seed(8)
    config = LlamaConfig(vocab_size=257, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)  # 8 blocks of 3.9 MB: 32 MB of float32 weights
    # Stored in bfloat16, so that reading in float32 allocates: a float32 file is mapped, not copied, and
    # pages of a mapped file that nothing touches cost no memory, whole model or not.
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    block_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    lazy, full = peak_rss(str(tmp_path), "lazy"), peak_rss(str(tmp_path), "full")
    assert lazy["read_peak"] - lazy["opened"] < 2 * block_bytes < model_bytes / 4, (lazy, block_bytes)
    assert full["load_peak"] - full["imported"] > model_bytes, (full, model_bytes)  # the measure sees a model


# --- the real default model -------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_reads_equal_the_loaded_model_and_peak_memory_is_printed():
    source = resolve_model("default")
    full = load_model(source)[0]
    assert_reads_equal_loaded(WeightReader(source), full)
    lazy, whole = peak_rss("default", "lazy"), peak_rss("default", "full")
    in_mb = {how: {key: round(value / 1e6) for key, value in figures.items()} for how, figures in
             (("lazy", lazy), ("load_model", whole))}
    print(f"\ndefault model, RSS in MB: {in_mb}")
    largest = max(parameter.numel() * 4 for parameter in full.parameters())  # the embedding, 113 MB
    assert lazy["read_peak"] - lazy["opened"] < 1.5 * largest < (whole["load_peak"] - whole["imported"]) / 4
