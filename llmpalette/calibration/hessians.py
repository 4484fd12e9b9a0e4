"""Per-layer input Hessians for GPTQ: H = Σ XᵀX over the calibration tokens (float32), with the token
count, streamed one decoder block at a time and summed the same way for any number of ranks.

GPTQ quantizes a model block by block (Frantar et al.; Core ML Tools' LayerwiseCompressor): the
calibration samples' inputs to the first block are captured once (`capture_block_inputs`), each block
is run on them with forward hooks on its linear layers (`SampleProducts`), its layers are quantized, and
the block's outputs under the quantized weights (`run_block`) are the next block's inputs. Only the
current block's activations and Hessians are in memory.

Each sample's XᵀX is its own product (`torch.mm`), added into its shard's sum in sample order; shards are
summed in shard order on the layer's owner (`sums.accumulate_rounds`), so 1 and N ranks give the same
bits. This module knows no algorithm and writes no file.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from llmpalette.calibration.sums import ShardPlan, accumulate_rounds
from llmpalette.distributed import World
from llmpalette.threads import ordered_map

TOKENS = ".tokens"  # the token count travels with each Hessian as a float64 scalar under NAME + TOKENS


@dataclass
class BlockInput:
    """What a decoder block receives for one sample: the hidden states and the other arguments (position
    embeddings, masks, position ids) exactly as the model passed them."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict

    def to(self, device: torch.device) -> "BlockInput":
        """The same input with every tensor (also inside tuples) on `device`."""
        return BlockInput(self.hidden.to(device), tuple(_moved(a, device) for a in self.args),
                          {k: _moved(v, device) for k, v in self.kwargs.items()})


def _moved(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(v.to(device) for v in value)
    return value


class _Captured(Exception):
    pass


def capture_block_inputs(model: nn.Module, block: nn.Module, samples: Iterable[tuple[int, object]],
                         forward: Callable[[nn.Module, object], object]) -> list[tuple[int, BlockInput]]:
    """Run each sample through `model` until it reaches `block` (the first decoder block), and keep what
    the block receives; nothing after it runs. `forward(model, sample)` calls the model (e.g.
    `model(input_ids=...)`)."""
    captured: list[tuple[int, BlockInput]] = []
    current: list[int] = []

    def hook(module, args, kwargs):
        hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        captured.append((current[0], BlockInput(hidden.detach(), tuple(rest), _detached(kwargs))))
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for index, sample in samples:
                current[:] = [index]
                try:
                    forward(model, sample)
                except _Captured:
                    continue
                raise ValueError(f"sample {index} never reached the block {type(block).__name__}")
    finally:
        handle.remove()
    return captured


def _detached(kwargs: dict) -> dict:
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
        elif isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            value = tuple(v.detach() for v in value)
        out[key] = value
    return out


def run_block(block: nn.Module, inputs: BlockInput) -> BlockInput:
    """The block's output for one sample, as the next block's input (same other arguments)."""
    with torch.no_grad():
        out = block(inputs.hidden, *inputs.args, **inputs.kwargs)
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    return BlockInput(hidden, inputs.args, inputs.kwargs)


class SampleProducts:
    """`with SampleProducts(block, layers) as sp:` `sp.run(x)` runs one sample through `block` until each
    named layer has received its input (what comes after them does not change their Hessians) and
    returns each layer's XᵀX of that input (float32, rows = all tokens of the call) with its token count,
    in the order the layers ran. Layers that read the same tensor (q/k/v, gate/up) share one product.
    Safe to call from several threads at once (each call keeps its own state)."""

    def __init__(self, block: nn.Module, layers: Mapping[str, nn.Module]):
        self.block = block
        self.layers = dict(layers)
        self._local = threading.local()
        self._handles: list = []

    def __enter__(self) -> "SampleProducts":
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str):
        def seen(module, args):
            state = self._local.state
            x = args[0]
            if x is not state["input"]:
                flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                state["input"], state["product"] = x, (torch.mm(flat.t(), flat), flat.shape[0])
            state["products"].append((name, *state["product"]))
            state["seen"].add(name)
            if len(state["seen"]) == len(self.layers):
                raise _AllRan
        return seen

    def run(self, x: BlockInput) -> list[tuple[str, torch.Tensor, int]]:
        state = {"input": None, "product": None, "products": [], "seen": set()}
        self._local.state = state
        try:
            with torch.no_grad():
                self.block(x.hidden, *x.args, **x.kwargs)
        except _AllRan:
            pass
        finally:
            self._local.state = None
        return state["products"]


