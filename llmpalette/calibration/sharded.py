"""Fisher sums for a model that does not fit one rank: the forward and backward passes run on a copy of
the model sharded with FSDP (torch's `fully_shard`, FSDP2), so a rank's device holds 1/world_size of
the weights and of the sums, plus one wrapped block at a time.

FSDP sums gradients across ranks before a rank ever sees them (reduce-scatter), and the square of a
sum is not the sum of the squares, so the reduce-scatter is replaced (`set_custom_reduce_scatter`):
each rank squares its own sample's unsharded gradient in float32, sends every other rank the rows that
rank holds (all-to-all), and each rank adds the squares it receives into its rows of the sums one
sample at a time, in sample order, shards of `shard_size` summed apart and folded in shard order. That
is exactly the arithmetic of `fisher.fisher_sums` on one process, so the sums are the same bits for any
number of ranks, sharded or not (tested on CPU with gloo). Core ML Tools' FSDP path also squares before
the reduction, but then averages across workers with the collective, in the collective's order.

Samples are dealt one per rank per step (sample i to rank i % world_size): every rank runs forward and
backward together, as FSDP's all-gathers need. In a last step with fewer samples than ranks, the idle
ranks repeat rank 0's sample and their squares are not added.

The user's model is not touched: its sharded copy is built on the meta device, filled with each rank's
rows of the weights, and dropped at the end. The totals are then gathered, one layer at a time, to the
rank that owns each layer (as in the unsharded path). This module writes no file.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from llmpalette import distributed
from llmpalette.calibration.fisher import LossFn, ShardPlan, check_loss, set_checkpointing
from llmpalette.distributed import World

FSDP_ENV = "ACCELERATE_USE_FSDP"
WRAP_ENV = "FSDP_TRANSFORMER_CLS_TO_WRAP"


def fsdp_requested() -> bool:
    """True under `accelerate launch` with an FSDP config (`distributed_type: FSDP`)."""
    return os.environ.get(FSDP_ENV, "").lower() in ("1", "true", "yes")


def wrap_classes(model: nn.Module, policy: object = None) -> tuple[type, ...]:
    """The module classes that become their own FSDP unit: from `policy` (Core ML Tools'
    `ModuleWrapPolicy` or anything with `module_classes`, or an iterable of classes or class names),
    else from Accelerate's FSDP_TRANSFORMER_CLS_TO_WRAP, else the model's `_no_split_modules` (the
    decoder layer of a transformers model). A name that matches no module of the model is an error."""
    if policy is not None and hasattr(policy, "module_classes"):
        policy = policy.module_classes
    if policy is None and os.environ.get(WRAP_ENV):
        policy = [n.strip() for n in os.environ[WRAP_ENV].split(",") if n.strip()]
    if policy is None:
        policy = list(getattr(model, "_no_split_modules", None) or [])
    names = {p for p in policy if isinstance(p, str)}
    classes = {p for p in policy if isinstance(p, type)}
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    missing = names - {c.__name__ for c in found}
    if missing:
        raise ValueError(f"FSDP wrap classes {sorted(missing)} name no module of {type(model).__name__}")
    classes |= found
    if not classes:
        raise ValueError(f"no FSDP wrap classes for {type(model).__name__}: pass fsdp_auto_wrap_policy, or set "
                         "fsdp_transformer_layer_cls_to_wrap in the Accelerate config")
    return tuple(sorted(classes, key=lambda c: c.__name__))


class SquaresInSampleOrder:
    """FSDP2's reduce-scatter replaced for one FSDP unit (see the module docstring). FSDP asks it for
    the reduce-scatter input (world * S elements) and output (S); the output is always `self.total`, this
    rank's rows of the running sums, which FSDP then hands out as views (the sharded `.grad`s)."""

    def __init__(self, world_size: int, plan: ShardPlan):
        self.world_size, self.plan = world_size, plan
        self.total: torch.Tensor | None = None
        self.partial: torch.Tensor | None = None
        self.first_sample = 0  # the sample of rank 0 in this step
        self.active = 0  # ranks holding a real sample in this step
        self._next_is_output = False

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = int(torch.Size(size).numel())
        if not self._next_is_output:
            self._next_is_output = True
            return torch.empty(numel, dtype=dtype, device=device)
        self._next_is_output = False
        if dtype != torch.float32:
            raise RuntimeError(f"FSDP reduces gradients in {dtype}; the Fisher sums need float32 (reduce_dtype)")
        if self.total is None:
            self.total = torch.zeros(numel, dtype=dtype, device=device)
            if self.plan.shard_size > 1:
                self.partial = torch.zeros_like(self.total)
        elif self.total.numel() != numel:
            raise RuntimeError(f"FSDP unit changed its gradient size from {self.total.numel()} to {numel}")
        return self.total

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op, async_op: bool = False):
        if output_tensor is not self.total:
            raise RuntimeError("FSDP reduce-scatter output is not the sums buffer")
        squares = input_tensor.view(self.world_size, -1).square_()
        received = torch.empty_like(squares)
        dist.all_to_all_single(received, squares, group=group)
        for r in range(self.active):
            if self.partial is None:
                self.total.add_(received[r])
                continue
            sample = self.first_sample + r
            self.partial.add_(received[r])
            if sample == self.plan.samples(self.plan.shard_of(sample))[-1]:
                self.total.add_(self.partial)
                self.partial.zero_()
        return None


