"""A finished job as a model: the source model with every compressed weight decoded from the job's files."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmpalette.errors import JobError
from llmpalette.jobs.manifest import Manifest
from llmpalette.jobs.runner import TOKENIZER_DIR, read_unit
from llmpalette.recipe import DTYPES
from llmpalette.layout.palettized import PalettizedWeight
from llmpalette.sources.models import load_model


def compressed_weights(manifest: Manifest) -> dict[str, tuple[str, list[str], PalettizedWeight]]:
    """Last stage's units: module name -> (param, all tied names, compressed weight); checksums verified."""
    stages = manifest.data["stages"]
    if not stages or stages[-1]["status"] != "done":
        raise JobError(f"job {manifest.job_dir} is not finished; run `llmpalette compress RECIPE --job-dir {manifest.job_dir} --resume`")
    index = len(stages) - 1
    return {
        name: (record["param"], record["names"], read_unit(manifest, index, name))
        for name, record in manifest.units(index).items()
    }


def apply_job(model: nn.Module, manifest: Manifest) -> nn.Module:
    """Overwrite `model`'s compressed weights, in place, with their decoded values."""
    for name, (param, _, palettized) in compressed_weights(manifest).items():
        target = getattr(model.get_submodule(name), param)
        if tuple(target.shape) != tuple(palettized.shape):
            raise JobError(f"job {manifest.job_dir}: {name}.{param} has shape {list(target.shape)} in the model but {list(palettized.shape)} in the job")
        with torch.no_grad():
            target.copy_(palettized.decode().to(target.dtype))
    return model


def load_compressed(job_dir: str | Path, *, model: str | None = None, device: str | torch.device = "cpu"):
    """(model, tokenizer or None, manifest): the job's source model (or `model`, same architecture) with
    decoded weights, and the tokenizer the job saved (else the recipe's, else the model's own, else None)."""
    manifest = Manifest.load(Path(job_dir))
    compressed_weights(manifest)  # refuse an unfinished or corrupt job before loading anything
    recipe = manifest.data["recipe"]
    saved = Path(job_dir) / TOKENIZER_DIR
    tokenizer_spec = str(saved) if saved.is_dir() else recipe.get("tokenizer")
    base, tokenizer = load_model(model or recipe["model"], dtype=DTYPES[recipe["dtype"]], device=device, tokenizer=tokenizer_spec)
    return apply_job(base, manifest), tokenizer, manifest
