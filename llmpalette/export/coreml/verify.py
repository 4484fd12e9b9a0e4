"""Checks of an exported `.mlpackage` against its job, on Linux (no Core ML runtime needed).

1. **Structure**: an iOS18 ML Program (specification version 9) with the functions `prefill` and
   `decode`, the KV-cache states, and exactly one `constexpr_lut_to_dense` per compressed weight.
2. **Exactly the job's weights**: every compressed weight, computed with numpy from the ops read back
   from the package, equals the job's `decode()` in float16 bit for bit, in every function; the op
   that stores it holds the inputs `lut.py` derives from the job (LUT and indices, or integers, scales
   and zero points); the packed indices (integers) in weight.bin are those values packed (and, where
   the layouts agree, the job's own packed bytes); and the functions share every weight's stored bytes.
3. **The program computes the model**: the reference evaluator runs token sequences through `prefill`
   (two calls, the second partial) and then `decode` steps through the states, and the logits are
   compared with the torch model whose weights are the package's (the job's decoded weights and the
   model's other parameters, all rounded to float16), run in float32. The yardstick is float16 itself:
   the same torch model run in float16 on the same tokens; the package may differ from float32 by at
   most twice what that run does (and always by 1% of the largest logit).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmpalette.export.coreml.lut import CoreMLQuantized, coreml_weight
from llmpalette.export.coreml.package import blob_offsets, load_spec, read_blob, read_metadata
from llmpalette.export.coreml.program import causal_mask
from llmpalette.export.coreml.reference import ReferenceEvaluator
from llmpalette.export.errors import ExportError
from llmpalette.layout.packing import pack_bits
from llmpalette.layout.layer_file import CompressedWeight
from llmpalette.layout.quantized import QuantizedWeight

IOS18_SPECIFICATION_VERSION = 9
FUNCTIONS = ("prefill", "decode")
# Logits may differ from the float32 torch model by float16 rounding accumulated over the layers: allowed is
# FP16_FACTOR times the error of torch's own float16 run, or LOGIT_RTOL of the largest logit if that is more.
FP16_FACTOR = 2.0
LOGIT_RTOL = 0.01


@dataclass
class Verification:
    """What `verify_package` found; `problems` is empty when everything holds."""

    package: Path
    spec_version: int = 0
    functions: tuple[str, ...] = ()
    states: int = 0
    weights: int = 0                 # compressed weights in the job
    bit_exact: int = 0               # of them, equal to the job bit for bit in float16 in every function
    verbatim_indices: int = 0        # of them, whose stored packed indices are the job's own bytes
    shared: int = 0                  # of them, stored once for both functions
    tokens: int = 0                  # tokens evaluated (prefill + decode, all sequences)
    decode_steps: int = 0
    max_abs_error: float | None = None   # max |logit - torch float32| over every token
    torch_fp16_error: float | None = None  # the same for torch's float16 run of the model: the yardstick
    tolerance: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = [f"format: iOS18 ML Program (specification {self.spec_version}), functions {', '.join(self.functions)}, "
               f"{self.states} state tensors",
               f"weights: {self.bit_exact}/{self.weights} compressed weights equal the job's decode() bit for bit in float16 "
               f"in every function; {self.shared}/{self.weights} stored once for both functions; "
               f"{self.verbatim_indices}/{self.weights} stored index (integer) blobs are the job's packed bytes unchanged"]
        if self.max_abs_error is not None:
            verdict = "ok" if self.max_abs_error <= self.tolerance else "TOO LARGE"
            out.append(f"reference evaluation: {self.tokens} tokens ({self.decode_steps} decode steps through the state): "
                       f"max |logit - torch float32| {self.max_abs_error:.4g}; torch's own float16 run: "
                       f"{self.torch_fp16_error:.4g}; tolerance {self.tolerance:.4g}: {verdict}")
        out += [f"problem: {p}" for p in self.problems]
        return out


def verify_coreml(package: str | Path, job_dir: str | Path, *, model: str | None = None, sequences: int = 2,
                  decode_steps: int = 4) -> Verification:
    """Check an exported package against a finished job (see the module docstring); no Core ML runtime needed.

    Args:
        package: the `.mlpackage` folder written by `export_coreml`.
        job_dir: the job it was exported from.
        model: overrides the job's source model (same architecture).
        sequences, decode_steps: the reference evaluation (0 sequences: weights and structure only).

    Example:
        print("\\n".join(verify_coreml("SmolLM2-4bit.mlpackage", "jobs/default").lines()))
    """
    from llmpalette.jobs.compressed import apply_weights, compressed_weights
    from llmpalette.jobs.manifest import Manifest
    from llmpalette.recipe import DTYPES
    from llmpalette.sources.models import load_model

    package = Path(package)
    if not (package / "Manifest.json").is_file():
        raise ExportError(f"{package} is not an .mlpackage folder")
    manifest = Manifest.load(Path(job_dir))
    units = compressed_weights(manifest)
    recorded = read_metadata(package).get("recipe_sha256")
    if recorded and recorded != manifest.data.get("recipe_sha256"):
        raise ExportError(f"{package} was exported from a job with another recipe than {job_dir}'s "
                          f"(recipe sha256 {recorded[:12]} vs {manifest.data.get('recipe_sha256', '')[:12]})")
    recipe = manifest.data["recipe"]
    source, _ = load_model(model or recipe["model"], dtype=DTYPES[recipe["dtype"]])
    apply_weights(source, units, Path(job_dir))
    return verify_package(package, {name: w for name, (_, _, w) in units.items()}, source,
                          sequences=sequences, decode_steps=decode_steps)


def verify_package(package: str | Path, units: dict[str, CompressedWeight], model: torch.nn.Module, *,
                   sequences: int = 2, decode_steps: int = 4, seed: int = 0) -> Verification:
    """Check `package` against the job's compressed weights and the torch model (see the module docstring).

    Args:
        package: the `.mlpackage` folder.
        units: the job's compressed weights by unit (module) name.
        model: the model the package was exported from, with the job's decoded weights (it is not modified).
        sequences: token sequences for the reference evaluation (0: skip it).
        decode_steps: decode steps after the prefill of each sequence.
        seed: the random token sequences' seed.
    """
    package = Path(package)
    result = Verification(package)
    spec = load_spec(package)
    metadata = read_metadata(package)
    if not metadata:
        raise ExportError(f"{package} was not written by llmpalette (no export metadata); it cannot be verified against a job")
    _check_structure(spec, metadata, result)
    evaluator = ReferenceEvaluator(package)
    _check_weights(package, spec, evaluator, metadata, units, result)
    if sequences and decode_steps >= 0 and not result.problems:
        _check_logits(evaluator, metadata, model, result, sequences, decode_steps, seed)
    return result


def _check_structure(spec, metadata: dict, result: Verification) -> None:
    result.spec_version = spec.specificationVersion
    if spec.specificationVersion != IOS18_SPECIFICATION_VERSION:
        result.problems.append(f"specification version {spec.specificationVersion}, not iOS18's {IOS18_SPECIFICATION_VERSION}")
    result.functions = tuple(f.name for f in spec.description.functions)
    if set(result.functions) != set(FUNCTIONS):
        result.problems.append(f"functions {list(result.functions)}, expected {list(FUNCTIONS)}")
    states = {f.name: [s.name for s in f.state] for f in spec.description.functions}
    expected = [f"{kind}_cache_{i}" for i in range(metadata["layers"]) for kind in ("key", "value")]
    for name, found in states.items():
        if sorted(found) != sorted(expected):
            result.problems.append(f"{name}: states {sorted(found)[:4]}..., expected {len(expected)} key/value caches")
    result.states = len(expected)


def _check_weights(package: Path, spec, evaluator: ReferenceEvaluator, metadata: dict,
                   units: dict[str, CompressedWeight], result: Verification) -> None:
    records = metadata["weights"]
    result.weights = len(units)
    missing = sorted(set(units) - set(records))
    if missing:
        result.problems.append(f"job units not in the package: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    extra = sorted(set(records) - set(units))
    if extra:
        result.problems.append(f"package weights that are not units of this job: {extra[:5]}")
    luts = sum(record["kind"] == "lut" for record in records.values())
    for function in result.functions:
        ops = [op for op in evaluator.program.functions[function].operations if op.op_type == "constexpr_lut_to_dense"]
        if len(ops) != luts:
            result.problems.append(f"{function}: {len(ops)} constexpr_lut_to_dense ops for {luts} palettized weights")
    for unit, weight in sorted(units.items()):
        if unit not in records:
            continue
        check = _check_unit(package, spec, evaluator, records[unit], weight, result.functions)
        result.problems += [f"{unit}: {p}" for p in check.problems]
        result.bit_exact += not check.problems
        result.verbatim_indices += check.verbatim
        result.shared += check.shared


@dataclass
class _UnitCheck:
    problems: list[str] = field(default_factory=list)
    verbatim: bool = False   # the stored packed indices are the job's own bytes
    shared: bool = False     # every function reads the same stored LUT and indices


_STORED = {"lut": ("constexpr_lut_to_dense", "indices"), "quantized": ("constexpr_blockwise_shift_scale", "data")}


def _check_unit(package: Path, spec, evaluator: ReferenceEvaluator, record: dict, weight: CompressedWeight,
                functions: tuple[str, ...]) -> _UnitCheck:
    """One compressed weight, in every function: its dense value, the op that stores it, its stored bytes."""
    check = _UnitCheck()
    expected = coreml_weight(weight, record["rank"])
    wanted = weight.decode(torch.float16).numpy().reshape(expected.shape).view(np.uint16)
    op_type, packed_input = _STORED[record["kind"]]
    offsets = []
    for function in functions:
        got = evaluator.value(function, record["var"])
        if got.shape != wanted.shape or got.dtype != np.float16:
            check.problems.append(f"{function}: {got.dtype} {list(got.shape)}, expected float16 {list(wanted.shape)}")
            continue
        differ = int(np.count_nonzero(got.view(np.uint16) != wanted))
        if differ:
            check.problems.append(f"{function}: {differ} of {wanted.size} values differ from the job's decode()")
        ops = [op for op in evaluator.program.functions[function].operations
               if op.op_type == op_type and op.name == record["op"]]
        if not ops:
            check.problems.append(f"{function}: no {op_type} named {record['op']!r}")
            continue
        check.problems += [f"{function}: {p}" for p in _stored_inputs_problems(ops[0], expected)]
        offsets.append(blob_offsets(spec, function, record["op"]))
    if offsets and packed_input in offsets[0]:
        stored = read_blob(package, offsets[0][packed_input])
        if isinstance(expected, CoreMLQuantized):
            values, bits, job_bytes = expected.data, expected.storage_bits, weight.data
        else:
            job_bytes = weight.data if isinstance(weight, QuantizedWeight) else weight.indices  # codes as the LUT's indices
            values, bits = expected.indices, expected.n_bits
        codes = torch.from_numpy(values.reshape(-1).astype(np.int64)) & (2**bits - 1)  # two's complement low bits
        if stored != pack_bits(codes, bits).numpy().tobytes():
            check.problems.append(f"the packed {packed_input} in weight.bin are not the job's")
        check.verbatim = stored == job_bytes.numpy().tobytes()
    check.shared = len(offsets) == len(functions) and all(o == offsets[0] for o in offsets)
    return check


def _stored_inputs_problems(op, expected) -> list[str]:
    """What differs between the op's stored inputs and those `lut.py` derives from the job."""
    if isinstance(expected, CoreMLQuantized):
        pairs = [("integers", op.data.val, expected.data), ("scales", op.scale.val, expected.scale),
                 ("zero points", None if op.offset is None else op.offset.val, expected.offset)]
    else:
        table = op.lut.val if op.lut.op.op_type == "const" else op.lut.op.data.val  # behind a blockwise_shift_scale
        pairs = [("indices", op.indices.val, expected.indices), ("LUT", table, expected.lut)]
    problems = []
    for what, stored, wanted in pairs:
        same = stored is None and wanted is None or (
            stored is not None and wanted is not None and stored.shape == wanted.shape and np.array_equal(stored, wanted))
        if not same:
            problems.append(f"the {op.op_type} op's {what} are not the job's")
    return problems


