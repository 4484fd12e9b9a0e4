"""Recipe -> stages -> units -> files, resumable.

One unit is one weight tensor (tied names share a unit). Everything that can be checked is checked
before the job directory is touched: the job directory's state (resume or not, same recipe, same
model), the text source, the model and tokenizer, and every stage's config against the model. Only
then is the manifest written. Units are dealt round-robin to the ranks; each rank writes its units'
layer files atomically, the ranks gather their file records after every round, and rank 0 alone
rewrites the manifest. A killed job leaves at worst a temporary file (removed on resume) and units
whose files are not yet in the manifest (redone, byte-identically, because every unit's maths is
deterministic).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmpalette import distributed
from llmpalette.distributed import World
from llmpalette.errors import ConfigError, JobError, LlmpaletteError, SourceError
from llmpalette.jobs.files import atomic_replace_dir, atomic_write_file, atomic_write_text, remove_temporaries
from llmpalette.jobs.manifest import Manifest
from llmpalette.layout.layer_file import LayerFile, layer_file_bytes, read_layer_file
from llmpalette.layout.palettized import PalettizedWeight
from llmpalette.modules import get_weight
from llmpalette.jobs.statistics import FisherStats, fisher_stage
from llmpalette.palettization.post_training import Plan, PlannedUnit, plan_units, relative_error
from llmpalette.recipe import ALGORITHMS, DTYPES, Recipe
from llmpalette.memory import return_freed_memory
from llmpalette.sources.models import load_model, resolve_model
from llmpalette.sources.text import build_windows, check_calibration_text, check_text_source

log = logging.getLogger("llmpalette")

LAYERS = "layers"
TOKENIZER_DIR = "tokenizer"
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
    redone: tuple[tuple[str, str], ...] = ()   # (unit, why) for units recorded earlier but redone now
    loaded: tuple | None = field(default=None, repr=False, compare=False)  # (model, tokenizer or None), unmodified


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
    evaluate: bool = True,
) -> RunSummary:
    """Run (or resume) the compression stages of `recipe` into `job_dir`.

    Args:
        recipe: the validated recipe.
        job_dir: the job directory; created only once every check has passed.
        resume: continue the job in `job_dir` (same compression settings, same model); without it an
            existing job is refused.
        world: this process's rank and world size (a world of one when None).
        progress: show progress bars (rank 0).
        loaded: (model, tokenizer or None) of the recipe's model if the caller has them; they are read,
            never modified, and returned in the summary for a caller that evaluates next.
        evaluate: the caller will evaluate the job next, so the evaluation text is checked up front.

    Example:
        summary = run_job(Recipe.from_yaml("recipes/smollm2-kmeans-4bit-g16.yaml"), "jobs/default")
    """
    world = world or World(0, 1, torch.device("cpu"))
    return_freed_memory()
    job_dir = Path(job_dir)
    started = time.perf_counter()
    source = resolve_model(recipe.model)
    identity = _agreed(world, lambda: _check_job_dir(recipe, job_dir, source.identity(), resume))
    _agreed(world, lambda: _check_text(recipe, evaluate))
    loaded = loaded or load_model(source, dtype=DTYPES[recipe.dtype], tokenizer=recipe.tokenizer)
    model, tokenizer = loaded
    if recipe.needs_text and tokenizer is None:
        raise JobError(f"{recipe.source or 'the recipe'}: its stages read calibration text, but model '{recipe.model}' "
                       "has no tokenizer; pass --tokenizer (or `tokenizer:` in the recipe)")
    _agreed(world, lambda: _check_text_length(recipe, tokenizer, evaluate))
    plans = [_plan(model, stage.config, index, recipe) for index, stage in enumerate(recipe.stages)]
    if world.is_main:
        for plan in plans:
            plan.log_skipped()
    manifest = Manifest(job_dir, _agreed(world, lambda: _open_manifest(recipe, job_dir, identity, resume, world, tokenizer).data))
    computed = kept = 0
    redone: list[tuple[str, str]] = []
    for index, (stage, plan) in enumerate(zip(recipe.stages, plans)):
        manifest.stage(index, name=f"{index}-{stage.algorithm}", algorithm=stage.algorithm)  # every rank's copy knows it
        if world.is_main:
            manifest.set_stage_status(index, "running")
            manifest.save()
        stats = None
        if ALGORITHMS[stage.algorithm].statistic == "sensitivity" and _agreed(world, lambda: _units_to_do(manifest, index, plan)):
            stats = fisher_stage(model, plan, index, stage, recipe.data, tokenizer, manifest, world, progress)
        c, k, r = _run_stage(model, plan, index, recipe, manifest, world, progress, stats)
        computed, kept, redone = computed + c, kept + k, redone + r
        if world.is_main:
            manifest.set_stage_status(index, "done")
            manifest.save()
    distributed.barrier()
    total = sum(len(plan) for plan in plans)
    return RunSummary(job_dir, total, computed, kept, time.perf_counter() - started, tuple(redone), loaded)


def _agreed(world: World, check):
    """Run `check` on rank 0; every rank gets its result, or raises the same error."""
    problem, result = None, None
    if world.is_main:
        try:
            result = check()
        except LlmpaletteError as e:
            problem = (type(e), str(e))
    problem, result = distributed.broadcast((problem, result))
    if problem:
        kind, message = problem
        raise ConfigError("", message) if kind is ConfigError else kind(message)
    return result


def _check_job_dir(recipe: Recipe, job_dir: Path, identity: dict, resume: bool) -> dict:
    """Refuse what cannot run before anything is loaded; returns the model identity for the manifest."""
    if job_dir.exists() and not job_dir.is_dir():
        raise JobError(f"--job-dir {job_dir} is a file, not a folder")
    if not Manifest.exists(job_dir):
        # Only what a start killed before its first manifest leaves may be there (recipe.yaml, tokenizer/).
        foreign = [p.name for p in job_dir.iterdir() if p.name not in ("recipe.yaml", TOKENIZER_DIR)
                   and ".tmp-" not in p.name] if job_dir.is_dir() else []
        if foreign:
            raise JobError(f"--job-dir {job_dir} is a folder that holds other files ({', '.join(sorted(foreign)[:3])}"
                           f"{', ...' if len(foreign) > 3 else ''}) and no job; choose a new or empty folder")
        return identity
    if not resume:
        raise JobError(f"{job_dir} already holds a job; pass --resume to continue it, or choose another --job-dir")
    manifest = Manifest.load(job_dir)
    if manifest.data["recipe_sha256"] != recipe.sha256:
        old = Recipe.from_dict(manifest.data["recipe"])
        changes = "; ".join(recipe.differences(old)) or "the recipe"
        raise JobError(
            f"cannot resume {job_dir}: the recipe compresses differently from the job's ({changes}); "
            "results of two recipes are never mixed: use a new --job-dir, or resume with the job's recipe.yaml"
        )
    if fingerprint(manifest.data["model"]) != fingerprint(identity):
        raise JobError(f"cannot resume {job_dir}: the model '{recipe.model}' is not the one this job started with "
                       f"({_describe(manifest.data['model'])}); its fingerprint differs")
    return identity


def _check_text(recipe: Recipe, evaluate: bool) -> None:
    """The text source must be readable when a stage or the evaluation after the job will read it."""
    if recipe.needs_text or (evaluate and recipe.evaluate.windows > 0):
        check_text_source(recipe.data.text)


def _units_to_do(manifest: Manifest, index: int, plan: Plan) -> bool:
    """Whether any unit of the stage still needs computing (a finished stage needs no statistics)."""
    todo = any(manifest.unit_problem(index, p.unit.name) for p in plan)
    if not todo:
        log.info("stage %d: every layer is done; its statistics are not needed", index)
    return todo


def _check_text_length(recipe: Recipe, tokenizer, evaluate: bool) -> None:
    """Enough text for every stage's calibration samples and for the evaluation windows, before any work."""
    if tokenizer is None:
        return
    for index, stage in enumerate(recipe.stages):
        if stage.needs_text:
            try:
                check_calibration_text(tokenizer, recipe.data.text, seq_len=recipe.data.seq_len,
                                       count=stage.config.calibration_nsamples)
            except SourceError as e:
                raise ConfigError(f"stages[{index}].config.calibration_nsamples", str(e), recipe.source) from None
    if evaluate and recipe.evaluate.windows > 0:
        try:
            build_windows(tokenizer, recipe.data.text, seq_len=recipe.evaluate.seq_len, calibration_samples=0,
                          evaluation_windows=recipe.evaluate.windows)
        except SourceError as e:
            raise ConfigError("evaluate.windows", str(e), recipe.source) from None


