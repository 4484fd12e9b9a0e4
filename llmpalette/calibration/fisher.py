"""Fisher sensitivities: for each weight, the sum over calibration samples of the squared gradient of
that sample's loss, in float32 (the diagonal of the empirical Fisher information; SqueezeLLM, Core ML
Tools' SKMPalettizer).

Per sample, not per batch: the square of a batch's summed gradient is not the sum of the samples'
squares, so every sample gets its own backward pass (`split_batch` cuts a batch into samples). A
post-accumulate-grad hook adds each parameter's `grad ** 2` into its float32 accumulator as soon as
the gradient is ready and frees the gradient, so no second full-size buffer exists beside the sums.

Deterministic for any number of ranks. Samples are numbered; sample i belongs to shard
i // shard_size; shards are dealt to ranks in rounds (shard s is computed by rank s % world_size).
Each shard's sum starts from zero and adds its samples in order. After each round, every layer's
shard sums travel to the rank that owns the layer (owners balanced by size) and are added to its
total one shard at a time, in shard order. One process does exactly the same additions in the same
order, so 1 and N ranks give the same bits. With one sample per shard (the default) a single process
adds each square straight into the totals: the same arithmetic, and no second full-size buffer. This module knows no algorithm and writes no file: the
caller checkpoints through `on_round`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.utils.checkpoint
from torch import nn

from llmpalette.calibration.sums import HookedSums, ShardPlan, accumulate_rounds
from llmpalette.distributed import World
from llmpalette.errors import ConfigError

log = logging.getLogger("llmpalette")

LossFn = Callable[[nn.Module, object], torch.Tensor]


# Causal LMs whose logits are exactly `lm_head(decoder(ids).last_hidden_state)` (no soft-capping or scale).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
LOSS_CHUNK_TOKENS = 64


def causal_lm_loss(model: nn.Module, sample: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy of one token window (1-D or [1, seq_len]) under a causal LM.

    For the models in PLAIN_HEAD_MODEL_TYPES the vocabulary projection and the cross-entropy run in
    chunks of LOSS_CHUNK_TOKENS tokens, each recomputed in the backward pass (`torch.utils.checkpoint`):
    the full [seq_len, vocab] logits, their log-softmax and their gradient (about 300 MB at 512 tokens
    and SmolLM2's 49,152 entries) never exist at once. The same loss as `model(..., labels=ids).loss`
    up to float rounding; other models take that path."""
    ids = sample.view(1, -1).to(next(model.parameters()).device)
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES or not isinstance(head, nn.Linear) \
            or ids.shape[1] <= LOSS_CHUNK_TOKENS + 1:
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    targets = ids[:, 1:]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[1], LOSS_CHUNK_TOKENS):
        part = slice(start, start + LOSS_CHUNK_TOKENS)
        total = total + torch.utils.checkpoint.checkpoint(_summed_nll, hidden[:, part], head.weight, head.bias,
                                                          targets[:, part], use_reentrant=False)
    return total / targets.numel()


def _summed_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    logits = nn.functional.linear(hidden, weight, bias).float()
    return nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def split_batch(batch: object) -> list[object]:
    """The single samples of a batch: a tensor of 2 or more dimensions, or a tuple / list / mapping whose
    first tensor has 2 or more, is split along the first dimension (each sample keeps a batch dimension
    of 1; other tensors with the same first size are split alike). A 1-D tensor (one token window) and
    anything else is one sample."""
    tensors = [batch] if isinstance(batch, torch.Tensor) else (
        list(batch.values()) if isinstance(batch, Mapping) else list(batch) if isinstance(batch, (tuple, list)) else [])
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not tensors or tensors[0].dim() < 2 or tensors[0].shape[0] <= 1:
        return [batch]
    n = tensors[0].shape[0]

    def take(value, i):
        return value[i : i + 1] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n else value

    if isinstance(batch, torch.Tensor):
        return list(batch.split(1))
    if isinstance(batch, Mapping):
        return [{k: take(v, i) for k, v in batch.items()} for i in range(n)]
    if hasattr(batch, "_fields"):  # a namedtuple
        return [type(batch)(*(take(v, i) for v in batch)) for i in range(n)]
    return [type(batch)(take(v, i) for v in batch) for i in range(n)]


def own_samples(samples: Iterable[object], plan: ShardPlan, rank: int, sharded: bool = False) -> tuple[ShardPlan, list[tuple[int, object]]]:
    """(`plan` with the count of samples there were, `rank`'s numbered samples) of the first `plan.count`
    single samples of `samples` (batches are split, `split_batch`); a rank keeps its shards' samples
    (`sharded`: one sample per rank in turn, as under FSDP). Fewer than `plan.count` is allowed, with a
    warning, as Core ML Tools allows; none is an error."""
    mine, count = [], 0
    for batch in samples:
        for sample in split_batch(batch):
            if plan.rank_of_sample(count, sharded) == rank:
                mine.append((count, sample))
            count += 1
            if count == plan.count:
                return plan, mine
    if count == 0:
        raise ConfigError("dataloader", "yielded no samples")
    log.warning("the dataloader gave %d samples, fewer than calibration_nsamples=%d", count, plan.count)
    return dataclasses.replace(plan, count=count), mine


