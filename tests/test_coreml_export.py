"""Core ML export: finished jobs on tiny random Llama / Qwen2 models -> iOS18 .mlpackage, checked on Linux.

Every compressed kind the jobs have (scalar 4-bit g16, vector LUTs, int8 LUTs, per-channel scales,
SKM outliers) is exported; every compressed weight read back from the package decodes equal to the
job's `decode()` bit for bit; the package's program, run by the numpy reference evaluator (prefill,
then decode steps through the states), matches the torch model; errors are one clear line.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llmpalette.cli import main
from llmpalette.errors import ConfigError
from llmpalette.export.coreml import ProgramShape, build_package, export_coreml, verify_package
from llmpalette.export.coreml.package import load_program, load_spec, read_metadata
from llmpalette.export.errors import ExportError
from llmpalette.jobs import run_job
from llmpalette.recipe import Recipe
from tests.conftest import byte_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CTX, PREFILL = 32, 8   # tiny shapes: two prefill calls (8 + 4 tokens) and 4 decode steps per sequence
SKIP_HEAD = {"lm_head": None, "model.embed_tokens": None}


def save_model(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def big_vocab_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose vocabulary (16512) exceeds the Neural Engine's 16384: the lm_head is split."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=16512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    return save_model(LlamaForCausalLM(config).eval(), tmp_path_factory.mktemp("big-vocab-llama"))


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2: untied lm_head, q/k/v biases."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    config = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # random biases, so a lost bias shows in the logits
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return save_model(model, tmp_path_factory.mktemp("tiny-qwen2"))


def make_job(folder: Path, model_dir: Path, global_config: dict, module_names: dict | None = SKIP_HEAD, *,
             algorithm: str = "kmeans", extra: dict | None = None) -> Path:
    config = {"global_config": global_config, **({"module_name_configs": module_names} if module_names else {}), **(extra or {})}
    recipe = Recipe.from_dict({"model": str(model_dir), "data": {"text": "default", "seq_len": 32},
                               "stages": [{"algorithm": algorithm, "config": config}], "evaluate": {"windows": 0}})
    job = folder / "job"
    run_job(recipe, job, progress=False, evaluate=False)
    return job


def exported(job: Path, out: Path, **kwargs):
    result = export_coreml(job, out, context_length=CTX, prefill_length=PREFILL, **kwargs)
    check = result.verification
    assert check.passed, check.problems
    assert check.spec_version == 9 and set(check.functions) == {"prefill", "decode"}
    assert check.bit_exact == check.weights == check.shared == result.compressed > 0
    assert check.max_abs_error <= check.tolerance
    return result


def op_types(package: Path, function: str = "decode") -> list[str]:
    return [op.op_type for op in load_program(package).functions[function].operations]


G16 = {"n_bits": 4, "granularity": "per_grouped_channel", "group_size": 16}


@pytest.fixture(scope="module")
def llama_4bit(tmp_path_factory, tiny_llama_dir):
    """A 4-bit g16 k-means job of the tiny Llama (tied head and embedding left alone) and its export."""
    folder = tmp_path_factory.mktemp("llama-4bit")
    job = make_job(folder, tiny_llama_dir, G16)
    result = exported(job, folder / "model.mlpackage")
    return job, result


# -- increment 1: exactly the job's weights -------------------------------------------------------
def test_scalar_4bit_g16_is_the_jobs_lut_and_indices(llama_4bit):
    job, result = llama_4bit
    check = result.verification
    assert result.compressed == 14 and check.weights == 14
    assert check.verbatim_indices == 14  # output-channel groups: the stored packed indices are the job's bytes
    package = result.package
    types = op_types(package)
    assert types.count("constexpr_lut_to_dense") == 14
    assert "constexpr_blockwise_shift_scale" not in types  # no scale after (or before) any LUT
    assert types.count("conv") == 14 + 1  # every linear a 1x1 convolution, plus the lm_head (vocab 257: one part)
    assert "linear" not in types
    # Core ML Tools' own decompression of each LUT op agrees with our evaluator and with the job
    program = load_program(package)
    from llmpalette.export.coreml.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(package)
    for op in program.functions["prefill"].operations:
        if op.op_type == "constexpr_lut_to_dense":
            theirs = op.materialized_val_inference()
            ours = evaluator.value("prefill", op.outputs[0].name)
            assert theirs.dtype == np.float16 and np.array_equal(theirs.view(np.uint16), ours.view(np.uint16))


def test_package_format_inputs_states_and_metadata(llama_4bit):
    job, result = llama_4bit
    spec = load_spec(result.package)
    assert spec.specificationVersion == 9  # iOS18
    functions = {f.name: f for f in spec.description.functions}
    assert set(functions) == {"prefill", "decode"} and spec.description.defaultFunctionName == "decode"
    for name, length in (("prefill", PREFILL), ("decode", 1)):
        f = functions[name]
        shapes = {i.name: [d for d in i.type.multiArrayType.shape] for i in f.input}
        assert shapes == {"input_ids": [1, length], "position_ids": [length], "causal_mask": [1, 1, length, CTX]}
        assert sorted(s.name for s in f.state) == sorted(f"{k}_cache_{i}" for i in range(2) for k in ("key", "value"))
        assert [o.name for o in f.output] == ["logits_0"]
    metadata = read_metadata(result.package)
    assert metadata["context_length"] == CTX and metadata["prefill_length"] == PREFILL
    assert metadata["recipe_sha256"] == json.loads((job / "manifest.json").read_text())["recipe_sha256"]
    assert set(metadata["weights"]) == {f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    # prefill and decode share one copy of the weights: the package is not twice the single function's size
    weights = result.package / "Data/com.apple.CoreML/weights/weight.bin"
    assert weights.stat().st_size < 1.2 * result.bytes / 2 + 200_000


def test_vector_lut_with_palettized_tied_embedding_and_split_head(tmp_path, big_vocab_llama_dir):
    job = make_job(tmp_path, big_vocab_llama_dir, {**G16, "cluster_dim": 2}, module_names=None)
    result = exported(job, tmp_path / "vector.mlpackage")
    assert result.compressed == 15  # 14 linears + the tied embedding / lm_head, once
    record = read_metadata(result.package)["weights"]["model.embed_tokens"]
    assert record["rank"] == 2 and record["var"] == "model_embed_tokens_weight"
    program = load_program(result.package).functions["decode"]
    luts = [op for op in program.operations if op.op_type == "constexpr_lut_to_dense"]
    assert len(luts) == 15 and all(int(op.vector_axis.val) == 0 and op.lut.shape[-1] == 2 for op in luts)
    assert [v.name for v in program.outputs] == ["logits_0", "logits_1"]  # 16512 > 16384: two parts
    assert [list(v.shape) for v in program.outputs] == [[1, 1, 8256], [1, 1, 8256]]
    assert read_metadata(result.package)["vocab_parts"] == [[0, 8256], [8256, 16512]]


def test_int8_lut_job_is_exact(tmp_path, tiny_llama_dir):
    job = make_job(tmp_path, tiny_llama_dir, {**G16, "lut_dtype": "int8"})
    result = exported(job, tmp_path / "int8.mlpackage")
    # the job's float32 LUT scales are not float16 numbers; where no float16 scale gives the same entries
    # the LUT is written as its float16 decode, and the export says so
    assert result.notes
    for notes in result.notes.values():
        assert any("float16 decode" in note for note in notes)


@pytest.mark.parametrize("lut_dtype", ["int8", "uint8"])
def test_quantized_lut_with_float16_scale_goes_through_blockwise_shift_scale(tmp_path, lut_dtype):
    """A LUT whose scale is a float16 number dequantizes in Core ML exactly: int8/uint8 LUT ->
    constexpr_blockwise_shift_scale (zero point as offset) -> constexpr_lut_to_dense."""
    from llmpalette.palettization.post_training import ModulePostTrainingPalettizerConfig, palettize_weight

    model = tiny_llama(3)
    config = ModulePostTrainingPalettizerConfig(n_bits=4, granularity="per_grouped_channel", group_size=16, lut_dtype=lut_dtype)
    compressed = {}
    for i in range(2):
        for name in ("mlp.up_proj", "self_attn.q_proj"):
            module = f"model.layers.{i}.{name}"
            w = palettize_weight(model.get_submodule(module).weight.detach(), config)
            scale = w.lut_scale.to(torch.float16).to(torch.float32)  # a float16-representable scale, same LUT codes
            compressed[module] = type(w)(**{**vars(w), "lut_scale": scale})
    out = tmp_path / "quantized.mlpackage"
    result = build_package(model, compressed, out, ProgramShape(CTX, PREFILL))
    assert not result.notes
    types = op_types(out)
    assert types.count("constexpr_blockwise_shift_scale") == 4 == types.count("constexpr_lut_to_dense")
    program = load_program(out).functions["decode"]
    shift = [op for op in program.operations if op.op_type == "constexpr_blockwise_shift_scale"]
    assert all(op.outputs[0].child_ops[0].op_type == "constexpr_lut_to_dense" for op in shift)  # in front of the LUT op
    assert all((op.offset is not None) == (lut_dtype == "uint8") for op in shift)
    _decoded_into(model, compressed)
    check = verify_package(out, compressed, model)
    assert check.passed and check.bit_exact == 4, check.problems


def test_tied_names_of_one_weight_are_one_unit_in_memory(tmp_path):
    """build_package without a job: names that share one compressed weight (tied embedding/head) are one unit."""
    from llmpalette.palettization.post_training import ModulePostTrainingPalettizerConfig, palettize_weight

    model = tiny_llama(5, hidden=64)
    config = ModulePostTrainingPalettizerConfig(n_bits=3, granularity="per_channel")
    table = palettize_weight(model.model.embed_tokens.weight.detach(), config)
    out = tmp_path / "tied.mlpackage"
    result = build_package(model, {"model.embed_tokens": table, "lm_head": table}, out, ProgramShape(CTX, PREFILL))
    assert result.compressed == 1 and set(read_metadata(out)["weights"]) == {"model.embed_tokens"}
    _decoded_into(model, {"model.embed_tokens": table})
    check = verify_package(out, {"model.embed_tokens": table}, model)
    assert check.passed and check.bit_exact == 1, check.problems


def _decoded_into(model, compressed) -> None:
    with torch.no_grad():
        for name, weight in compressed.items():
            model.get_submodule(name).weight.copy_(weight.decode())


def test_per_channel_scale_is_folded_into_the_lut(tmp_path, tiny_llama_dir):
    per_input = {**G16, "channel_axis": 1, "enable_per_channel_scale": True}
    job = make_job(tmp_path, tiny_llama_dir, {**G16, "enable_per_channel_scale": True},
                   {**SKIP_HEAD, "model.layers.0.mlp.down_proj": per_input})
    result = exported(job, tmp_path / "scaled.mlpackage")
    assert len(result.notes) == 14 and all("folded" in n for notes in result.notes.values() for n in notes)
    assert "constexpr_blockwise_shift_scale" not in op_types(result.package)  # never a scale op after the LUT (#2688)
    luts = {op.name: op for op in load_program(result.package).functions["decode"].operations
            if op.op_type == "constexpr_lut_to_dense"}
    assert luts["model_layers_0_mlp_up_proj_weight"].lut.shape == (128, 1, 1, 1, 16, 1)  # one LUT per output channel
    assert luts["model_layers_0_mlp_down_proj_weight"].lut.shape == (64, 8, 1, 1, 16, 1)  # per (output channel, input group)


def test_skm_outliers_are_a_sparse_op_beside_the_lut(tmp_path, tiny_llama_dir):
    job = make_job(tmp_path, tiny_llama_dir, {**G16, "outlier_fraction": 0.02}, algorithm="skm",
                   extra={"calibration_nsamples": 2})
    result = exported(job, tmp_path / "skm.mlpackage")
    types = op_types(result.package)
    assert types.count("constexpr_lut_to_dense") == 14
    assert types.count("constexpr_sparse_to_dense") == 28 and types.count("select") == 14
    manifest = json.loads((job / "manifest.json").read_text())
    assert all(u["metrics"]["outliers"] > 0 for u in manifest["stages"][0]["units"].values())


def test_linear_quantized_rtn_job_is_exact(tmp_path, tiny_llama_dir):
    """RTN int4 per channel: exact through a LUT per block of the values its codes decode to, since the job's
    float32 scales are not float16 numbers (the export says so); the LUT's indices are the job's packed integers."""
    job = make_job(tmp_path, tiny_llama_dir, {"weight_dtype": "int4", "granularity": "per_channel",
                                              "quantization_scheme": "symmetric"}, algorithm="rtn")
    result = exported(job, tmp_path / "rtn.mlpackage")
    assert result.compressed == 14 and result.verification.verbatim_indices == 14
    assert result.notes and all("linear-quantized (int4)" in n for notes in result.notes.values() for n in notes)


@pytest.mark.parametrize("n_bits, signed, block", [(4, True, None), (8, False, 16), (3, True, None)])
def test_linear_quantized_with_float16_scales_is_blockwise_shift_scale(tmp_path, n_bits, signed, block):
    """With float16-representable scales Core ML's own dequantization is exact: constexpr_blockwise_shift_scale
    holding the job's integers (int4/uint4 or int8/uint8, zero point as offset)."""
    from llmpalette.layout.quantized import QuantizedWeight

    model = tiny_llama(6)
    generator = torch.Generator().manual_seed(n_bits)
    low, high = (-(2 ** (n_bits - 1)), 2 ** (n_bits - 1)) if signed else (0, 2**n_bits)
    compressed = {}
    for module in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"):
        shape = tuple(model.get_submodule(module).weight.shape)
        block_sizes = (1, block or shape[1])
        blocks = (shape[0], shape[1] // block_sizes[1])
        q = torch.randint(low, high, shape, generator=generator)
        scale = (torch.rand(blocks, generator=generator) * 0.05 + 0.001).to(torch.float16).to(torch.float32)
        zero = None if signed else torch.randint(0, 2**n_bits, blocks, generator=generator)
        compressed[module] = QuantizedWeight.from_integers(q, scale, zero, n_bits=n_bits, signed=signed, block_sizes=block_sizes)
    out = tmp_path / "lq.mlpackage"
    result = build_package(model, compressed, out, ProgramShape(CTX, PREFILL))
    assert result.kinds == {"quantized": 2} and not result.notes
    program = load_program(out).functions["decode"]
    shift = {op.name: op for op in program.operations if op.op_type == "constexpr_blockwise_shift_scale"}
    assert set(shift) == {"model_layers_0_mlp_down_proj_weight", "model_layers_1_self_attn_v_proj_weight"}
    from coremltools.converters.mil.mil import types

    kind = f"{'int' if signed else 'uint'}{4 if n_bits <= 4 else 8}"
    assert all(types.builtin_to_string(op.data.dtype) == kind for op in shift.values())
    assert all((op.offset is None) == signed for op in shift.values())
    _decoded_into(model, compressed)
    check = verify_package(out, compressed, model)
    assert check.passed and check.bit_exact == 2, check.problems
    assert check.verbatim_indices == (2 if n_bits in (4, 8) else 0)  # 3-bit integers are stored as int4


def test_qwen2_untied_head_and_biases(tmp_path, qwen2_dir):
    job = make_job(tmp_path, qwen2_dir, G16, module_names=None)
    result = exported(job, tmp_path / "qwen2.mlpackage")
    assert result.spec.architecture == "qwen2" and not result.spec.tied
    assert result.compressed == 16  # 14 linears, the embedding and the lm_head, each its own weight
    assert set(read_metadata(result.package)["weights"]) >= {"lm_head", "model.embed_tokens"}


# -- errors: one clear line ---------------------------------------------------------------------
def test_a_compressed_weight_the_program_cannot_place_is_never_dropped(tmp_path):
    from llmpalette.palettization.post_training import ModulePostTrainingPalettizerConfig, palettize_weight

    model = tiny_llama(4)
    model.model.extra = torch.nn.Linear(64, 64)  # a module the Llama program has no use for
    config = ModulePostTrainingPalettizerConfig(n_bits=2, granularity="per_grouped_channel", group_size=16)
    compressed = {"model.extra": palettize_weight(model.model.extra.weight.detach(), config)}
    with pytest.raises(ExportError, match=r"no place for the compressed weights of \['model.extra'\]; nothing was written"):
        build_package(model, compressed, tmp_path / "x.mlpackage", ProgramShape(CTX, PREFILL))
    assert not (tmp_path / "x.mlpackage").exists()


def test_unsupported_architecture_is_refused_by_name(tmp_path, capsys):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2)
    folder = save_model(MistralForCausalLM(config).eval(), tmp_path / "mistral")
    job = make_job(tmp_path, folder, G16)
    capsys.readouterr()
    assert main(["export", str(job), "--coreml", str(tmp_path / "m.mlpackage")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model loader's progress lines
    assert err.startswith("llmpalette: error: Core ML export supports")
    assert "supports llama" in err and "'mistral' (MistralForCausalLM)" in err
    assert not (tmp_path / "m.mlpackage").exists()


def test_unfinished_and_corrupt_jobs_are_refused_in_one_line(tmp_path, llama_4bit, capsys):
    job = tmp_path / "job"
    shutil.copytree(llama_4bit[0], job)
    manifest = json.loads((job / "manifest.json").read_text())
    layer = next(iter(manifest["stages"][0]["units"].values()))
    (job / next(iter(layer["files"]))).write_bytes(b"damaged")
    capsys.readouterr()
    assert main(["export", str(job), "--coreml", str(tmp_path / "c.mlpackage")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt (sha256 mismatch)" in err and "--resume" in err
    manifest["stages"][0]["status"] = "running"
    (job / "manifest.json").write_text(json.dumps(manifest))
    assert main(["export", str(job), "--coreml", str(tmp_path / "c.mlpackage")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not finished" in err
    assert main(["export", str(tmp_path / "nothing"), "--coreml", str(tmp_path / "c.mlpackage")]) == 2
    assert "is not a job directory" in capsys.readouterr().err
    assert not (tmp_path / "c.mlpackage").exists()
    with pytest.raises(ExportError, match="must end in .mlpackage"):
        export_coreml(llama_4bit[0], tmp_path / "model.zip")


# -- the commands -------------------------------------------------------------------------------
def test_recipe_export_section_and_verify_command(tmp_path, tiny_llama_dir, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {tiny_llama_dir}
stages:
  - algorithm: kmeans
    config:
      global_config: {{n_bits: 3, granularity: per_grouped_channel, group_size: 8}}
      module_name_configs: {{lm_head: null, model.embed_tokens: null}}
evaluate: {{windows: 0}}
export:
  coreml: {{path: tiny.mlpackage, context_length: {CTX}, prefill_length: {PREFILL}}}
""")
    job = tmp_path / "job"
    assert main(["compress", str(recipe), "--job-dir", str(job), "--no-eval"]) == 0
    out = capsys.readouterr().out
    package = job / "tiny.mlpackage"
    assert f"wrote {package}" in out and "compressed weights: 14: 14 constexpr_lut_to_dense with the job's LUT and indices" in out
    assert "14/14 compressed weights equal the job's decode() bit for bit" in out and ": ok" in out
    assert main(["verify", str(package), "--against", str(job)]) == 0
    assert "14/14 stored index (integer) blobs are the job's packed bytes unchanged" in capsys.readouterr().out
    # a flipped index in weight.bin is caught, and named
    spec = load_spec(package)
    fn = spec.mlProgram.functions["decode"]
    op = next(o for o in fn.block_specializations[fn.opset].operations if o.type == "constexpr_lut_to_dense")
    offset = op.inputs["indices"].arguments[0].value.blobFileValue.offset
    blob = bytearray((package / "Data/com.apple.CoreML/weights/weight.bin").read_bytes())
    data_offset = int.from_bytes(blob[offset + 16:offset + 24], "little")
    blob[data_offset] ^= 0b111
    (package / "Data/com.apple.CoreML/weights/weight.bin").write_bytes(bytes(blob))
    assert main(["verify", str(package), "--against", str(job), "--sequences", "0"]) == 1
    captured = capsys.readouterr()
    assert "values differ from the job's decode()" in captured.out and "fails" in captured.err


def test_recipe_export_section_parsing():
    base = {"stages": [{"algorithm": "kmeans", "config": {"global_config": G16}}]}
    plain = Recipe.from_dict(base)
    with_export = Recipe.from_dict({**base, "export": {"coreml": {"path": "m.mlpackage", "context_length": 256}}})
    assert with_export.export.coreml.context_length == 256 and with_export.export.coreml.prefill_length == 64
    assert with_export.sha256 == plain.sha256  # exporting does not change what the job compresses
    assert "export" not in plain.as_dict() and Recipe.from_dict(with_export.as_dict()) == with_export
    with pytest.raises(ConfigError, match=r"export\.coreml\.path: must end in \.mlpackage"):
        Recipe.from_dict({**base, "export": {"coreml": {"path": "m.zip"}}})
    with pytest.raises(ConfigError, match=r"export\.coreml\.contxt: unknown field"):
        Recipe.from_dict({**base, "export": {"coreml": {"contxt": 3}}})
    with pytest.raises(ConfigError, match=r"export\.hub: unknown export"):
        Recipe.from_dict({**base, "export": {"hub": "x"}})


def test_mac_smoke_script_drives_the_package(llama_4bit, tiny_llama_dir, monkeypatch, capsys):
    """launch/mac_smoke.py with Core ML's MLModel replaced by the numpy reference evaluator (no runtime here):
    its inputs (chunked prefill, masks, positions, the shared state) give the reference's own logits."""
    import importlib.util
    import sys

    import coremltools

    from llmpalette.export.coreml import ReferenceEvaluator
    from llmpalette.export.coreml.package import METADATA_KEY
    from tests.conftest import REPO

    package = llama_4bit[1].package

    class ReferenceModel:
        def __init__(self, path, compute_units=None, function_name=None):
            self.evaluator, self.function = ReferenceEvaluator(path), function_name
            self.user_defined_metadata = {METADATA_KEY: json.dumps(read_metadata(path))}

        def make_state(self):
            return self.evaluator.new_states(self.function)

        def predict(self, feed, state):
            return self.evaluator.run(self.function, feed, state)

    monkeypatch.setattr(coremltools.models, "MLModel", ReferenceModel)
    spec = importlib.util.spec_from_file_location("mac_smoke", REPO / "launch" / "mac_smoke.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["mac_smoke.py", str(package), "--tokenizer", str(tiny_llama_dir),
                                      "--prompt", "def f(x): return", "--tokens", "5", "--reference"])
    script.main()
    out = capsys.readouterr().out
    assert "prefill: 16 tokens" in out and "2 call(s) of 8" in out and "decode: 4 tokens" in out
    assert "max |logit difference| 0 over 20 tokens" in out


@pytest.mark.parametrize("global_config, op", [
    ({"algorithm": "gptq", "weight_dtype": "int3", "granularity": "per_block", "block_size": 16}, "constexpr_blockwise_shift_scale"),
    ({"algorithm": "lut_gptq", "n_bits": 3, "granularity": "per_grouped_channel", "group_size": 8}, "constexpr_lut_to_dense"),
], ids=["gptq-int3-block16", "lut-gptq-3bit-g8"])
def test_gptq_jobs_export_exactly_and_compactly(tmp_path, tiny_llama_dir, global_config, op):
    """GPTQ's scales are float16 values, so its weights are Core ML's own blockwise_shift_scale with no note;
    LUT-GPTQ writes the palettized kind, exported as any k-means job."""
    job = make_job(tmp_path, tiny_llama_dir, global_config, None, algorithm="gptq", extra={"calibration_nsamples": 2})
    result = exported(job, tmp_path / "gptq.mlpackage")
    assert result.compressed == 14 and not result.notes
    assert op_types(result.package).count(op) == 14