def _plan(model, config, index: int, recipe: Recipe) -> Plan:
    try:
        return plan_units(model, config)
    except ConfigError as e:
        raise ConfigError(f"stages[{index}].config.{e.field}" if e.field else f"stages[{index}].config", e.message, recipe.source) from None


def _open_manifest(recipe: Recipe, job_dir: Path, identity: dict, resume: bool, world: World, tokenizer) -> Manifest:
    """Create the job (manifest, recipe.yaml, tokenizer/) or reopen it for a resume."""
    if Manifest.exists(job_dir):
        manifest = Manifest.load(job_dir)
        for removed in remove_temporaries(job_dir):
            log.info("removed a temporary left by a killed run: %s", removed.relative_to(job_dir))
        # Same compression; where the model lies and the evaluation settings may have changed.
        manifest.data["recipe"] = recipe.as_dict()
        manifest.data["model"] = identity
    else:
        manifest = Manifest.create(job_dir, recipe=recipe.as_dict(), recipe_sha256=recipe.sha256, model=identity,
                                   world_size=world.world_size)
    atomic_write_text(job_dir / "recipe.yaml", recipe.to_yaml())
    if tokenizer is not None and not (job_dir / TOKENIZER_DIR).is_dir():
        atomic_replace_dir(job_dir / TOKENIZER_DIR, tokenizer.save_pretrained)
    manifest.start_run(world.world_size, resumed=resume)
    manifest.save()
    return manifest