def sharded_copy(model: nn.Module, classes: tuple[type, ...], requires_grad: Iterable[str], device: torch.device) -> nn.Module:
    """A copy of `model` sharded with `fully_shard` over all ranks, holding this rank's rows of every
    weight; only the parameters named in `requires_grad` require gradients. `model` is not changed."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    wanted = set(requires_grad)
    named = dict(model.named_parameters(remove_duplicate=False))
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False) for p in named.values()}
    shadow = copy.deepcopy(model, memo)
    for name, p in shadow.named_parameters():
        p.requires_grad_(name in wanted)
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    units = [m for m in shadow.modules() if isinstance(m, classes)]
    if not units:
        raise ValueError(f"no module of {type(model).__name__} is one of the FSDP wrap classes {[c.__name__ for c in classes]}")
    for module in reversed(units):
        fully_shard(module, mp_policy=policy)
    # The modules outside the units (embedding, final norm, lm_head) stay whole on every rank: a few
    # percent of an LLM, and the chunked loss (`fisher.causal_lm_loss`) can then use lm_head directly,
    # exactly as one process does.
    buffers = dict(model.named_buffers())
    shadow.to_empty(device=device)
    world = dist.get_world_size()
    with torch.no_grad():
        for name, p in shadow.named_parameters():
            if not hasattr(p, "to_local"):
                p.copy_(named[name].detach())
                continue
            local = p.to_local()
            rows = -(-named[name].shape[0] // world) if named[name].dim() else 0
            start = dist.get_rank() * rows
            local.copy_(named[name].detach()[start : start + local.shape[0]])
        for name, b in shadow.named_buffers():
            b.copy_(buffers[name])
    return shadow


def fisher_sums_sharded(
    model: nn.Module,
    samples: Iterable[tuple[int, object]],
    loss_fn: LossFn,
    params: Mapping[str, nn.Parameter],
    plan: ShardPlan,
    world: World,
    *,
    owners: Mapping[str, int],
    totals: Mapping[str, torch.Tensor] | None = None,
    start_shard: int = 0,
    gradient_checkpointing: bool = False,
    wrap: object = None,
    on_round: Callable[[int, Callable[[], dict[str, torch.Tensor]]], None] | None = None,
    on_sample: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """`fisher.fisher_sums` under FSDP, with the same contract and the same bits.

    samples: this rank's samples (index i with i % world_size == rank, `ShardPlan.rank_of_sample(i,
        sharded=True)`) from sample `plan.samples(start_shard).start` on, in ascending order.
    params: the model's parameters to sum, by name (`model.named_parameters()` names).
    wrap: which modules become FSDP units (see `wrap_classes`).
    on_round(shards_done, owned): after each step that completes a shard; `owned()` gathers and returns
        the totals this rank owns (every rank must call it together, or none).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    by_model_name = {names[id(p)]: key for key, p in params.items()}
    shadow = sharded_copy(model, wrap_classes(model, wrap), by_model_name, world.device)
    if gradient_checkpointing and hasattr(shadow, "gradient_checkpointing_enable"):
        set_checkpointing(shadow, True)
        shadow.train()
    else:
        shadow.eval()
    comms = []
    for module in _fsdp_modules(shadow):
        comms.append(SquaresInSampleOrder(world.world_size, plan))
        module.set_custom_reduce_scatter(comms[-1])
    sharded = {key: dict(shadow.named_parameters())[name] for name, key in by_model_name.items()}
    outside = [name for name, key in by_model_name.items() if not hasattr(sharded[key], "to_local")]
    if outside:
        raise ValueError(f"under FSDP the compressed weights must lie inside the wrapped blocks; {outside[:3]} do not "
                         "(leave them alone in the config, or run the sensitivities without FSDP)")
    rows: dict[str, torch.Tensor] = {}  # this rank's rows of each total: views into the comms' buffers

    def step(first: int, active: int, sample: object, index: int) -> None:
        for comm in comms:
            comm.first_sample, comm.active = first, active
        loss = loss_fn(shadow, sample)
        check_loss(loss, index)
        loss.backward()
        for key, p in sharded.items():
            if key not in rows:
                rows[key] = _rows_of_total(p, comms)
            p.grad = None

    gathered: list[dict[str, torch.Tensor]] = []

    def final() -> dict[str, torch.Tensor]:
        """The finished totals, gathered once (the last checkpoint and the return value share them)."""
        if not gathered:
            gathered.append(_gather_owned(rows, sharded, owners, world))
        return gathered[0]

    start = plan.samples(start_shard).start if start_shard < plan.shards else plan.count
    stream = iter(samples)
    last = None
    if totals is not None or start > 0:
        # the buffers exist after a first backward: one that adds nothing, then the resumed totals go in
        last = _next_own(stream, start + world.rank, plan.count) if start + world.rank < plan.count else None
        step(start, 0, _sample_or_rank0s(last, world), -1)
        _load_rows(rows, sharded, totals or {}, owners, world)
    for first in range(start, plan.count, world.world_size):
        active = min(world.world_size, plan.count - first)
        index = first + world.rank
        if index < plan.count:
            if last is None or last[0] != index:
                last = _next_own(stream, index, plan.count)
        sample = _sample_or_rank0s(last if index < plan.count else None, world) if active < world.world_size else last[1]
        step(first, active, sample, index)
        if on_sample is not None and index < plan.count:
            on_sample(index)
        done = first + active
        if on_round is not None and (done % plan.shard_size == 0 or done == plan.count):
            on_round(plan.shard_of(done - 1) + 1, final if done == plan.count else lambda: _gather_owned(rows, sharded, owners, world))
    owned = final()
    del shadow, comms, rows, sharded
    return owned


def _fsdp_modules(shadow: nn.Module):
    from torch.distributed.fsdp import FSDPModule

    return (m for m in shadow.modules() if isinstance(m, FSDPModule))


def _next_own(stream, index: int, count: int) -> tuple[int, object]:
    for i, sample in stream:
        if i == index:
            return i, sample
        if i > index:
            break
    raise ValueError(f"the calibration data ended before sample {index} (of {count})")


def _sample_or_rank0s(own: tuple[int, object] | None, world: World) -> object:
    """This rank's sample, or rank 0's for a rank with none in this step (every rank calls this)."""
    first = distributed.broadcast(own[1] if world.rank == 0 else None, src=0)
    return own[1] if own is not None else first


def _rows_of_total(p: torch.Tensor, comms: list[SquaresInSampleOrder]) -> torch.Tensor:
    """This rank's rows of the sums of parameter `p`: its sharded gradient, a view of a comm's buffer."""
    local = p.grad.to_local()
    ptr = local.untyped_storage().data_ptr()
    if not any(c.total is not None and c.total.untyped_storage().data_ptr() == ptr for c in comms):
        raise RuntimeError("FSDP copied its reduce-scatter output: this torch version is not supported by the sharded Fisher pass")
    return local


def _local_range(full_rows: int, world: World, rank: int) -> tuple[int, int]:
    per = -(-full_rows // world.world_size)
    return min(rank * per, full_rows), min((rank + 1) * per, full_rows)


def _gather_owned(rows, sharded, owners, world: World) -> dict[str, torch.Tensor]:
    """Every layer's total on the rank that owns it, one layer at a time."""
    owned = {}
    for key, owner in owners.items():
        p = sharded[key]
        full_rows = p.shape[0]
        per = -(-full_rows // world.world_size)
        padded = torch.zeros((per, *p.shape[1:]), dtype=torch.float32, device=rows[key].device)
        padded[: rows[key].shape[0]] = rows[key]
        parts = distributed.gather_to(padded, owner)
        if parts is not None:
            owned[key] = torch.cat(parts)[:full_rows].cpu()
    return owned


def _load_rows(rows, sharded, totals: Mapping[str, torch.Tensor], owners, world: World) -> None:
    """Resume: each owner sends its totals; every rank keeps its rows."""
    with torch.no_grad():
        for key, owner in owners.items():
            device = rows[key].device
            full = totals[key].to(device, torch.float32).contiguous() if owner == world.rank else \
                torch.empty(sharded[key].shape, dtype=torch.float32, device=device)
            dist.broadcast(full, src=owner)
            lo, hi = _local_range(sharded[key].shape[0], world, world.rank)
            rows[key].copy_(full[lo:hi])


__all__ = ["fisher_sums_sharded", "fsdp_requested", "sharded_copy", "wrap_classes", "SquaresInSampleOrder"]
