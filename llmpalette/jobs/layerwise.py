"""A layerwise stage (GPTQ, LUT-GPTQ): decoder blocks in order, each block's layer files written and
recorded as soon as the block is done.

The maths and the rank choreography are `quantization.layerwise` (Hessians summed shard by shard on each
layer's owner, owners compress and broadcast); this file streams the calibration windows, writes the
files and the manifest, and resumes. A killed job resumes at the first block with a unit that is not
intact on disk: the blocks before it get their stored (decoded) weights, the calibration samples run
through them to rebuild that block's inputs, and it goes on as an uninterrupted run would, so the files
end the same bytes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

from tqdm.auto import tqdm

from llmpalette import distributed
from llmpalette.calibration.sums import ShardPlan
from llmpalette.distributed import World
from llmpalette.jobs.manifest import Manifest
from llmpalette.jobs.units import read_unit, write_unit
from llmpalette.modules import set_weight
from llmpalette.quantization.layerwise import BlockResult, compress_layerwise
from llmpalette.quantization.layerwise_compressor import compress_linear, model_forward
from llmpalette.sources.lazy import WeightReader, materialize, release
from llmpalette.sources.text import calibration_windows

log = logging.getLogger("llmpalette")


def layerwise_stage(model, plan, index: int, recipe, tokenizer, manifest: Manifest, world: World,
                    progress: bool, reader: WeightReader | None = None) -> tuple[int, int, list[tuple[str, str]]]:
    """Run (or finish) stage `index` of `recipe` over `plan`'s units; returns (computed, kept, redone)
    as the runner counts them. Every rank calls this together.

    reader: when given, `model` is a skeleton (parameters on the meta device) and each block's weights
    are read from the model's files for its turn only, so memory holds one block and the activations.
    """
    stage = recipe.stages[index]
    config = stage.config
    blocks = config.get_layers(model)
    block_of = {p.unit.name: _block_index(p.unit.name, blocks) for p in plan}
    problems = distributed.broadcast({p.unit.name: manifest.unit_problem(index, p.unit.name) for p in plan}
                                     if world.is_main else None)
    todo = [block_of[name] for name, problem in problems.items() if problem is not None]
    if not todo:
        log.info("stage %d: every layer is done", index) if world.is_main else None
        return 0, len(plan), []
    start = min(todo)
    kept = [p for p in plan if block_of[p.unit.name] < start]
    if start and world.is_main:
        log.info("stage %d: resuming at block %d of %d (%s)", index, start, len(blocks), blocks[start][0])

    configs = {p.unit.name: p for p in plan}
    order = {name: i for i, name in enumerate(configs)}  # records in model order, whichever rank wrote them
    shards = ShardPlan(config.calibration_nsamples, config.calibration_shard_size, world.world_size)
    samples = calibration_windows(tokenizer, recipe.data.text, seq_len=recipe.data.seq_len, count=shards.count,
                                  wanted=lambda i: shards.rank_of_sample(i) == world.rank)
    bar = tqdm(total=len(blocks), initial=start, desc=f"stage {index} {stage.algorithm}", unit="block",
               disable=not (progress and world.is_main))
    redone: list[tuple[str, str]] = []
    computed = 0

    def compress_layer(name, module, hessian):
        started = time.perf_counter()
        result = compress_linear(module.weight, hessian, configs[name].config, seed=recipe.seed)
        return (dataclasses.replace(result, decoded=None), (started, time.perf_counter())), result.decoded

    since = [time.perf_counter()]  # the block's passes: from the end of the last block's files to its own

    def on_block(result: BlockResult) -> None:
        nonlocal computed
        passes = time.perf_counter() - since[0] - _covered([span for _, span in result.compressed.values()])
        records = {}
        for name, (layer, (started, ended)) in result.compressed.items():
            records[name] = write_unit(manifest.job_dir, configs[name], layer.weight, layer.metrics, seconds=ended - started)
        gathered = {name: record for part in distributed.all_gather(records) for name, record in part.items()}
        for name in sorted(gathered, key=order.__getitem__):
            computed += 1
            problem = problems[name]
            if problem not in (None, "not done"):
                redone.append((name, problem))
            if world.is_main:
                _note_dampening(name, gathered[name], configs[name].config)
                manifest.record_unit(index, name, gathered[name])
        if world.is_main:
            manifest.add_pass_seconds(index, passes)
            manifest.save()
        bar.update(1)
        since[0] = time.perf_counter()

    @contextlib.contextmanager
    def hold(b: int):
        """Block b's weights in memory (read from the model's files when it is lazy); before `start`, the
        stored compressed ones, which produce the inputs of the first block still to do."""
        names = _parameters(model, blocks, b)
        if reader is not None:
            materialize(model, names, reader)
        try:
            for planned in kept:
                if block_of[planned.unit.name] == b:
                    set_weight(model, planned.unit, read_unit(manifest, index, planned.unit.name).decode())
            yield
        finally:
            if reader is not None:
                release(model, names)

    compress_layerwise(model, blocks, samples, shards, world, select=lambda name, m: name in configs,
                       compress_layer=compress_layer, forward=model_forward, true_sequential=config.true_sequential,
                       start_block=start, on_block=on_block, hold=hold,
                       device=world.device if world.device.type != "cpu" else None)  # NCCL: blocks on the rank's GPU
    bar.close()
    if world.is_main:
        for name, why in redone:
            log.warning("redone %s: %s", name, why)
    return computed, len(kept), redone


def _parameters(model, blocks: list[tuple[str, object]], b: int) -> list[str]:
    """The parameter names of block b, or for b = -1 those outside every block (embedding, final norm, head)."""
    if b >= 0:
        prefix = f"{blocks[b][0]}."
        return [n for n, _ in model.named_parameters() if n.startswith(prefix)]
    prefixes = tuple(f"{name}." for name, _ in blocks)
    return [n for n, _ in model.named_parameters() if not n.startswith(prefixes)]


def _block_index(unit_name: str, blocks: list[tuple[str, object]]) -> int:
    for b, (name, _) in enumerate(blocks):
        if unit_name.startswith(f"{name}."):
            return b
    raise ValueError(f"unit {unit_name} lies in no block")


def _note_dampening(name: str, record: dict, config) -> None:
    """GPTQ's documented fallback: a Hessian still singular after damping is damped 10x more; say so."""
    if "fallback" in record["metrics"]:
        log.warning("%s: %s", name, record["metrics"]["fallback"])
    used = record["metrics"].get("dampening")
    if used is not None and used > config.hessian_dampening * (1 + 1e-9):
        log.warning("%s: its Hessian was singular with hessian_dampening %g; GPTQ used %g (recorded in the report)",
                    name, config.hessian_dampening, used)


def _covered(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the (start, end) spans: the layers' maths ran on threads, so they overlap."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total