def fingerprint(identity: dict) -> dict:
    """A model identity without where it lies: the same file moved, renamed or on another machine is the same model."""
    return {key: value for key, value in identity.items() if key not in ("location", "spec")}


def _describe(identity: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in identity.items() if k in ("kind", "spec", "file", "id", "location"))


def _run_stage(model, plan: list[PlannedUnit], index: int, recipe: Recipe, manifest: Manifest, world: World,
               progress: bool, stats: FisherStats | None) -> tuple[int, int, list[tuple[str, str]]]:
    bar = tqdm(total=len(plan), desc=f"stage {index} {recipe.stages[index].algorithm}", unit="layer",
               disable=not (progress and world.is_main))
    computed = kept = 0
    redone: list[tuple[str, str]] = []
    last_save = time.monotonic()
    for first in range(0, len(plan), world.world_size):
        mine = first + world.rank
        result = _do_unit(model, plan[mine], index, recipe, manifest, stats) if mine < len(plan) else None
        results = distributed.all_gather(result)
        for r in results:
            if r is None:
                continue
            name, record, why = r
            if record is None:
                kept += 1
                continue
            computed += 1
            if why is not None:
                redone.append((name, why))
                if world.is_main:
                    log.warning("redone %s: %s", name, why)
            if world.is_main:
                manifest.record_unit(index, name, record)
        if world.is_main and time.monotonic() - last_save > MANIFEST_INTERVAL_S:
            manifest.save()
            last_save = time.monotonic()
        bar.update(sum(r is not None for r in results))
    bar.close()
    return computed, kept, redone


def _do_unit(model, planned: PlannedUnit, index: int, recipe: Recipe, manifest: Manifest,
             stats: FisherStats | None) -> tuple[str, dict | None, str | None]:
    """Compress one unit unless it is intact on disk.

    Returns (name, new manifest record or None if kept, why an earlier record was not used or None).
    """
    unit = planned.unit
    problem = manifest.unit_problem(index, unit.name)
    if problem is None:
        return unit.name, None, None
    why = None if problem == "not done" else problem
    started = time.perf_counter()
    weight = get_weight(model, unit)
    algorithm = ALGORITHMS[recipe.stages[index].algorithm]
    statistics = {} if stats is None else {"sensitivity": stats.sensitivity(unit.name)}
    palettized = algorithm.compress_unit(weight, planned.config, seed=recipe.seed, **statistics)
    decoded = palettized.decode()
    metrics = {"rel_sq_error": relative_error(weight, decoded)}
    if stats is not None:
        metrics["fisher_rel_sq_error"] = relative_error(weight, decoded, statistics["sensitivity"])
    if palettized.n_outliers:
        metrics["outliers"] = palettized.n_outliers
    rel = layer_path(unit.name)
    layer = LayerFile(module=unit.name, param=unit.param, aliases=unit.aliases, weight=palettized)
    file_record = atomic_write_file(manifest.job_dir / rel, layer_file_bytes(layer))
    record = {
        "status": "done",
        "param": unit.param,
        "names": list(unit.names),
        "module_type": unit.module_type,
        "shape": list(unit.shape),
        "config": planned.config.as_dict(),
        "files": {rel: file_record},
        "metrics": {
            **metrics,
            "nbytes": palettized.nbytes,
            "fp16_bytes": weight.numel() * 2,
            "seconds": round(time.perf_counter() - started, 4),
        },
    }
    return unit.name, record, why


def read_unit(manifest: Manifest, index: int, name: str) -> PalettizedWeight:
    """A finished unit's compressed weight, after checking its files against the manifest."""
    problem = manifest.unit_problem(index, name)
    if problem:
        raise JobError(f"job {manifest.job_dir}: unit '{name}': {problem}; run `llmpalette compress RECIPE --job-dir "
                       f"{manifest.job_dir} --resume` to redo it")
    (rel,) = manifest.units(index)[name]["files"]
    return read_layer_file(manifest.job_dir / rel).weight
