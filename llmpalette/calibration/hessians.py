"""Per-layer input Hessians for GPTQ: H = Σ XᵀX over the calibration tokens (float32), with the token
count, streamed one decoder block at a time and summed the same way for any number of ranks.

GPTQ quantizes a model block by block (Frantar et al.; Core ML Tools' LayerwiseCompressor): the
calibration samples' inputs to the first block are captured once (`capture_block_inputs`), each block
is run on them with forward hooks on its linear layers (`InputHessians`), its layers are quantized, and
the block's outputs under the quantized weights (`run_block`) are the next block's inputs. Only the
current block's activations and Hessians are in memory.

Each sample's XᵀX is its own product (`torch.mm`), added into its shard's sum in sample order; shards are
summed in shard order on the layer's owner (`sums.accumulate_rounds`), so 1 and N ranks give the same
bits. This module knows no algorithm and writes no file.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from llmpalette.calibration.sums import HookedSums, ShardPlan, accumulate_rounds
from llmpalette.distributed import World

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


class InputHessians(HookedSums):
    """`with InputHessians(layers) as hs:` each forward of a named layer adds XᵀX of its input (float32,
    rows = all tokens of the call) into `hs.sums[name]` and the token count into `hs.sums[name + TOKENS]`."""

    def __init__(self, layers: Mapping[str, nn.Module], sums: dict[str, torch.Tensor] | None = None):
        self.layers = dict(layers)
        self.sums = sums if sums is not None else zero_sums(self.layers)
        self._handles: list = []
        self._last: tuple = (None, None, 0)  # (input tensor, its XᵀX, its token count)

    def _hook(self, name: str):
        def add(module, args):
            x = args[0]
            if x is not self._last[0]:  # layers that read the same tensor (q/k/v, gate/up) share one product
                flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                self._last = (x, torch.mm(flat.t(), flat), flat.shape[0])
            _, product, tokens = self._last
            self.sums[name].add_(product)
            self.sums[name + TOKENS].add_(tokens)
        return add

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._last = (None, None, 0)

    def _register(self) -> list:
        return [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]


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
) -> dict[str, torch.Tensor]:
    """Σ XᵀX of each named layer of `block` over samples 0..plan.count-1, and its token count (NAME +
    TOKENS); returns the sums of the names this rank owns (`owners`: layer name -> rank).

    inputs: (index, BlockInput) of at least this rank's samples, in ascending order. Every rank calls
    this together.
    """
    mine = [n for n, r in owners.items() if r == world.rank]
    totals = zero_sums(layers, mine)
    direct = world.world_size == 1 and plan.shard_size == 1  # 0 + P = P: the same bits as a shard's sum
    hessians = InputHessians(layers, sums=totals if direct else None)
    sum_owners = {key: owner for name, owner in owners.items() for key in (name, name + TOKENS)}
    with hessians, _StopWhenAllRan(layers) as stop:
        accumulate_rounds(inputs, lambda index, x: stop.run(block, x), hessians, totals, plan, world, sum_owners,
                          direct=direct, on_sample=on_sample)
    return totals


class _AllRan(Exception):
    pass


class _StopWhenAllRan:
    """Stops a block's forward once each of `layers` has received its input (what comes after them does
    not change their Hessians). Entered after `InputHessians`, so its hooks run after the sums' hooks."""

    def __init__(self, layers: Mapping[str, nn.Module]):
        self.layers = dict(layers)
        self.seen: set[str] = set()

    def __enter__(self):
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, name: str):
        def ran(module, args):
            self.seen.add(name)
            if len(self.seen) == len(self.layers):
                raise _AllRan
        return ran

    def run(self, block: nn.Module, x: BlockInput) -> None:
        self.seen.clear()
        try:
            with torch.no_grad():
                block(x.hidden, *x.args, **x.kwargs)
        except _AllRan:
            return


def mean_hessian(totals: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """H = Σ XᵀX / tokens for layer `name` (what GPTQ's dampening and loss are relative to)."""
    tokens = float(totals[name + TOKENS])
    if tokens <= 0:
        raise ValueError(f"layer {name} saw no calibration tokens")
    return totals[name] / tokens
