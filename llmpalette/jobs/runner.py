"""Recipe -> stages -> units -> files, resumable.

One unit is one weight tensor (tied names share a unit). Units are dealt round-robin to the ranks;
each rank writes its units' safetensors files atomically, the ranks gather their file records after
every round, and rank 0 alone rewrites the manifest. A killed job leaves at worst a temporary file
(removed on resume) and units whose files are not yet in the manifest (redone, byte-identically,
because every unit's maths is deterministic).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmpalette import distributed
from llmpalette.distributed import World
from llmpalette.errors import JobError, LlmpaletteError
from llmpalette.jobs.files import atomic_save_tensors, atomic_write_text, load_tensors, remove_temporaries
from llmpalette.jobs.manifest import Manifest
from llmpalette.layout.palettized import PalettizedWeight
from llmpalette.modules import get_weight
from llmpalette.palettization.post_training import PlannedUnit, palettize_weight, plan_units, relative_error
from llmpalette.recipe import DTYPES, Recipe
from llmpalette.sources.models import load_model, resolve_model

LAYERS = "layers"
# The manifest is rewritten at most this often while units finish (and always at a stage's end):
# a unit whose file is complete but not yet recorded is simply redone on resume, byte-identically.
MANIFEST_INTERVAL_S = 1.0


@dataclass(frozen=True)
class RunSummary:
    job_dir: Path
    units: int          # units in the plan
    computed: int       # units compressed in this run
    kept: int           # intact units from an earlier run, not redone
    seconds: float
    loaded: tuple | None = field(default=None, repr=False, compare=False)  # (model, tokenizer) as loaded, unmodified


def layer_path(unit_name: str) -> str:
    return f"{LAYERS}/{unit_name}.safetensors"


def run_job(
    recipe: Recipe,
    job_dir: str | Path,
    *,
    resume: bool = False,
    world: World | None = None,
    progress: bool = True,
    loaded: tuple | None = None,
) -> RunSummary:
    """Run (or resume) the compression stages of `recipe` into `job_dir`.

    `loaded`: (model, tokenizer) of the recipe's model if the caller has them; otherwise they are
    loaded once the job directory is known to be usable. Either way they are read, never modified,
    and returned in the summary for a caller that evaluates next.
    """
    world = world or World(0, 1, torch.device("cpu"))
    job_dir = Path(job_dir)
    started = time.perf_counter()
    source = resolve_model(recipe.model)
    manifest = _open_manifest(recipe, job_dir, source.identity() if world.is_main else None, resume, world)
    loaded = loaded or load_model(source, dtype=DTYPES[recipe.dtype])
    model = loaded[0]
    computed = kept = 0
    total = 0
    for index, stage in enumerate(recipe.stages):
        plan = plan_units(model, stage.config)
        total += len(plan)
        if world.is_main:
            manifest.stage(index, name=f"{index}-{stage.algorithm}", algorithm=stage.algorithm)
            manifest.set_stage_status(index, "running")
            manifest.save()
        c, k = _run_stage(model, plan, index, recipe, manifest, world, progress)
        computed, kept = computed + c, kept + k
        if world.is_main:
            manifest.set_stage_status(index, "done")
            manifest.save()
    distributed.barrier()
    return RunSummary(job_dir, total, computed, kept, time.perf_counter() - started, loaded)


def _open_manifest(recipe: Recipe, job_dir: Path, identity: dict | None, resume: bool, world: World) -> Manifest:
    """Rank 0 creates or checks the manifest; every rank gets it (or the same error)."""
    problem, data = None, None
    if world.is_main:
        try:
            manifest = _prepare(recipe, job_dir, identity, resume, world)
            data = manifest.data
        except LlmpaletteError as e:
            problem = str(e)
    problem, data = distributed.broadcast((problem, data))
    if problem:
        raise JobError(problem)
    return Manifest(job_dir, data)


def _prepare(recipe: Recipe, job_dir: Path, identity: dict, resume: bool, world: World) -> Manifest:
    if Manifest.exists(job_dir):
        if not resume:
            raise JobError(f"{job_dir} already holds a job; pass --resume to continue it, or choose another --job-dir")
        manifest = Manifest.load(job_dir)
        if manifest.data["recipe_sha256"] != recipe.sha256:
            old = Recipe.from_dict(manifest.data["recipe"])
            fields = ", ".join(recipe.differences(old)) or "the recipe"
            raise JobError(
                f"cannot resume {job_dir}: the recipe changed ({fields} differ from the job's recipe.yaml); "
                "results of two recipes are never mixed: use a new --job-dir, or resume with the same recipe"
            )
        if _fingerprint(manifest.data["model"]) != _fingerprint(identity):
            raise JobError(f"cannot resume {job_dir}: the model '{recipe.model}' is not the one this job started with (its fingerprint changed)")
        remove_temporaries(job_dir)
    else:
        manifest = Manifest.create(job_dir, recipe=recipe.as_dict(), recipe_sha256=recipe.sha256, model=identity, world_size=world.world_size)
        atomic_write_text(job_dir / "recipe.yaml", recipe.to_yaml())
    manifest.start_run(world.world_size, resumed=resume)
    manifest.save()
    return manifest


def _fingerprint(identity: dict) -> dict:
    """A model identity without where it lies: the same file moved or on another machine is the same model."""
    return {key: value for key, value in identity.items() if key != "location"}


def _run_stage(model, plan: list[PlannedUnit], index: int, recipe: Recipe, manifest: Manifest, world: World, progress: bool) -> tuple[int, int]:
    bar = tqdm(total=len(plan), desc=f"stage {index} {recipe.stages[index].algorithm}", unit="layer", disable=not (progress and world.is_main))
    computed = kept = 0
    last_save = time.monotonic()
    for first in range(0, len(plan), world.world_size):
        mine = first + world.rank
        result = _do_unit(model, plan[mine], index, recipe, manifest) if mine < len(plan) else None
        results = distributed.all_gather(result)
        for r in results:
            if r is None:
                continue
            name, record = r
            if record is None:
                kept += 1
            else:
                computed += 1
                if world.is_main:
                    manifest.record_unit(index, name, record)
        if world.is_main and time.monotonic() - last_save > MANIFEST_INTERVAL_S:
            manifest.save()
            last_save = time.monotonic()
        bar.update(sum(r is not None for r in results))
    bar.close()
    return computed, kept


def _do_unit(model, planned: PlannedUnit, index: int, recipe: Recipe, manifest: Manifest) -> tuple[str, dict | None]:
    """Compress one unit unless it is intact on disk; returns (name, new manifest record or None if kept)."""
    unit = planned.unit
    if manifest.unit_problem(index, unit.name) is None:
        return unit.name, None
    started = time.perf_counter()
    weight = get_weight(model, unit)
    palettized = palettize_weight(weight, planned.config, seed=recipe.seed)
    decoded = palettized.decode()
    rel = layer_path(unit.name)
    file_record = atomic_save_tensors(
        manifest.job_dir / rel,
        palettized.to_tensors(unit.param),
        {**palettized.metadata(unit.param), "module": unit.name, "aliases": ",".join(unit.aliases)},
    )
    record = {
        "status": "done",
        "param": unit.param,
        "names": list(unit.names),
        "module_type": unit.module_type,
        "shape": list(unit.shape),
        "config": planned.config.as_dict(),
        "files": {rel: file_record},
        "metrics": {
            "rel_sq_error": relative_error(weight, decoded),
            "nbytes": palettized.nbytes,
            "fp16_bytes": weight.numel() * 2,
            "seconds": round(time.perf_counter() - started, 4),
        },
    }
    return unit.name, record


def read_unit(manifest: Manifest, index: int, name: str) -> PalettizedWeight:
    """A finished unit's compressed weight, after checking its files against the manifest."""
    problem = manifest.unit_problem(index, name)
    if problem:
        raise JobError(f"job {manifest.job_dir}: unit '{name}': {problem}; run `llmpalette compress RECIPE --job-dir {manifest.job_dir} --resume` to redo it")
    record = manifest.units(index)[name]
    (rel,) = record["files"]
    tensors, metadata = load_tensors(manifest.job_dir / rel)
    return PalettizedWeight.from_tensors(tensors, metadata, record["param"])
