"""The calibration floor: per-sample Fisher sums (`llmpalette.calibration.fisher`) checked against a plain
per-sample autograd loop, shard folding and resume bit for bit, and the streamed calibration windows
(`calibration_windows`) checked against `build_windows` and the held-out rule."""
from collections import namedtuple

import pytest
import torch
from torch import nn

from llmpalette.calibration.fisher import (
    ShardPlan,
    SquaredGradients,
    causal_lm_loss,
    fisher_sums,
    gradients_for,
    split_batch,
)
from llmpalette.distributed import World
from llmpalette.errors import ConfigError, SourceError
from llmpalette.sources.text import HELD_OUT_EVERY, build_windows, calibration_windows, check_calibration_text, is_held_out
from tests.conftest import byte_tokenizer, tiny_llama

pytestmark = [pytest.mark.filterwarnings("ignore:`.*` is deprecated:FutureWarning"),  # transformers' checkpointing renames
              pytest.mark.usefixtures("one_torch_thread")]

WORLD = World(0, 1, torch.device("cpu"))
SEQ = 16


def token_windows(count: int, seed: int = 0) -> torch.Tensor:
    """[count, SEQ] random byte tokens."""
    return torch.randint(0, 256, (count, SEQ), generator=torch.Generator().manual_seed(seed))


def projection_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every linear projection's weight, and the tied embedding / lm_head (one tensor, used twice)."""
    return {n: p for n, p in model.named_parameters() if n.endswith("proj.weight") or n == "model.embed_tokens.weight"}


def reference_fisher(model: nn.Module, samples: list[torch.Tensor], params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """sum_i (d loss_i / d W)^2 in float64, one `torch.autograd.grad` per sample."""
    names = list(params)
    sums = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    for sample in samples:
        ids = sample.view(1, -1)
        grads = torch.autograd.grad(model(input_ids=ids, labels=ids, use_cache=False).loss, [params[n] for n in names])
        for name, grad in zip(names, grads):
            sums[name] += grad.double().square()
    return sums


def run_fisher(model, samples, params, shard_size, **kwargs) -> dict[str, torch.Tensor]:
    plan = ShardPlan(len(samples), shard_size, 1)
    return fisher_sums(model, list(enumerate(samples)), causal_lm_loss, params, plan, WORLD,
                       owners={n: 0 for n in params}, **kwargs)


def assert_close_to(sums: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert sums.keys() == reference.keys()
    for name, ref in reference.items():
        assert sums[name].dtype == torch.float32, name
        torch.testing.assert_close(sums[name].double(), ref, rtol=1e-5, atol=1e-12 * float(ref.max()), msg=name)


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)




@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=3)


# --- split_batch -----------------------------------------------------------------------------------------


def test_split_batch_of_a_2d_tensor_gives_one_sample_per_row():
    batch = token_windows(3)
    samples = split_batch(batch)
    assert len(samples) == 3
    for i, sample in enumerate(samples):
        assert sample.shape == (1, SEQ) and torch.equal(sample[0], batch[i])


@pytest.mark.parametrize("batch", [token_windows(1)[0], token_windows(1)], ids=["1-D window", "[1, L]"])
def test_a_single_window_is_one_sample(batch):
    samples = split_batch(batch)
    assert len(samples) == 1 and samples[0] is batch


def test_split_batch_of_a_mapping_splits_every_tensor_of_the_batch_size():
    ids, mask = token_windows(3), torch.ones(3, SEQ, dtype=torch.int64)
    scale, shared = torch.tensor(2.0), torch.arange(5)  # a 0-d tensor and one of another first size: kept whole
    samples = split_batch({"input_ids": ids, "attention_mask": mask, "scale": scale, "shared": shared, "tag": "x"})
    assert len(samples) == 3
    for i, sample in enumerate(samples):
        assert list(sample) == ["input_ids", "attention_mask", "scale", "shared", "tag"]
        assert torch.equal(sample["input_ids"], ids[i : i + 1]) and torch.equal(sample["attention_mask"], mask[i : i + 1])
        assert sample["scale"] is scale and sample["shared"] is shared and sample["tag"] == "x"


