"""Threads that never change bits: `ordered_map` keeps order and bounds its lookahead; the layerwise pass
gives the same weights with 1 and 2 worker threads; GPTQ's compiled lazy-batch kernels agree with the
column-by-column torch loop; the compiled LUT normal matrices equal the dense sum."""
import threading
import time

import pytest
import torch

from llmpalette.maths.gptq import gptq
from llmpalette.maths.gptq_kernels import lut_normal_matrices
from llmpalette.maths.lut_gptq import NearestLUTEntry
from llmpalette.maths.uniform import UniformColumns, quant_range, uniform_grid
from llmpalette.threads import one_thread, ordered_map
from tests.conftest import tiny_llama
from tests.test_layerwise import gptq_layer, run


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_ordered_map_keeps_order_and_runs_at_most_workers_ahead(workers):
    lock = threading.Lock()
    state = {"started": 0, "consumed": 0, "ahead": 0}

    def slow(i):
        with lock:
            state["started"] += 1
            state["ahead"] = max(state["ahead"], state["started"] - state["consumed"])
        time.sleep(0.002 * ((7 * i) % 5))  # finish out of order
        return i * i

    out = []
    for value in ordered_map(slow, range(20), workers):
        out.append(value)
        with lock:
            state["consumed"] += 1
    assert out == [i * i for i in range(20)]
    assert state["ahead"] <= workers


def test_ordered_map_raises_the_workers_exception_in_order():
    def fn(i):
        if i == 3:
            raise ValueError("sample 3")
        return i

    got = []
    with pytest.raises(ValueError, match="sample 3"):
        for value in ordered_map(fn, range(8), 2):
            got.append(value)
    assert got == [0, 1, 2]


def test_one_thread_yields_the_thread_count_and_restores_it():
    before = torch.get_num_threads()
    with one_thread() as workers:
        assert workers == before
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_the_layerwise_pass_gives_the_same_weights_with_one_and_two_workers():
    """compress_layerwise takes its worker count from torch's thread count at entry: 1 runs the samples in
    a loop, 2 on two threads; the weights must be the same bits (sample order is kept for every sum)."""
    results = {}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model = tiny_llama(seed=11).eval()
            run(model, gptq_layer, samples=6)
            results[threads] = {n: p.detach().clone() for n, p in model.named_parameters()}
    finally:
        torch.set_num_threads(before)
    changed = [n for n in results[1] if not torch.equal(results[1][n], tiny_llama(seed=11).state_dict()[n])]
    assert changed, "GPTQ changed no weight: the comparison would be empty"
    for name in results[1]:
        assert torch.equal(results[1][name], results[2][name]), name


def _problem(rows=48, columns=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, columns, generator=g) * torch.rand(columns, generator=g) * 3
    return torch.randn(rows, columns, generator=g) * 0.05, x.t() @ x / 300


@pytest.mark.parametrize("block_sizes,act_order,signed,scheme", [
    ((1, 96), True, True, "symmetric"),
    ((1, 32), False, True, "symmetric"),
    ((1, 32), False, False, "affine"),
    ((1, 32), True, False, "symmetric"),
    ((4, 32), False, True, "affine"),
])
def test_the_compiled_uniform_batch_agrees_with_the_column_loop(block_sizes, act_order, signed, scheme):
    w, h = _problem()
    qmin, qmax = quant_range(4, signed, scheme)
    per_block = block_sizes[1] < w.shape[1]
    results = []
    for compiled in (True, False):
        scale, zero = uniform_grid(w, block_sizes, 4, signed, scheme)
        quantizer = UniformColumns(scale, zero, block_sizes, qmin, qmax, w.shape[1])

        def refit(columns, j0, quantizer=quantizer):
            s, z = uniform_grid(columns, (block_sizes[0], columns.shape[1]), 4, signed, scheme)
            quantizer.set_block(j0 // block_sizes[1], s[:, 0], None if z is None else z[:, 0])

        use = quantizer if compiled else (lambda column, j, quantizer=quantizer: quantizer(column, j))  # no `columns`
        result = gptq(w, h, use, act_order=act_order, processing_group_size=40,
                      block_size=block_sizes[1] if per_block and not act_order else None,
                      refit=refit if per_block and not act_order else None)
        results.append((result, quantizer.integers.clone()))
    (fast, fast_ints), (loop, loop_ints) = results
    assert hasattr(UniformColumns, "columns")
    assert torch.allclose(fast.weight, loop.weight, atol=1e-6)
    assert (fast_ints != loop_ints).float().mean() < 0.01  # a fused multiply-add may flip a tie, rarely
    assert fast.loss == pytest.approx(loop.loss, rel=1e-4)


def test_the_compiled_lut_batch_agrees_with_the_column_loop():
    w, h = _problem()
    luts = torch.sort(torch.randn(w.shape[0] // 8, 16, generator=torch.Generator().manual_seed(1)) * 0.05, dim=1).values
    results = []
    for compiled in (True, False):
        quantizer = NearestLUTEntry(luts, 8, w.shape[1])
        use = quantizer if compiled else (lambda column, j, quantizer=quantizer: quantizer(column, j))
        results.append((gptq(w, h, use, processing_group_size=40), quantizer.indices.clone()))
    (fast, fast_idx), (loop, loop_idx) = results
    assert (fast_idx != loop_idx).float().mean() < 0.01
    assert fast.loss == pytest.approx(loop.loss, rel=1e-3)


def test_lut_normal_matrices_equal_the_dense_sum():
    w, h = _problem(rows=12, columns=20)
    indices = torch.randint(0, 5, w.shape, generator=torch.Generator().manual_seed(2))
    got = torch.from_numpy(lut_normal_matrices(h.numpy(), indices.numpy(), 4, 5))
    one_hot = torch.nn.functional.one_hot(indices, 5).double()  # [rows, columns, K]
    per_row = torch.einsum("rik,ij,rjl->rkl", one_hot, h.double(), one_hot)
    assert torch.allclose(got, per_row.reshape(3, 4, 5, 5).sum(1), rtol=1e-5, atol=1e-5)


def test_replaying_finished_submodules_gives_the_recomputed_weights(monkeypatch):
    """The layerwise pass replays a finished submodule's output (self_attn once q/k/v/o are compressed)
    in the later passes of the same sample; the weights must be those of recomputing it."""
    from llmpalette.quantization import layerwise

    replayed = []
    real = layerwise.Replay._replaying

    def counting(self, name, forward):
        inner = real(self, name, forward)

        def call(*args, **kwargs):
            if (name, getattr(self._local, "index", None)) in self.cache:
                replayed.append(name)
            return inner(*args, **kwargs)
        return call

    monkeypatch.setattr(layerwise.Replay, "_replaying", counting)
    with_replay = tiny_llama(seed=12).eval()
    run(with_replay, gptq_layer, samples=4)
    assert any(name.endswith("self_attn") for name in replayed)
    monkeypatch.setattr(layerwise.Replay, "finish", lambda self, selected, compressed: None)
    recomputed = tiny_llama(seed=12).eval()
    run(recomputed, gptq_layer, samples=4)
    for (name, a), (_, b) in zip(with_replay.named_parameters(), recomputed.named_parameters()):
        assert torch.equal(a, b), name

