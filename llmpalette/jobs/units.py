"""A unit's files and manifest record: one layer file per compressed unit, written atomically, and the
record that names it with its sha256, config and metrics. Every stage writes its units through
`write_unit`, and every reader of a finished job reads them through `read_unit`."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llmpalette.errors import JobError
from llmpalette.jobs.files import atomic_write_file
from llmpalette.jobs.manifest import Manifest
from llmpalette.layout.layer_file import LayerFile, layer_file_bytes, read_layer_file

LAYERS = "layers"


def layer_path(unit_name: str) -> str:
    return f"{LAYERS}/{unit_name}.safetensors"


def write_unit(job_dir: Path, planned, compressed, metrics: dict[str, Any], *, seconds: float) -> dict[str, Any]:
    """Write `compressed` (the unit's PalettizedWeight or QuantizedWeight) to its layer file; returns the
    unit's manifest record. `planned`: the PlannedUnit (unit and config)."""
    unit = planned.unit
    rel = layer_path(unit.name)
    layer = LayerFile(module=unit.name, param=unit.param, aliases=unit.aliases, weight=compressed)
    file_record = atomic_write_file(Path(job_dir) / rel, layer_file_bytes(layer))
    return {
        "status": "done",
        "param": unit.param,
        "names": list(unit.names),
        "module_type": unit.module_type,
        "shape": list(unit.shape),
        "config": planned.config.as_dict(),
        "files": {rel: file_record},
        "metrics": {**metrics, "nbytes": compressed.nbytes, "fp16_bytes": math.prod(unit.shape) * 2, "seconds": round(seconds, 4)},
    }


def read_unit(manifest: Manifest, index: int, name: str):
    """A finished unit's compressed weight, after checking its files against the manifest."""
    problem = manifest.unit_problem(index, name)
    if problem:
        raise JobError(f"job {manifest.job_dir}: unit '{name}': {problem}; run `llmpalette compress RECIPE --job-dir "
                       f"{manifest.job_dir} --resume` to redo it")
    (rel,) = manifest.units(index)[name]["files"]
    return read_layer_file(manifest.job_dir / rel).weight
