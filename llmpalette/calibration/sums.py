"""Sums over calibration samples that are the same bits for any number of ranks (Fisher sums, Hessians).

Samples are numbered; sample i is in shard i // shard_size (`fisher.ShardPlan`); a shard's sum starts
from zero and adds its samples in order; shards are dealt to ranks in rounds, and after each round every
named sum's shard parts travel to the rank that owns the name and are added to its total one shard at a
time, in shard order (`fold_round`). One process does exactly the same additions in the same order.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from llmpalette import distributed
from llmpalette.distributed import World


def fold_round(totals: dict[str, torch.Tensor], partial: Mapping[str, torch.Tensor], owners: Mapping[str, int],
               world: World, active: int) -> None:
    """Add this round's shard sums into the owners' totals, one shard at a time in shard (= rank) order;
    `active`: how many ranks held a shard this round. Every rank calls this together."""
    for name, owner in owners.items():
        parts = distributed.gather_to(partial[name], owner) if world.world_size > 1 else [partial[name]]
        if parts is not None:
            for part in parts[:active]:
                totals[name].add_(part)


@dataclass(frozen=True)
class ShardPlan:
    """Which samples each round and rank take: `count` samples in shards of `shard_size`."""

    count: int
    shard_size: int
    world_size: int

    @property
    def shards(self) -> int:
        return -(-self.count // self.shard_size)

    def shard_of(self, sample: int) -> int:
        return sample // self.shard_size

    def rank_of_shard(self, shard: int) -> int:
        return shard % self.world_size

    def samples(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.count))

    def rank_of_sample(self, sample: int, sharded: bool = False) -> int:
        """The rank that computes `sample`: its shard's rank, or under FSDP (`sharded`) sample % world_size."""
        return sample % self.world_size if sharded else self.rank_of_shard(self.shard_of(sample))

    def rounds(self, start_shard: int = 0) -> Iterator[range]:
        """Shards by round, from `start_shard` (any number of shards already summed)."""
        for first in range(start_shard, self.shards, self.world_size):
            yield range(first, min(first + self.world_size, self.shards))


class Accumulator(Protocol):
    """What a sample's run adds into: `sums` (name -> tensor), zeroed again by `reset()`."""

    sums: dict[str, torch.Tensor]

    def reset(self) -> None: ...


class HookedSums:
    """An Accumulator fed by hooks: `with acc:` registers them (`_register()` returns their handles) and
    removes them on exit; `reset()` zeroes the sums."""

    sums: dict[str, torch.Tensor]
    _handles: list = []

    def _register(self) -> list:
        raise NotImplementedError

    def __enter__(self):
        self._handles = self._register()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self) -> None:
        for t in self.sums.values():
            t.zero_()


def accumulate_rounds(
    samples: Iterable[tuple[int, object]],
    run: Callable[[int, object], None],
    accumulator: Accumulator,
    totals: dict[str, torch.Tensor],
    plan: ShardPlan,
    world: World,
    owners: Mapping[str, int],
    *,
    direct: bool,
    start_shard: int = 0,
    on_round: Callable[[int, Callable[[], dict[str, torch.Tensor]]], None] | None = None,
    on_sample: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Run this rank's samples shard by shard, round by round; `run(index, sample)` makes the accumulator
    add the sample's contribution into `accumulator.sums`, which are this round's shard sums (folded into
    the owners' `totals` after each round) or, when `direct` (one rank, one sample per shard, and an
    addition that is the same bits either way), the totals themselves.

    samples: (index, sample) in ascending index order, at least this rank's samples from shard
        `start_shard` on (others are skipped).
    on_round(shards_done, owned): after every round (checkpointing); `owned()` returns the totals.
    on_sample(index): after each of this rank's samples (progress).
    """
    stream = iter(samples)
    for shards in plan.rounds(start_shard):
        my_shard = shards.start + world.rank
        if my_shard in shards:
            wanted = plan.samples(my_shard)
            for index, sample in stream:
                if index < wanted.start:
                    continue
                if index not in wanted:
                    raise ValueError(f"shard {my_shard} expects samples {wanted.start}..{wanted[-1]}, got sample {index}")
                run(index, sample)
                if on_sample is not None:
                    on_sample(index)
                if index == wanted[-1]:
                    break
            else:
                raise ValueError(f"the calibration data ended before sample {wanted[-1]} (shard {my_shard})")
        if not direct:
            fold_round(totals, accumulator.sums, owners, world, active=len(shards))
            accumulator.reset()
        if on_round is not None:
            on_round(shards.stop, lambda: totals)
    return totals
