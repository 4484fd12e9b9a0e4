"""A stage's statistics step: Fisher sensitivities over the calibration samples, checkpointed in stats/.

The maths and the rank choreography live in `llmpalette.calibration.fisher`; this file streams the
samples, keeps the checkpoints and draws the progress bar. A checkpoint is every layer's running total
after a whole number of shards, one safetensors file per layer, in `stats/STAGE-fisher/sNNNNN/`
(NNNNN = shards done); the manifest names the newest complete checkpoint with every file's sha256,
and older checkpoint folders are deleted only after the manifest names the new one. A checkpoint is
written when the compute since the last one is at least `CHECKPOINT_COST` times what writing the last
one took (so checkpoints cost at most about 1/CHECKPOINT_COST of the time), and always at the end.

A killed job resumes from the newest recorded checkpoint and recomputes the shards after it; the sums
are the same bits as an uninterrupted run because every shard's sum and every fold is the same. A
checkpoint whose file is missing or corrupt is refused and the step starts again from shard 0.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from llmpalette import distributed
from llmpalette.calibration.fisher import ShardPlan, causal_lm_loss, fisher_sums
from llmpalette.calibration.sharded import fisher_sums_sharded, fsdp_requested
from llmpalette.distributed import World
from llmpalette.errors import JobError
from llmpalette.jobs.files import atomic_write_file
from llmpalette.jobs.manifest import Manifest
from llmpalette.modules import get_weight
from llmpalette.sources.text import calibration_windows

log = logging.getLogger("llmpalette")

STATS = "stats"
CHECKPOINT_COST = 4.0
TENSOR = "fisher"


@dataclass(frozen=True)
class FisherStats:
    """The finished sensitivities of a stage, read one layer at a time."""

    manifest: Manifest
    index: int

    def sensitivity(self, unit_name: str) -> torch.Tensor:
        record = self.manifest.stats(self.index)
        rel = _file(record["folder"], record["shards_done"], unit_name)
        if rel not in record["files"]:
            raise JobError(f"job {self.manifest.job_dir}: no sensitivity recorded for '{unit_name}'")
        problem = self.manifest.files_problem({rel: record["files"][rel]})
        if problem:
            raise JobError(f"job {self.manifest.job_dir}: sensitivities: {problem}; resume the job to recompute them")
        return load_file(str(self.manifest.job_dir / rel))[TENSOR]


def _file(folder: str, shards_done: int, unit_name: str) -> str:
    return f"{folder}/s{shards_done:05d}/{unit_name}.safetensors"


def fisher_stage(model, plan, index: int, stage, data, tokenizer, manifest: Manifest, world: World, progress: bool) -> FisherStats:
    """Compute (or finish) the Fisher sums of the stage's units; returns a reader of the totals.

    `stage.config` carries calibration_nsamples, calibration_shard_size and gradient_checkpointing;
    `data` the text and seq_len. Every rank calls this together.
    """
    config = stage.config
    shards = ShardPlan(config.calibration_nsamples, config.calibration_shard_size, world.world_size)
    folder = f"{STATS}/{index}-fisher"
    params = {p.unit.name: get_weight(model, p.unit) for p in plan}
    owners = distributed.owners_by_size({name: p.numel() for name, p in params.items()}, world.world_size)
    start, seconds = distributed.broadcast(_resume_point(manifest, index, folder, shards) if world.is_main else None)
    if start == shards.shards:
        return _finished(manifest, index, world)
    totals = None
    if start:
        totals = {name: load_file(str(manifest.job_dir / _file(folder, start, name)))[TENSOR]
                  for name, owner in owners.items() if owner == world.rank}
        if world.is_main:
            log.info("sensitivities: resuming after %d of %d shards", start, shards.shards)
    elif world.is_main:
        shutil.rmtree(manifest.job_dir / folder, ignore_errors=True)  # leftovers of a run that recorded nothing
    distributed.barrier()

    sharded = world.world_size > 1 and fsdp_requested()
    if sharded and world.is_main:  # before the progress bar, so the line is not glued onto it
        log.info("sensitivities: the model is sharded over %d ranks with FSDP", world.world_size)
    done_before = shards.samples(start - 1).stop if start else 0
    bar = tqdm(total=shards.count, initial=done_before, desc=f"stage {index} {stage.algorithm} sensitivities",
               unit="sample", disable=not (progress and world.is_main))
    mine = lambda i: shards.shard_of(i) >= start and shards.rank_of_sample(i, sharded) == world.rank  # noqa: E731
    samples = calibration_windows(tokenizer, data.text, seq_len=data.seq_len, count=shards.count, wanted=mine)
    checkpoint = _Checkpointer(manifest, index, folder, shards, world, seconds)

    def on_round(shards_done: int, owned) -> None:
        bar.n = shards.samples(shards_done - 1).stop
        bar.refresh()
        checkpoint.maybe_write(shards_done, owned)

    run = fisher_sums_sharded if sharded else fisher_sums
    run(model, samples, causal_lm_loss, params, shards, world, owners=owners, totals=totals, start_shard=start,
        gradient_checkpointing=config.gradient_checkpointing, on_round=on_round, on_sample=lambda i: bar.update(1))
    bar.close()
    if world.is_main:
        total = manifest.stats(index)["seconds"]
        earlier = f" ({seconds:.1f} s of it in earlier runs)" if start else ""
        log.info("sensitivities: %d samples of %d tokens in %.1f s%s", shards.count, data.seq_len, total, earlier)
    return _finished(manifest, index, world)


def _finished(manifest: Manifest, index: int, world: World) -> FisherStats:
    """The reader of the finished sums; every rank's manifest learns rank 0's record of them."""
    record = distributed.broadcast(manifest.stats(index) if world.is_main else None)
    if not world.is_main:
        manifest.record_stats(index, record)
    return FisherStats(manifest, index)


def _resume_point(manifest: Manifest, index: int, folder: str, shards: ShardPlan) -> tuple[int, float]:
    """(shards already summed in an intact checkpoint, seconds spent on them); (0, 0.0) to start over."""
    record = manifest.stats(index)
    if not record:
        return 0, 0.0
    if record.get("shards") != shards.shards or record.get("folder") != folder:
        log.warning("redone sensitivities: the recorded checkpoint does not match this stage")
        return 0, 0.0
    problem = manifest.files_problem(record.get("files", {}))
    if problem:
        log.warning("redone sensitivities from the first sample: %s", problem)
        manifest.record_stats(index, None)
        manifest.save()
        return 0, 0.0
    _remove_other_checkpoints(manifest.job_dir / folder, record["shards_done"])
    if record["shards_done"] == shards.shards:
        log.info("sensitivities: all %d samples were summed in an earlier run; using them", shards.count)
    return record["shards_done"], float(record.get("seconds", 0.0))


def _remove_other_checkpoints(folder: Path, keep: int) -> None:
    if folder.is_dir():
        for child in folder.iterdir():
            if child.name != f"s{keep:05d}":
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()


class _Checkpointer:
    """Writes owned totals after a round when it is worth it; rank 0 records them and drops the old."""

    def __init__(self, manifest: Manifest, index: int, folder: str, shards: ShardPlan, world: World, seconds: float):
        self.manifest, self.index, self.folder, self.shards, self.world = manifest, index, folder, shards, world
        self.seconds = seconds  # compute seconds in earlier runs and up to the last checkpoint
        self.since = time.perf_counter()
        self.last_write = 0.0

    def maybe_write(self, shards_done: int, owned) -> None:
        """`owned()` returns this rank's totals (under FSDP it gathers them: every rank calls it or none)."""
        computed = time.perf_counter() - self.since
        final = shards_done == self.shards.shards
        write = distributed.broadcast(final or computed >= CHECKPOINT_COST * self.last_write)
        if not write:
            return
        started = time.perf_counter()
        files = {}
        for name, total in owned().items():
            rel = _file(self.folder, shards_done, name)
            files[rel] = atomic_write_file(self.manifest.job_dir / rel, safetensors_bytes({TENSOR: total.detach().cpu().contiguous()}))
        gathered = distributed.all_gather(files)
        self.seconds += time.perf_counter() - self.since  # compute and this checkpoint's writing
        if self.world.is_main:
            all_files = {rel: meta for part in gathered for rel, meta in sorted(part.items())}
            self.manifest.record_stats(self.index, {
                "kind": "fisher", "folder": self.folder, "samples": self.shards.count, "shard_size": self.shards.shard_size,
                "shards": self.shards.shards, "shards_done": shards_done, "seconds": round(self.seconds, 3),
                "files": dict(sorted(all_files.items())),
            })
            self.manifest.save()
            _remove_other_checkpoints(self.manifest.job_dir / self.folder, shards_done)
        distributed.barrier()
        self.last_write = time.perf_counter() - started
        self.since = time.perf_counter()
