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

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmpalette import distributed
from llmpalette.distributed import World
from llmpalette.errors import ConfigError, JobError, LlmpaletteError, SourceError
from llmpalette.jobs.files import atomic_replace_dir, atomic_write_text, remove_temporaries
from llmpalette.jobs.lock import LOCK, JobLock
from llmpalette.jobs.manifest import Manifest
from llmpalette.modules import WeightUnit, get_weight
from llmpalette.jobs.layerwise import layerwise_stage
from llmpalette.jobs.statistics import FisherStats, fisher_stage
from llmpalette.jobs.units import layer_path, read_unit, write_unit  # noqa: F401 (layer_path, read_unit: public here too)
from llmpalette.palettization.post_training import Plan, PlannedUnit, relative_error
from llmpalette.recipe import ALGORITHMS, DTYPES, Recipe
from llmpalette.memory import return_freed_memory
from llmpalette.sources.lazy import WeightReader, empty_model
from llmpalette.sources.models import load_model, load_tokenizer, resolve_model
from llmpalette.sources.text import build_windows, check_calibration_text, check_text_source

log = logging.getLogger("llmpalette")

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
    loaded: tuple | None = field(default=None, repr=False, compare=False)  # (model, tokenizer or None), unmodified; None when not kept


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
        job_dir: the job directory; created with its lock (`JOB/.lock`) and removed again if a check fails.
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
    job_dir = Path(job_dir)
    lock = JobLock(job_dir)
    _agreed(world, lock.acquire)  # rank 0 alone holds it, from before its first look at the folder to the job's end
    try:
        return _run_job(recipe, job_dir, resume, world, progress, loaded, evaluate)
    finally:
        lock.release()  # a no-op on the ranks that do not hold it


def _run_job(recipe: Recipe, job_dir: Path, resume: bool, world: World, progress: bool, loaded: tuple | None,
             evaluate: bool) -> RunSummary:
    return_freed_memory()
    started = time.perf_counter()
    source = resolve_model(recipe.model)
    identity = _agreed(world, lambda: _check_job_dir(recipe, job_dir, source.identity(), resume))
    _agreed(world, lambda: _check_text(recipe, evaluate))
    given = loaded is not None
    model, tokenizer, reader = _load(recipe, source, loaded)
    loaded = loaded if given or reader is not None else (model, tokenizer)
    if any(ALGORITHMS[stage.algorithm].layerwise for stage in recipe.stages):
        # a layerwise stage runs the blocks on its compressed weights: never on the caller's model
        model = copy.deepcopy(model) if given else model
        loaded = loaded if given else (None, tokenizer)
    if reader is not None:
        loaded = (None, tokenizer)
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
        algorithm = ALGORITHMS[stage.algorithm]
        if algorithm.layerwise:
            c, k, r = layerwise_stage(model, plan, index, recipe, tokenizer, manifest, world, progress, reader)
        else:
            stats = None
            if algorithm.statistic == "sensitivity" and _agreed(world, lambda: _units_to_do(manifest, index, plan)):
                stats = fisher_stage(model, plan, index, stage, recipe.data, tokenizer, manifest, world, progress)
            c, k, r = _run_stage(_weights(model, reader, recipe), plan, index, recipe, manifest, world, progress, stats)
        computed, kept, redone = computed + c, kept + k, redone + r
        if world.is_main:
            manifest.set_stage_status(index, "done")
            manifest.save()
    distributed.barrier()
    total = sum(len(plan) for plan in plans)
    if loaded[0] is None:  # the model was compressed in place: the caller must load it again
        loaded = None
    return RunSummary(job_dir, total, computed, kept, time.perf_counter() - started, tuple(redone), loaded)


def _load(recipe: Recipe, source, loaded: tuple | None):
    """(model, tokenizer, reader): the caller's model; or, when every stage takes one unit's or block's
    weights at a time and the model's files allow it, a skeleton model (parameters on the meta device)
    and a `WeightReader` of its files; else the whole model, loaded."""
    if loaded is not None:
        return *loaded, None
    dtype = DTYPES[recipe.dtype]
    why = None
    if all(ALGORITHMS[stage.algorithm].lazy_weights for stage in recipe.stages):
        try:
            reader = WeightReader(source)
            return empty_model(reader.config, dtype), load_tokenizer(source, recipe.tokenizer), reader
        except SourceError as e:
            why = e
    loaded = load_model(source, dtype=dtype, tokenizer=recipe.tokenizer)  # its own error when the model cannot load
    if why is not None:
        log.info("loaded the whole model: its weights cannot be read one at a time (%s)", why)
    return *loaded, None