def reference_model(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of `model` whose every parameter is rounded through float16, as the package stores it."""
    import copy

    twin = copy.deepcopy(model).to(torch.float32).eval()
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(p.to(torch.float16).to(torch.float32))
    return twin


def _check_logits(evaluator: ReferenceEvaluator, metadata: dict, model: torch.nn.Module, result: Verification,
                  sequences: int, decode_steps: int, seed: int) -> None:
    S, ctx, vocab = metadata["prefill_length"], metadata["context_length"], metadata["vocab"]
    prompt = min(S + max(1, S // 2), ctx - decode_steps)  # two prefill calls, the second partial
    if -(-prompt // S) * S > ctx:  # the padded calls must fit in the cache
        prompt = min(S, ctx - decode_steps)
    if prompt < 1:
        raise ExportError(f"context_length {ctx} is too short to evaluate a prompt and {decode_steps} decode steps")
    reference = reference_model(model)
    half = reference_model(model).to(torch.float16)
    generator = np.random.default_rng(seed)
    errors, half_errors, scale = [], [], 0.0
    for _ in range(sequences):
        tokens = generator.integers(0, vocab, size=prompt + decode_steps)
        got = run_sequence(evaluator, tokens, prompt, S, ctx)
        ids = torch.from_numpy(tokens[None].astype(np.int64))
        with torch.no_grad():
            want = reference(input_ids=ids).logits[0].numpy()
            in_half = half(input_ids=ids).logits[0].to(torch.float32).numpy()
        errors.append(float(np.abs(got.astype(np.float32) - want).max()))
        half_errors.append(float(np.abs(in_half - want).max()))
        scale = max(scale, float(np.abs(want).max()))
        result.tokens += len(tokens)
    result.decode_steps = sequences * decode_steps
    result.max_abs_error = max(errors)
    result.torch_fp16_error = max(half_errors)
    result.tolerance = max(FP16_FACTOR * result.torch_fp16_error, LOGIT_RTOL * scale)
    if result.max_abs_error > result.tolerance:
        result.problems.append(f"logits differ from the torch model by up to {result.max_abs_error:.4g} "
                               f"(tolerance {result.tolerance:.4g})")


def run_sequence(evaluator: ReferenceEvaluator, tokens: np.ndarray, prompt: int, prefill_length: int,
                 context_length: int) -> np.ndarray:
    """Logits `[len(tokens), vocab]` from the package: `prompt` tokens through `prefill` (in calls of
    `prefill_length`, the last one padded), then one `decode` call per remaining token, one state throughout."""
    states = evaluator.new_states("prefill")
    rows = []
    for start in range(0, prompt, prefill_length):
        chunk = tokens[start:min(start + prefill_length, prompt)]
        ids = np.zeros(prefill_length, dtype=np.int32)
        ids[:len(chunk)] = chunk
        positions = np.arange(start, start + prefill_length, dtype=np.int32)
        out = evaluator.run("prefill", _inputs(ids, positions, context_length), states)
        rows.append(_logits(out)[:len(chunk)])
    for position in range(prompt, len(tokens)):
        ids = np.array([tokens[position]], dtype=np.int32)
        out = evaluator.run("decode", _inputs(ids, np.array([position], dtype=np.int32), context_length), states)
        rows.append(_logits(out))
    return np.concatenate(rows, axis=0)


def _inputs(ids: np.ndarray, positions: np.ndarray, context_length: int) -> dict[str, np.ndarray]:
    return {"input_ids": ids[None], "position_ids": positions, "causal_mask": causal_mask(positions, context_length)}


def _logits(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The vocabulary's logits `[S, vocab]` from the outputs `logits_0 ... logits_{n-1}`."""
    parts = sorted((k for k in outputs if k.startswith("logits_")), key=lambda k: int(k.split("_")[1]))
    return np.concatenate([outputs[k][0] for k in parts], axis=-1)