@pytest.mark.parametrize("kind", [tuple, list])
def test_split_batch_of_a_tuple_or_list_keeps_its_type_and_pairs_rows(kind):
    inputs, targets = torch.randn(4, 3), torch.arange(4)
    samples = split_batch(kind([inputs, targets]))
    assert len(samples) == 4
    for i, (x, y) in enumerate(samples):
        assert torch.equal(x, inputs[i : i + 1]) and torch.equal(y, targets[i : i + 1])
    assert all(type(s) is kind for s in samples)


def test_split_batch_of_a_namedtuple():
    Pair = namedtuple("Pair", ["inputs", "targets"])
    samples = split_batch(Pair(torch.randn(2, 3), torch.arange(2)))
    assert [type(s) for s in samples] == [Pair, Pair]


def test_split_batch_leaves_a_batch_whose_first_tensor_is_1d_alone():
    batch = (torch.arange(3), torch.randn(3, 4))  # the first tensor decides
    assert split_batch(batch) == [batch]
    assert split_batch("not a tensor") == ["not a tensor"]


# --- SquaredGradients and gradients_for -----------------------------------------------------------------


def two_linears() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def test_squared_gradients_sum_per_backward_squares_in_float32_and_free_the_grad():
    model = two_linears()
    inputs = [torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    grads = [torch.autograd.grad(model(x).square().sum(), model[0].weight)[0] for x in inputs]
    with SquaredGradients({"first": model[0].weight}) as squares:
        for x in inputs:
            model(x).square().sum().backward()
            assert model[0].weight.grad is None  # freed by the hook at once
            assert model[2].weight.grad is not None  # no hook: accumulates as usual
    assert squares.sums["first"].dtype == torch.float32
    expected = grads[0].square() + grads[1].square()
    torch.testing.assert_close(squares.sums["first"], expected.float())
    assert not torch.allclose(squares.sums["first"], (grads[0] + grads[1]).square().float())
    squares.reset()
    assert not squares.sums["first"].any()
    model(inputs[0]).sum().backward()  # the hooks are gone after the block
    assert model[0].weight.grad is not None and not squares.sums["first"].any()


def test_gradients_for_freezes_all_but_the_named_params_in_eval_mode_and_restores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[2].bias.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randn(8, 4)
    with gradients_for(model, {"0.weight": model[0].weight}):
        assert not model.training and not model[1].training
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.weight"}
        assert torch.equal(model(x), model(x))  # dropout is off
    assert model.training and model[1].training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    with pytest.raises(RuntimeError, match="boom"), gradients_for(model, {"2.weight": model[2].weight}):
        raise RuntimeError("boom")
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_gradients_for_with_checkpointing_runs_in_train_mode_and_turns_it_off_after(llama):
    params = {"w": llama.model.layers[0].mlp.down_proj.weight}
    assert not llama.training and not llama.is_gradient_checkpointing
    with gradients_for(llama, params, gradient_checkpointing=True):
        assert llama.training and llama.is_gradient_checkpointing
    assert not llama.training and not llama.is_gradient_checkpointing
    assert all(p.requires_grad for p in llama.parameters())


def test_gradients_for_keeps_checkpointing_the_model_already_had():
    model = tiny_llama(seed=3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with gradients_for(model, {"w": model.model.layers[0].mlp.down_proj.weight}, gradient_checkpointing=True):
        pass
    assert model.is_gradient_checkpointing


# --- ShardPlan ------------------------------------------------------------------------------------------


def test_shard_plan_numbers_samples_shards_ranks_and_rounds():
    plan = ShardPlan(count=7, shard_size=2, world_size=2)
    assert plan.shards == 4
    assert [plan.shard_of(i) for i in range(7)] == [0, 0, 1, 1, 2, 2, 3]
    assert [plan.rank_of_shard(s) for s in range(4)] == [0, 1, 0, 1]
    assert [list(plan.samples(s)) for s in range(4)] == [[0, 1], [2, 3], [4, 5], [6]]
    assert list(plan.rounds()) == [range(0, 2), range(2, 4)]
    assert list(plan.rounds(1)) == [range(1, 3), range(3, 4)]
    assert list(ShardPlan(5, 5, 1).rounds()) == [range(0, 1)]


# --- fisher_sums -----------------------------------------------------------------------------------------


def test_fisher_sums_are_per_sample_squares_not_the_square_of_the_batch_gradient(llama):
    batch = token_windows(3, seed=1)
    samples = split_batch(batch)
    params = projection_params(llama)
    reference = reference_fisher(llama, samples, params)
    sums = run_fisher(llama, samples, params, shard_size=3)
    assert_close_to(sums, reference)
    # one backward over the batch: its loss is the mean of the samples' losses (equal lengths)
    names = list(params)
    batched = torch.autograd.grad(llama(input_ids=batch, labels=batch, use_cache=False).loss, [params[n] for n in names])
    for name, grad in zip(names, batched):
        square_of_sum = (3 * grad.double()).square()  # (sum_i g_i)^2
        gap = float((square_of_sum - reference[name]).abs().sum() / reference[name].sum())
        # the embedding's rows are mostly touched by one sample each, so its cross terms are small
        assert gap > (0.02 if name == "model.embed_tokens.weight" else 0.3), (name, gap)


def test_fisher_sums_leave_the_model_as_they_found_it(llama):
    params = projection_params(llama)
    run_fisher(llama, split_batch(token_windows(2)), params, shard_size=1)
    assert not llama.training
    assert all(p.requires_grad and p.grad is None for p in llama.parameters())
    ids = token_windows(1)
    llama(input_ids=ids, labels=ids).loss.backward()  # no hook left behind: gradients stay
    assert all(p.grad is not None for p in params.values())
    llama.zero_grad(set_to_none=True)


def test_shard_size_changes_only_the_last_bits_and_runs_are_deterministic(llama):
    samples = split_batch(token_windows(4, seed=2))
    params = projection_params(llama)
    reference = reference_fisher(llama, samples, params)
    by_size = {size: run_fisher(llama, samples, params, shard_size=size) for size in (1, 2, 4)}
    for sums in by_size.values():
        assert_close_to(sums, reference)
    assert same_bits(run_fisher(llama, samples, params, shard_size=2), by_size[2])


def test_gradient_checkpointing_does_not_change_the_sums(llama):
    samples = split_batch(token_windows(2, seed=4))
    params = projection_params(llama)
    plain = run_fisher(llama, samples, params, shard_size=1)
    checkpointed = run_fisher(llama, samples, params, shard_size=1, gradient_checkpointing=True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=0)
    assert not llama.training and not llama.is_gradient_checkpointing


def test_resuming_after_a_round_equals_an_uninterrupted_run_bit_for_bit(llama):
    samples = split_batch(token_windows(6, seed=5))
    params = projection_params(llama)
    snapshots, seen = {}, []

    def keep(shards_done, owned):
        snapshots[shards_done] = {n: t.clone() for n, t in owned().items()}

    full = run_fisher(llama, samples, params, shard_size=2, on_round=keep, on_sample=seen.append)
    assert sorted(snapshots) == [1, 2, 3] and seen == list(range(6))
    assert same_bits(snapshots[3], full)
    for done in (1, 2):
        assert not same_bits(snapshots[done], full)
        resumed_seen = []
        resumed = run_fisher(llama, samples, params, shard_size=2, start_shard=done,
                             totals={n: t.clone() for n, t in snapshots[done].items()}, on_sample=resumed_seen.append)
        assert resumed_seen == list(range(2 * done, 6)), done  # the finished shards' samples are skipped
        assert same_bits(resumed, full), done


def test_fisher_sums_refuse_short_data_gaps_and_losses_without_weights(llama):
    params = {"w": llama.model.layers[0].mlp.down_proj.weight}
    samples = split_batch(token_windows(3))
    plan = ShardPlan(4, 2, 1)
    with pytest.raises(ValueError, match="the calibration data ended before sample 3 \\(shard 1\\)"):
        fisher_sums(llama, list(enumerate(samples)), causal_lm_loss, params, plan, WORLD, owners={"w": 0})
    with pytest.raises(ValueError, match="shard 0 expects samples 0..1, got sample 2"):
        fisher_sums(llama, [(0, samples[0]), (2, samples[2])], causal_lm_loss, params, ShardPlan(3, 2, 1), WORLD, owners={"w": 0})
    with pytest.raises(ValueError, match="requires_grad=False for sample 0"):
        fisher_sums(llama, list(enumerate(samples)), lambda model, sample: torch.tensor(1.0), params,
                    ShardPlan(3, 1, 1), WORLD, owners={"w": 0})
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        fisher_sums(llama, list(enumerate(samples)), lambda model, sample: model.model.layers[0].mlp.down_proj.weight[0, :2],
                    params, ShardPlan(3, 1, 1), WORLD, owners={"w": 0})
    assert all(p.requires_grad for p in llama.parameters())


def test_causal_lm_loss_takes_a_1d_window_or_a_row():
    model = tiny_llama(seed=1)
    window = token_windows(1)[0]
    with torch.no_grad():
        expected = model(input_ids=window.view(1, -1), labels=window.view(1, -1)).loss
        assert torch.equal(causal_lm_loss(model, window), expected)
        assert torch.equal(causal_lm_loss(model, window.view(1, -1)), expected)


# --- calibration_windows ---------------------------------------------------------------------------------


class RecordingTokenizer:
    """A tokenizer that remembers every text it was asked to tokenize."""

    def __init__(self, inner):
        self.inner, self.texts = inner, []
        self.eos_token_id = inner.eos_token_id
        self.name_or_path = "recording"

    def __call__(self, text, **kwargs):
        self.texts.append(text)
        return self.inner(text, **kwargs)


def marked_text(tmp_path, paragraphs: int = 40):
    """A .txt file of `paragraphs` paragraphs; the held-out ones (and only they) contain HELDOUT."""
    texts = [f"HELDOUT paragraph {i} is for evaluation only." if is_held_out(i) else
             f"Paragraph {i} tells calibration fact number {i * 7} in plain words." for i in range(paragraphs)]
    path = tmp_path / "marked.txt"
    path.write_text("".join(f"{text}\n\n" for text in texts))
    return str(path), [f"{text}\n" for i, text in enumerate(texts) if not is_held_out(i)]


def calibration_stream(tokenizer, documents: list[str]) -> list[int]:
    stream: list[int] = []
    for number, text in enumerate(documents):
        stream += ([tokenizer.eos_token_id] if number else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
    return stream


def test_calibration_windows_equal_build_windows_row_for_row():
    tokenizer = byte_tokenizer()
    expected = build_windows(tokenizer, "default", seq_len=48, calibration_samples=12, evaluation_windows=3).calibration
    got = list(calibration_windows(tokenizer, "default", seq_len=48, count=12))
    assert [index for index, _ in got] == list(range(12))
    assert all(window.dtype == torch.int64 and window.shape == (48,) for _, window in got)
    assert torch.equal(torch.stack([window for _, window in got]), expected)


def test_wanted_yields_only_the_chosen_windows():
    tokenizer = byte_tokenizer()
    every = dict(calibration_windows(tokenizer, "default", seq_len=32, count=10))
    chosen = list(calibration_windows(tokenizer, "default", seq_len=32, count=10, wanted=lambda i: i % 3 == 1))
    assert [index for index, _ in chosen] == [1, 4, 7]
    assert all(torch.equal(window, every[index]) for index, window in chosen)


def test_calibration_windows_never_read_a_held_out_document(tmp_path):
    spec, calibration_documents = marked_text(tmp_path)
    tokenizer = RecordingTokenizer(byte_tokenizer())
    stream = calibration_stream(byte_tokenizer(), calibration_documents)
    count = len(stream) // SEQ
    windows = [w for _, w in calibration_windows(tokenizer, spec, seq_len=SEQ, count=count)]
    assert len(windows) == count
    assert torch.cat(windows).tolist() == stream[: count * SEQ]
    assert "HELDOUT" not in byte_tokenizer().decode(torch.cat(windows).tolist())
    assert tokenizer.texts and not any("HELDOUT" in text for text in tokenizer.texts)


def test_calibration_windows_read_only_the_documents_they_need(tmp_path):
    spec, _ = marked_text(tmp_path)
    tokenizer = RecordingTokenizer(byte_tokenizer())
    assert len(list(calibration_windows(tokenizer, spec, seq_len=SEQ, count=5))) == 5
    fewest = build_windows(byte_tokenizer(), spec, seq_len=SEQ, calibration_samples=5, evaluation_windows=0)
    assert len(tokenizer.texts) == fewest.description["calibration"]["documents"] < 40 * (HELD_OUT_EVERY - 1) // HELD_OUT_EVERY


def test_too_little_text_names_the_windows_asked_and_available(tmp_path):
    spec, calibration_documents = marked_text(tmp_path, paragraphs=12)
    tokenizer = byte_tokenizer()
    available = len(calibration_stream(tokenizer, calibration_documents)) // SEQ
    assert available > 0
    check_calibration_text(tokenizer, spec, seq_len=SEQ, count=available)  # enough: no error
    message = f"too short for {available + 1} calibration windows of {SEQ} tokens .*: {available} available"
    with pytest.raises(SourceError, match=message):
        list(calibration_windows(tokenizer, spec, seq_len=SEQ, count=available + 1))
    with pytest.raises(SourceError, match=message):
        check_calibration_text(tokenizer, spec, seq_len=SEQ, count=available + 1)


def test_calibration_window_counts_are_validated():
    tokenizer = byte_tokenizer()
    assert list(calibration_windows(tokenizer, "default", seq_len=8, count=0)) == []
    with pytest.raises(ConfigError) as err:
        list(calibration_windows(tokenizer, "default", seq_len=8, count=-1))
    assert err.value.field == "count"
    with pytest.raises(ConfigError) as err:
        list(calibration_windows(tokenizer, "default", seq_len=0, count=1))
    assert err.value.field == "seq_len"


def test_the_chunked_causal_lm_loss_is_the_models_loss_and_gradient(llama):
    """causal_lm_loss runs the vocabulary projection in checkpointed chunks for Llama-like models: the same
    loss and gradients as the model's own loss (float rounding), and never the [seq_len, vocab] logits."""
    from llmpalette.calibration import fisher

    ids = torch.randint(0, 257, (1, 3 * fisher.LOSS_CHUNK_TOKENS + 7), generator=torch.Generator().manual_seed(4))
    weight = llama.model.layers[1].mlp.down_proj.weight
    results = []
    for loss_fn in (fisher.causal_lm_loss, lambda m, s: m(input_ids=s, labels=s, use_cache=False).loss):
        weight.grad = None
        loss = loss_fn(llama, ids)
        loss.backward()
        results.append((loss.detach(), weight.grad.clone()))
    weight.grad = None
    (chunked, g_chunked), (full, g_full) = results
    assert torch.allclose(chunked, full, rtol=1e-5, atol=1e-6)
    assert torch.allclose(g_chunked, g_full, rtol=1e-4, atol=1e-7) and g_full.abs().max() > 0
    shapes, original = [], fisher._summed_nll

    def recording(hidden, *rest):
        shapes.append(hidden.shape[1])
        return original(hidden, *rest)

    fisher._summed_nll = recording
    try:
        fisher.causal_lm_loss(llama, ids)
    finally:
        fisher._summed_nll = original
    assert max(shapes) <= fisher.LOSS_CHUNK_TOKENS and sum(shapes) == ids.shape[1] - 1  # never the whole window


def test_return_freed_memory_fixes_the_mmap_threshold_unless_the_user_set_malloc(monkeypatch):
    from llmpalette import memory

    monkeypatch.setattr(memory, "_done", False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert memory.return_freed_memory() is False  # the user's allocator settings win
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("LLMPALETTE_KEEP_MALLOC", "1")
    assert memory.return_freed_memory() is False
    monkeypatch.delenv("LLMPALETTE_KEEP_MALLOC")
    for key in [k for k in __import__("os").environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    assert memory.return_freed_memory() is True and memory._done