def _agreed(world: World, check):
    """Run `check` on rank 0; every rank gets its result, or raises the same error."""
    problem, result = None, None
    if world.is_main:
        try:
            result = check()
        except ConfigError as e:
            problem = (ConfigError, (e.field, e.message, e.source))
        except LlmpaletteError as e:
            problem = (type(e), (str(e),))
    problem, result = distributed.broadcast((problem, result))
    if problem:
        kind, args = problem
        raise kind(*args)
    return result


def _check_job_dir(recipe: Recipe, job_dir: Path, identity: dict, resume: bool) -> dict:
    """Refuse what cannot run before anything is loaded; returns the model identity for the manifest."""
    if not Manifest.exists(job_dir):
        # Only what a start killed before its first manifest leaves may be there (recipe.yaml, tokenizer/).
        foreign = [p.name for p in job_dir.iterdir() if p.name not in ("recipe.yaml", TOKENIZER_DIR, LOCK)
                   and ".tmp-" not in p.name] if job_dir.is_dir() else []
        if foreign:
            raise JobError(f"--job-dir {job_dir} is a folder that holds other files ({', '.join(sorted(foreign)[:3])}"
                           f"{', ...' if len(foreign) > 3 else ''}) and no job; choose a new or empty folder")
        return identity
    if not resume:
        raise JobError(f"{job_dir} already holds a job; pass --resume to continue it, or choose another --job-dir")
    manifest = Manifest.load(job_dir)
    old = Recipe.from_dict(manifest.data["recipe"])
    changes = recipe.differences(old)  # empty for an old job whose stored hash still counted a runtime field
    if manifest.data["recipe_sha256"] != recipe.sha256 and changes:
        changes = "; ".join(changes)
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
                field = f"stages[{index}].config.calibration_nsamples"
                if stage.config.calibration_nsamples > 1 and not _one_window(tokenizer, recipe):
                    field = "data"  # not even one window: the text or seq_len is what is wrong, not the count
                raise ConfigError(field, str(e), recipe.source) from None
    if evaluate and recipe.evaluate.windows > 0:
        try:
            build_windows(tokenizer, recipe.data.text, seq_len=recipe.evaluate.seq_len, calibration_samples=0,
                          evaluation_windows=recipe.evaluate.windows)
        except SourceError as e:
            raise ConfigError("evaluate.windows", str(e), recipe.source) from None


def _one_window(tokenizer, recipe: Recipe) -> bool:
    try:
        check_calibration_text(tokenizer, recipe.data.text, seq_len=recipe.data.seq_len, count=1)
    except SourceError:
        return False
    return True


def _plan(model, config, index: int, recipe: Recipe) -> Plan:
    try:
        return ALGORITHMS[recipe.stages[index].algorithm].plan(model, config)
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


def _weights(model, reader: WeightReader | None, recipe: Recipe) -> Callable[[WeightUnit], torch.Tensor]:
    """A unit's weight: read from the model's files (a skeleton model), or the loaded model's parameter."""
    if reader is None:
        return lambda unit: get_weight(model, unit)
    return lambda unit: reader.read(f"{unit.name}.{unit.param}", DTYPES[recipe.dtype])


def _run_stage(weights: Callable[[WeightUnit], torch.Tensor], plan: list[PlannedUnit], index: int, recipe: Recipe, manifest: Manifest, world: World,
               progress: bool, stats: FisherStats | None) -> tuple[int, int, list[tuple[str, str]]]:
    bar = tqdm(total=len(plan), desc=f"stage {index} {recipe.stages[index].algorithm}", unit="layer",
               disable=not (progress and world.is_main))
    computed = kept = 0
    redone: list[tuple[str, str]] = []
    last_save = time.monotonic()
    for first in range(0, len(plan), world.world_size):
        mine = first + world.rank
        result = _do_unit(weights, plan[mine], index, recipe, manifest, stats) if mine < len(plan) else None
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


def _do_unit(weights: Callable[[WeightUnit], torch.Tensor], planned: PlannedUnit, index: int, recipe: Recipe, manifest: Manifest,
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
    weight = weights(unit)
    algorithm = ALGORITHMS[recipe.stages[index].algorithm]
    statistics = {} if stats is None else {"sensitivity": stats.sensitivity(unit.name)}
    compressed = algorithm.compress_unit(weight, planned.config, seed=recipe.seed, **statistics)
    decoded = compressed.decode()
    metrics = {"rel_sq_error": relative_error(weight, decoded)}
    if stats is not None:
        metrics["fisher_rel_sq_error"] = relative_error(weight, decoded, statistics["sensitivity"])
    if compressed.n_outliers:
        metrics["outliers"] = compressed.n_outliers
    record = write_unit(manifest.job_dir, planned, compressed, metrics, seconds=time.perf_counter() - started)
    return unit.name, record, why
