"""Layerwise compression, one decoder block at a time (GPTQ's sequential schedule; Core ML Tools'
`LayerwiseCompressor` runs the same outer loop), with the layer maths left to the caller.

1. The calibration samples' inputs to the first block are captured once (`calibration.hessians`).
2. For each block: its compressed linear layers are grouped by the input they read (q/k/v read the
   same normed states, o_proj the attention output, gate/up the same, down_proj the MLP product), in
   the order the block runs them. With `true_sequential` each group is compressed before the next
   group's Hessians are measured, so o_proj sees the inputs the quantized q/k/v produce (the GPTQ
   paper's true-sequential order); without it, every group is measured on the block's original
   inputs, as Core ML Tools does.
3. A group's Hessians are summed over the samples, shard by shard (the same bits for any number of
   ranks), each on the rank that owns the layer (owners balanced by Hessian size); the owner compresses
   the layer and broadcasts the decoded weight, so every rank goes on with identical weights.
4. The block's outputs under the compressed weights are the next block's inputs.

Only one block's activations and Hessians are in memory. Orchestration only: the caller's
`compress_layer` does the maths, and `on_block` may checkpoint.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from llmpalette import distributed
from llmpalette.calibration.hessians import BlockInput, capture_block_inputs, hessian_sums, mean_hessian, run_block
from llmpalette.calibration.sums import ShardPlan
from llmpalette.distributed import World

CompressLayer = Callable[[str, nn.Linear, torch.Tensor], tuple[object, torch.Tensor]]


@dataclass
class BlockResult:
    """What one block's compression produced on this rank: compressed forms of the layers it owns."""

    index: int
    name: str
    compressed: dict[str, object]


def input_groups(block: nn.Module, layers: Mapping[str, nn.Module], sample: BlockInput) -> list[list[str]]:
    """The block's layers grouped by the tensor they read, in the order the block first runs them (one
    forward of `sample`)."""
    order: list[tuple[int, str]] = []
    alive: list[torch.Tensor] = []  # held until the end, so no id is reused by a later tensor

    def seen(module, args, name):
        alive.append(args[0])
        order.append((id(args[0]), name))

    handles = [m.register_forward_pre_hook(lambda m, args, name=name: seen(m, args, name)) for name, m in layers.items()]
    try:
        run_block(block, sample)
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[int, list[str]] = {}
    for key, name in order:
        if name not in groups.setdefault(key, []):
            groups[key].append(name)
    seen = {n for g in groups.values() for n in g}
    missing = [n for n in layers if n not in seen]
    if missing:
        raise ValueError(f"layers {missing} did not run in a forward pass of their block")
    return list(groups.values())


def compress_layerwise(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    samples: Iterable[tuple[int, object]],
    plan: ShardPlan,
    world: World,
    *,
    select: Callable[[str, nn.Module], bool],
    compress_layer: CompressLayer,
    forward: Callable[[nn.Module, object], object],
    true_sequential: bool = True,
    start_block: int = 0,
    on_block: Callable[[BlockResult], None] | None = None,
    on_sample: Callable[[int], None] | None = None,
    device: torch.device | None = None,
    hold: Callable[[int], contextlib.AbstractContextManager] | None = None,
) -> list[BlockResult]:
    """Compress the selected Linear layers of `blocks` (name, module), in order; returns this rank's results.

    samples: this rank's calibration samples (index, sample), `plan.rank_of_sample(i) == world.rank`.
    select(name, module): whether a Linear (full name) is compressed.
    compress_layer(name, module, H): (compressed form, decoded weight) with H = XᵀX / tokens of its input.
    start_block: blocks before it are already compressed (resume): their current weights produce the
        inputs of this one.
    device: where each block runs (moved there for its turn, then back) and the activations live;
        None: where the model is.
    hold(b): a context in which block b's weights are in memory (b = -1: the model's weights outside the
        blocks, for catching the first block's inputs), for a model whose weights are read lazily;
        blocks before `start_block` must hold their compressed weights in it.
    """
    with one_thread():
        return _compress_layerwise(model, blocks, samples, plan, world, select, compress_layer, forward, true_sequential,
                                   start_block, on_block, on_sample, device, hold or (lambda b: contextlib.nullcontext()))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one CPU thread for the duration. A float matmul's bits depend on how many threads split its
    sums (measured: GPTQ's layer files differ between 2 threads and 1), so the layerwise pass always uses
    one: the same bytes for any machine's core count, any `OMP_NUM_THREADS` and any number of ranks (a
    launcher gives each rank one thread). It also avoids oversubscribed threads on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _compress_layerwise(model, blocks, samples, plan, world, select, compress_layer, forward, true_sequential,
                        start_block, on_block, on_sample, device, hold) -> list[BlockResult]:
    names = {id(m): n for n, m in model.named_modules()}
    mine = list(samples)
    with hold(-1):
        inputs = capture_block_inputs(model, blocks[0][1], mine, forward)
    if device is not None:
        inputs = [(i, x.to(device)) for i, x in inputs]
    for b in range(start_block):
        with hold(b), on_device(blocks[b][1], device):
            inputs = [(i, run_block(blocks[b][1], x)) for i, x in inputs]
    results = []
    for b in range(start_block, len(blocks)):
        block_name, block = blocks[b]
        with hold(b), on_device(block, device):
            result = _compress_block(b, block_name, block, names, inputs, plan, world, select, compress_layer,
                                     true_sequential, on_sample)
            results.append(result)
            if on_block is not None:
                on_block(result)
            if b + 1 < len(blocks):
                inputs = [(i, run_block(block, x)) for i, x in inputs]
    return results


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device | None) -> Iterator[None]:
    """Move `module` to `device` for the duration (nothing when None or already there)."""
    home = next(module.parameters(), torch.empty(0)).device
    if device is None or device == home:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to(home)


def _compress_block(b: int, block_name: str, block: nn.Module, names: dict[int, str], inputs: list, plan: ShardPlan,
                    world: World, select, compress_layer: CompressLayer, true_sequential: bool, on_sample) -> BlockResult:
    """Compress one block's selected layers group by group; every rank ends with the decoded weights."""
    layers = {names[id(m)]: m for m in block.modules() if isinstance(m, nn.Linear) and select(names[id(m)], m)}
    compressed: dict[str, object] = {}
    if not layers:
        return BlockResult(b, block_name, compressed)
    probe = inputs[0][1] if inputs else None
    groups = distributed.broadcast(input_groups(block, layers, probe) if world.is_main else None)
    if not true_sequential:
        groups = [[n for g in groups for n in g]]
    for group in groups:
        group_layers = {n: layers[n] for n in group}
        owners = distributed.owners_by_size({n: m.weight.shape[1] ** 2 for n, m in group_layers.items()}, world.world_size)
        sums = hessian_sums(block, group_layers, inputs, plan, world, owners=owners, on_sample=on_sample)
        for name, owner in owners.items():
            module = group_layers[name]
            decoded = None
            if owner == world.rank:
                compressed[name], decoded = compress_layer(name, module, mean_hessian(sums, name))
                decoded = decoded.to(device=module.weight.device, dtype=torch.float32).contiguous()
            if world.world_size > 1:
                decoded = distributed.broadcast_tensor(decoded, module.weight, owner)
            with torch.no_grad():
                module.weight.copy_(decoded.to(module.weight.dtype))
        del sums
    return BlockResult(b, block_name, compressed)
