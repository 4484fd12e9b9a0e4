"""A finished job as a model: the source model with every compressed weight decoded from the job's files."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmpalette.errors import JobError
from llmpalette.jobs.manifest import Manifest
from llmpalette.jobs.runner import TOKENIZER_DIR, read_unit
from llmpalette.layout.palettized import PalettizedWeight
from llmpalette.recipe import DTYPES
from llmpalette.sources.models import load_model

Weights = dict[str, tuple[str, list[str], PalettizedWeight]]  # module name -> (param, tied names, weight)


def compressed_weights(manifest: Manifest) -> Weights:
    """Last stage's units: module name -> (param, all tied names, compressed weight).

    Raises JobError, before reading any layer, unless every stage of the recipe is done; then every
    unit's files are checked against their sha256 as they are read.
    """
    stages, planned = manifest.data["stages"], manifest.data["recipe"]["stages"]
    unfinished = [s["name"] for s in stages if s["status"] != "done"]
    unfinished += [f"{i}-{s['algorithm']}" for i, s in enumerate(planned) if i >= len(stages)]
    if unfinished or not stages:
        raise JobError(f"job {manifest.job_dir} is not finished (stage {', '.join(unfinished)} not done); "
                       f"run `llmpalette compress RECIPE --job-dir {manifest.job_dir} --resume` to finish it")
    index = len(stages) - 1
    return {
        name: (record["param"], record["names"], read_unit(manifest, index, name))
        for name, record in manifest.units(index).items()
    }


def apply_weights(model: nn.Module, weights: Weights, job_dir: Path) -> nn.Module:
    """Overwrite `model`'s compressed weights, in place, with the decoded values of `weights`."""
    for name, (param, _, palettized) in weights.items():
        target = getattr(model.get_submodule(name), param)
        if tuple(target.shape) != tuple(palettized.shape):
            raise JobError(f"job {job_dir}: {name}.{param} has shape {list(target.shape)} in the model but {list(palettized.shape)} in the job")
        with torch.no_grad():
            target.copy_(palettized.decode().to(target.dtype))
    return model


def apply_job(model: nn.Module, manifest: Manifest) -> nn.Module:
    """Overwrite `model`'s compressed weights, in place, with the job's decoded values."""
    return apply_weights(model, compressed_weights(manifest), manifest.job_dir)


def job_tokenizer(job_dir: Path, recipe: dict[str, Any]) -> str | None:
    """The tokenizer spec of a job: the copy it saved, else the recipe's, else None (the model's own)."""
    saved = Path(job_dir) / TOKENIZER_DIR
    return str(saved) if saved.is_dir() else recipe.get("tokenizer")


def load_compressed(job_dir: str | Path, *, model: str | None = None, device: str | torch.device = "cpu"):
    """(model, tokenizer or None, manifest): the job's source model (or `model`, same architecture) with
    decoded weights, and the job's tokenizer (see `job_tokenizer`)."""
    manifest = Manifest.load(Path(job_dir))
    weights = compressed_weights(manifest)  # an unfinished or corrupt job is refused before loading anything
    recipe = manifest.data["recipe"]
    base, tokenizer = load_model(model or recipe["model"], dtype=DTYPES[recipe["dtype"]], device=device,
                                 tokenizer=job_tokenizer(job_dir, recipe))
    return apply_weights(base, weights, manifest.job_dir), tokenizer, manifest