class SquaredGradients(HookedSums):
    """`with SquaredGradients(params) as sq:` every backward pass adds grad ** 2 (float32) of each named
    parameter into `sq.sums[name]` and frees the gradient at once. Tied names of one tensor: list one."""

    def __init__(self, params: Mapping[str, nn.Parameter], sums: dict[str, torch.Tensor] | None = None):
        self.params = dict(params)
        self.sums = sums if sums is not None else {
            name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in self.params.items()}
        self._handles: list = []

    def _hook(self, name: str):
        def add_square(param: torch.Tensor) -> None:
            self.sums[name].add_(param.grad.to(torch.float32).square())
            param.grad = None
        return add_square

    def _register(self) -> list:
        return [p.register_post_accumulate_grad_hook(self._hook(n)) for n, p in self.params.items()]


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """transformers' activation (gradient) checkpointing on or off, non-reentrant; its newer name first."""
    if on:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


@contextlib.contextmanager
def gradients_for(model: nn.Module, params: Mapping[str, nn.Parameter], *, gradient_checkpointing: bool = False) -> Iterator[None]:
    """Only `params` require gradients; the model is in eval mode (no dropout), or in train mode with
    transformers' gradient checkpointing when asked (for long sequences). Restored on exit."""
    wanted = {id(p) for p in params.values()}
    before = {id(p): p.requires_grad for p in model.parameters()}
    grads = {id(p): p.grad for p in params.values()}  # a caller's gradients are kept aside, not summed in
    training = model.training
    checkpointing = gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable")
    was_checkpointing = bool(getattr(model, "is_activation_checkpointing", False)) if hasattr(type(model), "is_activation_checkpointing") \
        else bool(getattr(model, "is_gradient_checkpointing", False))
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        for p in params.values():
            p.grad = None
        if checkpointing:
            dropouts = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
            if dropouts or getattr(getattr(model, "config", None), "attention_dropout", 0.0):
                log.warning("gradient checkpointing runs the model in train mode, and it has dropout: sensitivities are random")
            set_checkpointing(model, True)
            model.train()
        else:
            model.eval()
        yield
    finally:
        if checkpointing and not was_checkpointing:
            set_checkpointing(model, False)
        model.train(training)
        for p in model.parameters():
            p.requires_grad_(before[id(p)])
        for p in params.values():
            p.grad = grads[id(p)]


def fisher_sums(
    model: nn.Module,
    samples: Iterable[tuple[int, object]],
    loss_fn: LossFn,
    params: Mapping[str, nn.Parameter],
    plan: ShardPlan,
    world: World,
    *,
    owners: Mapping[str, int],
    totals: dict[str, torch.Tensor] | None = None,
    start_shard: int = 0,
    gradient_checkpointing: bool = False,
    on_round: Callable[[int, Callable[[], dict[str, torch.Tensor]]], None] | None = None,
    on_sample: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The Fisher sums of `params` over samples 0..plan.count-1; returns the totals of the names this rank owns.

    samples: (index, sample) in ascending index order, at least this rank's samples from shard
        `start_shard` on (others are skipped); all ranks call this together.
    owners: name -> rank that holds its total (`distributed.owners_by_size`).
    totals: the owned totals of shards 0..start_shard-1 when resuming (zeros when None).
    on_round(shards_done, owned): called after every round (checkpointing); `owned()` returns the totals.
    on_sample(index): called after each of this rank's samples (progress).
    """
    mine = {n for n, r in owners.items() if r == world.rank}
    if totals is None:
        totals = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items() if n in mine}
    # One rank, one sample per shard: a shard's sum is its one square (0 + x = x exactly), so adding the
    # squares straight into the totals is the same arithmetic without a second full-size buffer.
    direct = world.world_size == 1 and plan.shard_size == 1
    squares = SquaredGradients(params, sums=totals if direct else None)

    def one(index: int, sample: object) -> None:
        loss = loss_fn(model, sample)
        check_loss(loss, index)
        loss.backward()

    with gradients_for(model, params, gradient_checkpointing=gradient_checkpointing), squares:
        accumulate_rounds(samples, one, squares, totals, plan, world, owners, direct=direct, start_shard=start_shard,
                          on_round=on_round, on_sample=on_sample)
    return totals


def check_loss(loss: object, index: int) -> None:
    """A loss_fn's result must be a scalar tensor that depends on the weights."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError("loss_fn must return a scalar loss that depends on the weights; got "
                         f"shape {shape}, requires_grad={getattr(loss, 'requires_grad', False)} for sample {index}")
