"""The thin layer over Accelerate: who am I, how many of us, share small results, shut down cleanly.

Launched by `accelerate launch` (or `torchrun`), Accelerate sets up torch.distributed (NCCL on GPU,
gloo on CPU); run plainly, this is a world of one and every call is a no-op. Units of work are
dealt round-robin (`owns`), results travel as small Python objects (`all_gather`), and the
process group is destroyed at exit (a process that skips it aborts and fails the launcher).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Unit `index` of a list is done by rank index % world_size."""
        return index % self.world_size == self.rank


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(cpu: bool = False) -> World:
    """Join the process group when launched with several processes; otherwise a world of one.

    Accelerate sets up the group; on a machine without CUDA it reports DistributedType.NO even when
    it did initialize a gloo group for a MULTI_GPU launch, so rank and size come from torch.distributed.
    """
    use_cuda = torch.cuda.is_available() and not cpu
    if not _launched():
        return World(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = state.device if use_cuda else torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), device)


def current_world() -> World:
    """This process's place in an already joined group (a world of one when there is none)."""
    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        return World(dist.get_rank(), dist.get_world_size(), device)
    return World(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_to(tensor: torch.Tensor, dst: int) -> list[torch.Tensor] | None:
    """Every rank's `tensor` (same shape and dtype everywhere), in rank order, on rank `dst`; None elsewhere."""
    if not (dist.is_available() and dist.is_initialized()):
        return [tensor]
    tensor = tensor.contiguous()
    if dist.get_rank() == dst:
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.gather(tensor, out, dst=dst)
        return out
    dist.gather(tensor, None, dst=dst)
    return None


def broadcast_tensor(tensor: torch.Tensor | None, like: torch.Tensor, src: int) -> torch.Tensor:
    """Rank `src`'s `tensor` on every rank (the others pass None and get a new tensor shaped `like`, float32)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    if dist.get_rank() != src:
        tensor = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    dist.broadcast(tensor, src=src)
    return tensor


def owners_by_size(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Deal named items to ranks so that each rank's total size is balanced: largest first, each to
    the rank with the least so far (lowest rank on ties). Deterministic; every rank computes the same."""
    load = [0] * world_size
    owners: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += sizes[name]
    return {name: owners[name] for name in sizes}


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def world(cpu: bool = False) -> Iterator[World]:
    """`with world() as w:` joins the group and always leaves it cleanly."""
    w = start(cpu=cpu)
    try:
        yield w
    finally:
        shutdown()
