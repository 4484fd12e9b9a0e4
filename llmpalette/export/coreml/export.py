"""A finished job -> an iOS18 `.mlpackage` (prefill + decode sharing weights), then its checks.

Reads the job (refusing an unfinished or corrupt one before anything is loaded), loads the job's source
model for its configuration and the parameters the job did not compress, writes the package, and
verifies it (`verify.py`). Never clusters: every compressed weight is the job's LUT and indices.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from importlib import metadata as package_metadata
from pathlib import Path

import torch
from torch import nn

from llmpalette.export.coreml.architecture import (
    DecoderSpec, ProgramWeights, check_context, decoder_spec, rope_tables, var_name, vocab_chunks,
)
from llmpalette.export.coreml.lut import CoreMLQuantized
from llmpalette.export.coreml.package import package_bytes, save_package
from llmpalette.export.coreml.program import MASK_VALUE, ProgramShape, decoder_program
from llmpalette.export.coreml.verify import FUNCTIONS, Verification, verify_package
from llmpalette.export.errors import ExportError
from llmpalette.jobs.compressed import apply_weights, compressed_weights
from llmpalette.jobs.files import sha256_file
from llmpalette.jobs.manifest import MANIFEST, Manifest
from llmpalette.layout.layer_file import CompressedWeight
from llmpalette.recipe import DTYPES
from llmpalette.sources.models import load_model

log = logging.getLogger("llmpalette")


@dataclass
class ExportResult:
    """What `export_coreml` wrote and what its checks found."""

    package: Path
    bytes: int
    spec: DecoderSpec
    shape: ProgramShape
    compressed: int                                   # compressed weights (units) in the package
    kinds: dict[str, int] = field(default_factory=dict)  # "lut" | "quantized" -> how many
    notes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # unit -> how it differs from a plain float LUT
    verification: Verification | None = None
    seconds: float = 0.0

    def lines(self) -> list[str]:
        s, shape = self.spec, self.shape
        out = [f"wrote {self.package}: {self.bytes:,} B; iOS18 ML Program, {s.architecture}, {s.layers} layers, functions "
               f"prefill ({shape.prefill_length} tokens) and decode (1 token), context {shape.context_length}, "
               f"lm_head in {len(vocab_chunks(s.vocab, shape.vocab_limit))} part(s); {self.seconds:.1f} s",
               f"compressed weights: {self.compressed}: " + ", ".join(
                   f"{count} {_KIND_LINES[kind]}" for kind, count in sorted(self.kinds.items()))]
        for note, units in _group_notes(self.notes).items():
            out.append(f"note: {len(units)} weight(s) ({', '.join(units[:3])}{', ...' if len(units) > 3 else ''}): {note}")
        if self.verification is not None:
            out += self.verification.lines()
        return out


_KIND_LINES = {"lut": "constexpr_lut_to_dense with the job's LUT and indices",
               "quantized": "constexpr_blockwise_shift_scale with the job's integers"}


def _group_notes(notes: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for unit, texts in sorted(notes.items()):
        for text in texts:
            grouped.setdefault(text, []).append(unit)
    return grouped


def export_coreml(job_dir: str | Path, out: str | Path, *, context_length: int = 512, prefill_length: int = 64,
                  model: str | None = None, verify: bool = True, sequences: int = 2, decode_steps: int = 4) -> ExportResult:
    """Export a finished job as an iOS18 `.mlpackage` and check it.

    Args:
        job_dir: a finished job directory (`llmpalette compress ... --job-dir JOB`).
        out: the package to write (a folder ending in `.mlpackage`); replaced when it exists.
        context_length: KV-cache length (tokens the model can see), a fixed shape of both functions.
        prefill_length: tokens per `prefill` call.
        model: overrides the job's source model (same architecture), e.g. a local copy of a hub model.
        verify: run the checks of `verify.py` after writing (raises ExportError if one fails).
        sequences, decode_steps: the reference evaluation's token sequences and decode steps per sequence.

    Example:
        result = export_coreml("jobs/default", "SmolLM2-4bit.mlpackage")
        print("\\n".join(result.lines()))
    """
    started = time.perf_counter()
    out = Path(out)
    if out.suffix != ".mlpackage":
        raise ExportError(f"{out}: a Core ML package must end in .mlpackage")
    manifest = Manifest.load(Path(job_dir))
    units = compressed_weights(manifest)  # refuses an unfinished or corrupt job before loading the model
    for name, (param, _, _) in units.items():
        if param != "weight":
            raise ExportError(f"job {job_dir}: unit '{name}' compresses '{param}'; only module weights can be exported")
    recipe = manifest.data["recipe"]
    log.info("export: %d compressed weights from %s; loading the model %s", len(units), job_dir, model or recipe["model"])
    source, _ = load_model(model or recipe["model"], dtype=DTYPES[recipe["dtype"]])
    weights = {name: weight for _, names, weight in units.values() for name in names}
    result = build_package(source, weights, out, ProgramShape(context_length, prefill_length), job={
        "job": str(Path(job_dir).resolve()),
        "manifest_sha256": sha256_file(Path(job_dir) / MANIFEST),
        "recipe_sha256": manifest.data.get("recipe_sha256"),
        "units": {name: names for name, (_, names, _) in units.items()},
    })
    if verify:
        log.info("export: checking %s against the job (weights bit for bit, reference evaluation)", out)
        apply_weights(source, units, Path(job_dir))
        result.verification = verify_package(out, {name: w for name, (_, _, w) in units.items()}, source,
                                             sequences=sequences, decode_steps=decode_steps)
    result.seconds = time.perf_counter() - started
    if result.verification is not None and not result.verification.passed:
        raise ExportError(f"{out} was written but fails its checks: " + "; ".join(result.verification.problems[:3]))
    return result


def build_package(model: nn.Module, compressed: dict[str, CompressedWeight], out: Path, shape: ProgramShape,
                  job: dict | None = None) -> ExportResult:
    """Write `model` as the two-function package, with `compressed` (module name, tied names included ->
    weight) as constexpr LUT ops and every other parameter in float16. `job` (JSON-able) is recorded in
    the package's metadata: which job it came from and its units (name -> tied names)."""
    spec = decoder_spec(model)
    check_context(model, spec, shape.context_length, shape.prefill_length)
    rope = rope_tables(model, shape.context_length)
    weights = ProgramWeights(model, compressed)
    with torch.no_grad():
        programs = {"prefill": decoder_program(spec, weights, rope, shape, shape.prefill_length),
                    "decode": decoder_program(spec, weights, rope, shape, 1)}
    unused = weights.unused()
    if unused:
        raise ExportError(f"the {spec.architecture} program has no place for the compressed weights of {unused[:5]}; "
                          "nothing was written")
    units = (job or {}).get("units") or _tied_units(compressed)
    records = {unit: _record(weights, unit) for unit in units if unit in compressed}
    metadata = {
        "llmpalette": _version(),
        "description": f"{spec.architecture} decoder exported by llmpalette: iOS18, float16, KV cache as states; "
                       f"functions {' and '.join(FUNCTIONS)}",
        **{k: v for k, v in (job or {}).items() if k != "units"},
        "architecture": spec.architecture,
        "layers": spec.layers,
        "hidden": spec.hidden,
        "vocab": spec.vocab,
        "context_length": shape.context_length,
        "prefill_length": shape.prefill_length,
        "vocab_parts": vocab_chunks(spec.vocab, shape.vocab_limit),
        "mask_value": MASK_VALUE,
        "inputs": {"input_ids": "int32 [1, S]", "position_ids": "int32 [S], absolute positions",
                   "causal_mask": f"float16 [1, 1, S, {shape.context_length}]: 0 visible, {MASK_VALUE} hidden"},
        "weights": records,
    }
    log.info("export: writing %s (prefill and decode, weights shared)", out)
    save_package(programs, out, default_function="decode", metadata=metadata)
    notes = {unit: tuple(weights.written[weights.written_as[unit]].notes) for unit in records
             if weights.written[weights.written_as[unit]].notes}
    kinds = {kind: sum(r["kind"] == kind for r in records.values()) for kind in {r["kind"] for r in records.values()}}
    return ExportResult(package=out, bytes=package_bytes(out), spec=spec, shape=shape, compressed=len(records),
                        kinds=kinds, notes=notes)


def _tied_units(compressed: dict[str, CompressedWeight]) -> dict[str, list[str]]:
    """Module names sharing one weight object, under the first of them (a tied embedding and head are one unit)."""
    units: dict[str, list[str]] = {}
    lead: dict[int, str] = {}
    for name, weight in compressed.items():
        units.setdefault(lead.setdefault(id(weight), name), []).append(name)
    return units


def _record(weights: ProgramWeights, unit: str) -> dict:
    """Where a unit is in the program: `var` holds its dense value, `op` (a `kind` op) its stored form."""
    module = weights.written_as[unit]
    written = weights.written[module]
    var = var_name(module)
    if isinstance(written, CoreMLQuantized):
        return {"var": var, "op": var, "kind": "quantized", "rank": len(written.shape), "n_bits": written.n_bits,
                "notes": list(written.notes)}
    op = var if written.outlier_mask is None else f"{var}_palettized"
    return {"var": var, "op": op, "kind": "lut", "rank": len(written.shape), "n_bits": written.n_bits,
            "notes": list(written.notes)}


def _version() -> str:
    try:
        return package_metadata.version("llmpalette")
    except package_metadata.PackageNotFoundError:
        return "unknown"