class _ProductSums:
    """The Accumulator `accumulate_rounds` adds into: each sample's products, added in sample order."""

    def __init__(self, sums: dict[str, torch.Tensor]):
        self.sums = sums

    def add(self, products: list[tuple[str, torch.Tensor, int]]) -> None:
        for name, product, tokens in products:
            self.sums[name].add_(product)
            self.sums[name + TOKENS].add_(tokens)

    def reset(self) -> None:
        for t in self.sums.values():
            t.zero_()


def zero_sums(layers: Mapping[str, nn.Module], names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Zero Hessians (and token counts) for the named layers (all of them when `names` is None)."""
    wanted = set(layers if names is None else names)
    sums = {}
    for name, layer in layers.items():
        if name in wanted:
            columns = layer.weight.shape[1]
            sums[name] = torch.zeros((columns, columns), dtype=torch.float32, device=layer.weight.device)
            sums[name + TOKENS] = torch.zeros((), dtype=torch.float64, device=layer.weight.device)
    return sums


def hessian_sums(
    block: nn.Module,
    layers: Mapping[str, nn.Module],
    inputs: Iterable[tuple[int, BlockInput]],
    plan: ShardPlan,
    world: World,
    *,
    owners: Mapping[str, int],
    on_sample: Callable[[int], None] | None = None,
    workers: int = 1,
    per_sample: Callable[[int], contextlib.AbstractContextManager] | None = None,
) -> dict[str, torch.Tensor]:
    """Σ XᵀX of each named layer of `block` over samples 0..plan.count-1, and its token count (NAME +
    TOKENS); returns the sums of the names this rank owns (`owners`: layer name -> rank).

    inputs: (index, BlockInput) of at least this rank's samples, in ascending order. Every rank calls
    this together. workers: threads that run this rank's samples through the block (`threads.ordered_map`;
    the products are added in sample order, so the bits do not depend on it). per_sample(index): a
    context each sample runs in (the caller's replay of finished submodules).
    """
    mine = [n for n, r in owners.items() if r == world.rank]
    totals = zero_sums(layers, mine)
    direct = world.world_size == 1 and plan.shard_size == 1  # 0 + P = P: the same bits as a shard's sum
    accumulator = _ProductSums(totals if direct else zero_sums(layers))
    sum_owners = {key: owner for name, owner in owners.items() for key in (name, name + TOKENS)}
    own = [(i, x) for i, x in inputs if plan.rank_of_sample(i) == world.rank]
    with SampleProducts(block, layers) as products:
        def one(item):
            with per_sample(item[0]) if per_sample is not None else contextlib.nullcontext():
                return item[0], products.run(item[1])

        computed = ordered_map(one, own, workers)

        def run(index: int, x: BlockInput) -> None:
            done, sample_products = next(computed)
            if done != index:
                raise ValueError(f"sample {index} was expected, sample {done} came")
            accumulator.add(sample_products)

        accumulate_rounds(own, run, accumulator, totals, plan, world, sum_owners, direct=direct, on_sample=on_sample)
    return totals


class _AllRan(Exception):
    pass


def mean_hessian(totals: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """H = Σ XᵀX / tokens for layer `name` (what GPTQ's dampening and loss are relative to)."""
    tokens = float(totals[name + TOKENS])
    if tokens <= 0:
        raise ValueError(f"layer {name} saw no calibration tokens")
    return totals[name] / tokens
