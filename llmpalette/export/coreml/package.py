"""The `.mlpackage` on disk: written from MIL programs, read back for checks, with llmpalette's metadata.

Writing: each function is converted on its own (Core ML Tools, an empty pass pipeline: the program is
saved exactly as built, nothing re-clustered, fused or cast), then Core ML Tools' `save_multifunction`
merges them into one package and deduplicates equal constants across functions, so prefill and
decode share one copy of every weight. The result is renamed into place only when complete.

Reading: the spec, the program as Core ML Tools' milproto loader gives it back, the metadata
llmpalette wrote, and the raw bytes of any blob in `weights/weight.bin` (to check that a LUT's packed
indices are the job's bytes).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

from llmpalette.jobs.files import TMP_MARK

METADATA_KEY = "com.github.llmpalette.export"
_MODEL_FILE = Path("Data/com.apple.CoreML/model.mlmodel")
_WEIGHTS_DIR = Path("Data/com.apple.CoreML/weights")
_BLOB_SENTINEL = 0xDEADBEEF


def coremltools():
    """Core ML Tools, imported with its import-time warnings (no runtime on Linux, untested torch) silenced."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import coremltools as ct
    finally:
        logger.setLevel(level)
    return ct


@contextlib.contextmanager
def _quiet():
    """Core ML Tools draws a progress bar for every pass pipeline; keep them off the user's terminal."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def save_package(functions: dict, out: Path, *, default_function: str, metadata: dict) -> None:
    """Write the MIL programs in `functions` (name -> single-function `Program`) as one iOS18 package.

    `metadata` (JSON-able) is stored under `METADATA_KEY` in the model's user-defined metadata.
    """
    ct = coremltools()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}{TMP_MARK}{os.getpid()}.mlpackage")
    shutil.rmtree(tmp, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}{TMP_MARK}") as parts, _quiet():
        descriptor = ct.utils.MultiFunctionDescriptor()
        for name, program in functions.items():
            path = str(Path(parts) / f"{name}.mlpackage")
            model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                               compute_precision=ct.precision.FLOAT16, pass_pipeline=ct.PassPipeline.EMPTY,
                               skip_model_load=True)
            model.save(path)
            descriptor.add_function(path, "main", name)
        descriptor.default_function_name = default_function
        ct.utils.save_multifunction(descriptor, str(tmp))
    _write_metadata(tmp, metadata)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _write_metadata(package: Path, metadata: dict) -> None:
    spec = load_spec(package)
    spec.description.metadata.author = "llmpalette"
    spec.description.metadata.shortDescription = metadata.get("description", "")
    spec.description.metadata.versionString = str(metadata.get("llmpalette", ""))
    spec.description.metadata.userDefined[METADATA_KEY] = json.dumps(metadata, sort_keys=True)
    (package / _MODEL_FILE).write_bytes(spec.SerializeToString())


def load_spec(package: str | Path):
    """The model spec (protobuf) of a saved package; ValueError naming it when it is not one."""
    package = Path(package)
    model_file = package / _MODEL_FILE
    if not model_file.is_file():
        raise ValueError(f"{package} is not an .mlpackage (no {_MODEL_FILE})")
    coremltools()  # first: quiet import
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString(model_file.read_bytes())
    return spec


def read_metadata(package: str | Path) -> dict:
    """What llmpalette recorded in the package (empty when another tool wrote it)."""
    raw = load_spec(package).description.metadata.userDefined.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def load_program(package: str | Path):
    """The package's MIL program, every function, as Core ML Tools' milproto loader reads it back."""
    coremltools()
    from coremltools.converters.mil.frontend.milproto import load as milproto

    spec = load_spec(package)
    with _quiet():
        return milproto.load(spec, spec.specificationVersion, str(Path(package) / _WEIGHTS_DIR))


def package_bytes(package: str | Path) -> int:
    """Size on disk of everything in the package."""
    return sum(p.stat().st_size for p in Path(package).rglob("*") if p.is_file())


def blob_offsets(spec, function: str, op_output: str) -> dict[str, int]:
    """{input name: offset in weight.bin} of the op producing `op_output` in `function` (inputs stored in the file)."""
    fn = spec.mlProgram.functions[function]
    for op in fn.block_specializations[fn.opset].operations:
        if any(o.name == op_output for o in op.outputs):
            return {name: arg.value.blobFileValue.offset
                    for name, value in op.inputs.items() for arg in value.arguments
                    if arg.HasField("value") and arg.value.HasField("blobFileValue")}
    raise KeyError(f"{function}: no op produces {op_output!r}")


def read_blob(package: str | Path, offset: int) -> bytes:
    """The stored bytes of the blob whose header is at `offset` in the package's weight.bin (packed as saved)."""
    with open(Path(package) / _WEIGHTS_DIR / "weight.bin", "rb") as f:
        f.seek(offset)
        sentinel, _dtype, size, data_offset = struct.unpack("<IIQQ", f.read(24))
        if sentinel != _BLOB_SENTINEL:
            raise ValueError(f"{package}: no weight blob at offset {offset} of weight.bin")
        f.seek(data_offset)
        return f.read(size)
