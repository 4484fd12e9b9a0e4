"""CPU threads that never change a result's bits.

A float matmul's bits depend on how many threads split its sums (measured: GPTQ's layer files differ
between 2 threads and 1), so the layerwise pass runs every torch op on one thread (`one_thread`) and
gets its parallelism from independent samples instead (`ordered_map`): each sample's forward, and each
sample's XᵀX, is computed by one thread from start to end, and the results are used in sample order. So
the bytes are the same for any core count, any `OMP_NUM_THREADS`, any number of workers and any number
of ranks, and a 2-core machine still uses both cores.
"""
from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def one_thread() -> Iterator[int]:
    """torch ops on one CPU thread for the duration; yields how many threads torch had before (the cores
    this process may use: `ordered_map`'s worker count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """fn(item) for each item, in order, computed by up to `workers` threads (torch releases the GIL
    inside its kernels), at most `workers` results ahead of the consumer (bounded memory). With one
    worker, or one item, it is a plain loop. An exception in fn is raised when its result is reached."""
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    pending: deque[Future] = deque()
    stream = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llmpalette-sample") as pool:
        try:
            for item in stream:
                pending.append(pool.submit(fn, item))
                if len(pending) >= workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
