"""k-means maths: exact 1-D k-means against brute force and a plain DP; vector k-means behaviour."""

from __future__ import annotations

import itertools

import numba
import numpy as np
import pytest
import torch

from llmpalette.maths.kmeans1d import kmeans_1d
from llmpalette.maths.kmeans_vector import kmeans_plusplus, kmeans_vector

BACKENDS = ("numba", "torch")


def weighted_sse(values: torch.Tensor, weights: torch.Tensor | None, centroids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[G, n], [G, n] | None, [G, k], [G, n] -> [G] float64: sum_i w_i (x_i - c_label_i)^2."""
    x = values.to(torch.float64)
    w = torch.ones_like(x) if weights is None else weights.to(torch.float64)
    return (w * (x - torch.gather(centroids.to(torch.float64), 1, labels)) ** 2).sum(dim=1)


def cluster_cost(x: np.ndarray, w: np.ndarray) -> float:
    total = w.sum()
    if total == 0:
        return 0.0
    mean = (w * x).sum() / total
    return float((w * (x - mean) ** 2).sum())


def brute_force_optimum(x: np.ndarray, w: np.ndarray, k: int) -> float:
    """Minimum over every labelling of the n values with at most k labels (k^n of them)."""
    if w.sum() == 0:
        w = np.ones_like(w)
    best = np.inf
    for labels in itertools.product(range(k), repeat=len(x)):
        labels = np.array(labels)
        best = min(best, sum(cluster_cost(x[labels == c], w[labels == c]) for c in range(k)))
    return best


def contiguous_optimum(x: np.ndarray, w: np.ndarray, k: int) -> float:
    """Minimum over every split of the sorted values into at most k contiguous runs."""
    order = np.argsort(x, kind="stable")
    x, w = x[order], w[order]
    if w.sum() == 0:
        w = np.ones_like(w)
    n = len(x)
    best = np.inf
    for parts in range(1, min(k, n) + 1):
        for cuts in itertools.combinations(range(1, n), parts - 1):
            bounds = (0, *cuts, n)
            best = min(best, sum(cluster_cost(x[a:b], w[a:b]) for a, b in zip(bounds[:-1], bounds[1:])))
    return best


def plain_dp_optimum(x: np.ndarray, w: np.ndarray, k: int) -> float:
    """The textbook O(k n^2) dynamic programme over the sorted values (no monotonicity used)."""
    order = np.argsort(x)
    x, w = x[order].astype(np.float64), w[order].astype(np.float64)
    n = len(x)
    c = x - (w * x).sum() / w.sum()
    S0 = np.concatenate([[0.0], np.cumsum(w)])
    S1 = np.concatenate([[0.0], np.cumsum(w * c)])
    S2 = np.concatenate([[0.0], np.cumsum(w * c * c)])

    def cost(s: np.ndarray, t: int) -> np.ndarray:
        d0 = S0[t] - S0[s]
        d1 = S1[t] - S1[s]
        safe = np.where(d0 > 0, d0, 1.0)
        return np.where(d0 > 0, (S2[t] - S2[s]) - d1 * d1 / safe, 0.0)

    D = np.array([cost(np.array([0]), t)[0] for t in range(n + 1)])
    for _ in range(2, k + 1):
        D = np.array([D[0]] + [np.min(D[:t] + cost(np.arange(t), t)) for t in range(1, n + 1)])
    return float(D[n])


def check_labels_nearest(values: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor) -> None:
    """Each label is the nearest centroid, the lowest index among equally near ones."""
    dist = (values.to(torch.float64)[..., None] - centroids.to(torch.float64)[:, None, :]).abs()  # [G, n, k]
    assert torch.equal(labels, dist.argmin(dim=-1))


# --------------------------------------------------------------------------------------------
# exact 1-D k-means


BRUTE_CASES = [
    # (values, weights or None, k)
    ([0.3, -1.2, 2.5, 0.9, 1.1, -0.4, 3.3], None, 3),
    ([0.3, -1.2, 2.5, 0.9, 1.1, -0.4, 3.3], [1.0, 2.0, 0.5, 3.0, 1.5, 0.25, 2.0], 2),
    ([1.0, 1.0, 2.0, 2.0, 2.0, 5.0, 7.0], None, 3),  # duplicates
    ([1.0, 1.0, 2.0, 2.0, 2.0, 5.0, 7.0], [0.5, 3.0, 1.0, 1.0, 0.0, 2.0, 0.0], 3),  # zero weights
    ([4.0, -1.0, 4.0, -1.0, 4.0, 0.5], None, 4),  # fewer distinct values than k
    ([0.1, 0.7, -0.3, 0.2, 0.9, 1.4], None, 1),  # k = 1
    ([0.1, 0.7, -0.3, 0.2], None, 4),  # n = k
    ([2.0, 3.0, 5.0, 8.0, 13.0, 21.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 2),  # all zero: uniform
    ([0.5, 0.5, 0.5, 0.5], None, 3),  # one distinct value
    ([1e6 + 0.1, 1e6 + 0.2, 1e6 + 0.4, 1e6 + 0.8, 1e6 + 1.6, 1e6 + 3.2], None, 2),  # large offset
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(BRUTE_CASES)))
def test_kmeans_1d_matches_brute_force_over_all_labellings(backend, case):
    values, weights, k = BRUTE_CASES[case]
    x = torch.tensor([values], dtype=torch.float64)
    w = None if weights is None else torch.tensor([weights], dtype=torch.float64)
    centroids, labels = kmeans_1d(x, k, w, backend=backend)
    w_np = np.ones(len(values)) if weights is None else np.array(weights)
    optimum = brute_force_optimum(np.array(values), w_np, k)
    effective = None if w is None or w.sum() == 0 else w  # all-zero weights count as uniform
    assert weighted_sse(x, effective, centroids, labels).item() == pytest.approx(optimum, rel=1e-9, abs=1e-9)
    assert centroids.shape == (1, k) and centroids.dtype == torch.float64
    assert bool((centroids[:, 1:] >= centroids[:, :-1]).all())
    check_labels_nearest(x, centroids, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_1d_matches_contiguous_enumeration(backend):
    rng = np.random.default_rng(1)
    for trial in range(40):
        n = int(rng.integers(1, 10))
        k = int(rng.integers(1, 5))
        x = np.round(rng.normal(size=n), 1)  # rounding makes duplicates common
        w = rng.choice([0.0, 0.5, 1.0, 3.0], size=n) if trial % 2 else np.ones(n)
        x_t = torch.tensor(x)[None]
        w_t = torch.tensor(w)[None]
        centroids, labels = kmeans_1d(x_t, k, w_t, backend=backend)
        cost = weighted_sse(x_t, w_t if w.sum() > 0 else None, centroids, labels).item()
        assert cost == pytest.approx(contiguous_optimum(x, w, k), rel=1e-9, abs=1e-12), (x, w, k)
        check_labels_nearest(x_t, centroids, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_distinct_values_than_k_give_the_values_padded(backend):
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0], [7.0, 7.0, 7.0, 7.0, 7.0], [5.0, 4.0, 9.0, 6.0, 8.0]])
    w = torch.tensor([[1.0, 1.0, 1.0, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    centroids, labels = kmeans_1d(x, 6, w, backend=backend)
    expected = torch.tensor(
        [[1.0, 3.0, 3.0, 3.0, 3.0, 3.0], [7.0] * 6, [4.0, 5.0, 6.0, 8.0, 9.0, 9.0]], dtype=torch.float64
    )
    assert torch.equal(centroids, expected)
    # the zero-weight 2.0 sits halfway between 1 and 3: the lower index wins; equal entries: the first
    assert labels.tolist() == [[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 4, 2, 3]]


@pytest.mark.parametrize("k", [2, 4, 8, 16, 64, 256])
def test_numba_and_torch_backends_agree(k):
    gen = torch.Generator().manual_seed(k)
    shapes = [(3, 40), (4, 300), (2, 1000)] if k <= 16 else [(1, 320)]
    for G, n in shapes:
        x = torch.randn(G, n, generator=gen, dtype=torch.float64)
        w = torch.rand(G, n, generator=gen, dtype=torch.float64)
        for weights in (None, w):
            c_numba, l_numba = kmeans_1d(x, k, weights, backend="numba")
            c_torch, l_torch = kmeans_1d(x, k, weights, backend="torch")
            torch.testing.assert_close(c_numba, c_torch, rtol=1e-12, atol=0)
            assert torch.equal(l_numba, l_torch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_plain_quadratic_dp(backend):
    rng = np.random.default_rng(7)
    for k, weighted in ((3, False), (8, True), (16, False)):
        x = np.concatenate([rng.normal(size=200), rng.laplace(size=100) * 3])
        w = rng.exponential(size=x.shape) if weighted else np.ones_like(x)
        x_t = torch.tensor(x)[None]
        w_t = torch.tensor(w)[None]
        centroids, labels = kmeans_1d(x_t, k, w_t if weighted else None, backend=backend)
        cost = weighted_sse(x_t, w_t, centroids, labels).item()
        assert cost == pytest.approx(plain_dp_optimum(x, w, k), rel=1e-10)


def test_quantized_weights_with_many_duplicates_match_plain_dp():
    """Weights stored as 4-bit blocks (like the GGUF default model): few distinct values, many copies."""
    gen = torch.Generator().manual_seed(3)
    scale = torch.rand(2, 8, 1, generator=gen) * 0.1
    levels = torch.randint(0, 16, (2, 8, 32), generator=gen).float()
    x = (levels * scale - 0.7 * scale).reshape(2, -1)  # [2, 256], about 128 distinct values each
    centroids, labels = kmeans_1d(x, 16)
    for g in range(2):
        optimum = plain_dp_optimum(x[g].double().numpy(), np.ones(x.shape[1]), 16)
        assert weighted_sse(x[g : g + 1], None, centroids[g : g + 1], labels[g : g + 1]).item() == pytest.approx(optimum, rel=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_nearest_sorted_and_zero_weights_labelled(backend):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 200, generator=gen)
    w = torch.rand(6, 200, generator=gen) * (torch.rand(6, 200, generator=gen) > 0.3)
    centroids, labels = kmeans_1d(x, 8, w, backend=backend)
    assert bool((centroids[:, 1:] > centroids[:, :-1]).all())
    assert labels.dtype == torch.int64 and labels.shape == x.shape
    check_labels_nearest(x, centroids, labels)


def test_deterministic_across_calls_and_thread_counts():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(9, 500, generator=gen)
    w = torch.rand(9, 500, generator=gen)
    first = kmeans_1d(x, 16, w, backend="numba")
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = kmeans_1d(x, 16, w, backend="numba")
    finally:
        numba.set_num_threads(threads)
    again = kmeans_1d(x, 16, w, backend="numba")
    for a, b in ((first, single), (first, again)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch_runs = [kmeans_1d(x[:3], 8, w[:3], backend="torch") for _ in range(2)]
    assert torch.equal(torch_runs[0][0], torch_runs[1][0]) and torch.equal(torch_runs[0][1], torch_runs[1][1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_any_float_dtype_is_clustered_in_float64(dtype):
    x = torch.linspace(-1, 1, 64).to(dtype)[None]
    c_numba, l_numba = kmeans_1d(x, 4, backend="numba")
    c_torch, l_torch = kmeans_1d(x, 4, backend="torch")
    assert c_numba.dtype == torch.float64
    torch.testing.assert_close(c_numba, c_torch, rtol=1e-12, atol=0)
    assert torch.equal(l_numba, l_torch)
    optimum = plain_dp_optimum(x[0].double().numpy(), np.ones(64), 4)
    assert weighted_sse(x, None, c_numba, l_numba).item() == pytest.approx(optimum, rel=1e-12)


def test_torch_backend_chunks_groups_without_changing_results(monkeypatch):
    import llmpalette.maths.kmeans1d as km

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(7, 120, generator=gen)
    w = torch.rand(7, 120, generator=gen)
    whole = kmeans_1d(x, 8, w, backend="torch")
    monkeypatch.setattr(km, "_TORCH_CHUNK_VALUES", 250)  # two groups per chunk
    chunked = kmeans_1d(x, 8, w, backend="torch")
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_no_groups_and_non_contiguous_input():
    centroids, labels = kmeans_1d(torch.empty(0, 5), 4)
    assert centroids.shape == (0, 4) and labels.shape == (0, 5)
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(2))
    c_t, l_t = kmeans_1d(x.t(), 3)
    c, l = kmeans_1d(x.t().contiguous(), 3)
    assert torch.equal(c_t, c) and torch.equal(l_t, l)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"values": torch.zeros(2, 3), "k": 0}, "k: must be a positive integer"),
        ({"values": torch.zeros(6), "k": 2}, "values: must be a float tensor [G, n]"),
        ({"values": torch.zeros(2, 3, dtype=torch.int64), "k": 2}, "values: must be a float tensor"),
        ({"values": torch.zeros(2, 0), "k": 2}, "at least one value"),
        ({"values": torch.tensor([[0.0, float("nan")]]), "k": 2}, "values: must be finite"),
        ({"values": torch.tensor([[0.0, float("inf")]]), "k": 2}, "values: must be finite"),
        ({"values": torch.zeros(2, 3), "k": 2, "weights": torch.ones(2, 4)}, "weights: shape [2, 4]"),
        ({"values": torch.zeros(1, 2), "k": 2, "weights": torch.tensor([[1.0, -1.0]])}, "weights: must be finite and >= 0"),
        ({"values": torch.zeros(1, 2), "k": 2, "weights": torch.tensor([[1.0, float("nan")]])}, "weights: must be finite"),
        ({"values": torch.zeros(1, 2), "k": 2, "backend": "cuda"}, "backend: must be one of"),
    ],
)
def test_kmeans_1d_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        kmeans_1d(**kwargs)


# --------------------------------------------------------------------------------------------
# vector k-means


def vector_sse(values, weights, centroids, labels):
    w = torch.ones(values.shape[:2]) if weights is None else weights
    picked = torch.gather(centroids, 1, labels[..., None].expand(-1, -1, values.shape[2]))
    return (w.double() * ((values - picked).double() ** 2).sum(-1)).sum(dim=1)


def planted(seed: int, G: int = 4, k: int = 5, n: int = 300, d: int = 3, spread: float = 0.05):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(G, k, d, generator=gen) * 10
    truth = torch.randint(0, k, (G, n), generator=gen)
    truth[:, :k] = torch.arange(k)  # every planted cluster is used
    x = torch.gather(centers, 1, truth[..., None].expand(-1, -1, d)) + spread * torch.randn(G, n, d, generator=gen)
    return x, truth


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two labellings of one group describe the same clusters (up to renaming)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_vector_kmeans_recovers_planted_clusters_exactly():
    x, truth = planted(0)
    w = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(1)) + 0.1
    for weights in (None, w):
        centroids, labels = kmeans_vector(x, 5, weights)
        assert centroids.shape == (4, 5, 3) and centroids.dtype == torch.float32
        for g in range(4):
            assert same_partition(labels[g], truth[g])
            ww = torch.ones(x.shape[1]) if weights is None else weights[g]
            for c in range(5):
                members = labels[g] == c
                mean = (ww[members, None] * x[g, members]).sum(0) / ww[members].sum()
                torch.testing.assert_close(centroids[g, c], mean, rtol=1e-5, atol=1e-5)


def test_vector_kmeans_never_worse_than_its_seeding():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 400, 2, generator=gen)
    w = torch.rand(8, 400, generator=gen)
    for weights in (None, w):
        seeds = kmeans_plusplus(x, 16, weights, seed=3)
        seed_labels = torch.cdist(x.double(), seeds.double()).argmin(-1)
        centroids, labels = kmeans_vector(x, 16, weights, seed=3)
        before = vector_sse(x, weights, seeds, seed_labels)
        after = vector_sse(x, weights, centroids, labels)
        assert bool((after <= before * (1 + 1e-6)).all())
        assert float(after.sum()) < float(before.sum())
    centroids, _ = kmeans_vector(x, 16, seed=3, max_iter=0)
    assert torch.equal(centroids, kmeans_plusplus(x, 16, seed=3))


def test_vector_kmeans_is_deterministic_for_a_seed():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 300, 4, generator=gen)
    a = kmeans_vector(x, 8, seed=7)
    b = kmeans_vector(x, 8, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = kmeans_vector(x, 8, seed=8)
    assert not torch.equal(a[0], c[0])


def test_vector_kmeans_does_not_depend_on_chunking(monkeypatch):
    import llmpalette.maths.kmeans_vector as kv

    gen = torch.Generator().manual_seed(12)
    x = torch.randn(6, 200, 2, generator=gen)
    w = torch.rand(6, 200, generator=gen)
    whole = kmeans_vector(x, 8, w, seed=1)
    monkeypatch.setattr(kv, "_CHUNK_BYTES", 1)  # one group per chunk
    chunked = kmeans_vector(x, 8, w, seed=1)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_vector_kmeans_fewer_distinct_points_than_k():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    centroids, labels = kmeans_vector(x, 4, w)
    assert centroids[0].tolist() == [[0.0, 2.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    assert labels.tolist() == [[1, 0, 1, 0, 0]]  # the zero-weight (5, 5) is nearest to (0, 2)
    centroids, labels = kmeans_vector(x, 8)
    assert centroids[0].tolist() == [[0.0, 2.0], [1.0, 0.0], [5.0, 5.0]] + [[5.0, 5.0]] * 5
    assert labels.tolist() == [[1, 0, 1, 0, 2]]
    # values whose repeated mean would round: the centroids are the points themselves, bit for bit
    x = torch.tensor([[[0.1, 0.3], [0.7, 0.2], [0.1, 0.3], [0.7, 0.2], [0.1, 0.3], [0.1, 0.3], [0.1, 0.3]]])
    centroids, labels = kmeans_vector(x, 3)
    assert torch.equal(centroids[0], x[0, [0, 1, 1]])
    assert labels.tolist() == [[0, 1, 0, 1, 0, 0, 0]]


def test_vector_kmeans_in_one_dimension_is_close_to_the_exact_optimum():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(40, 400, 1, generator=gen)
    for k, mean_gap in ((4, 0.02), (8, 0.08), (16, 0.15)):
        centroids, labels = kmeans_vector(x, k)
        exact_c, exact_l = kmeans_1d(x[..., 0], k)
        optimum = weighted_sse(x[..., 0], None, exact_c, exact_l)
        gap = vector_sse(x, None, centroids, labels) / optimum - 1
        assert float(gap.min()) >= -1e-6
        assert float(gap.mean()) <= mean_gap, (k, float(gap.mean()))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"values": torch.zeros(2, 3), "k": 2}, "values: must be a float tensor [G, n, d]"),
        ({"values": torch.zeros(2, 3, 1), "k": 0}, "k: must be a positive integer"),
        ({"values": torch.zeros(1, 2, 1), "k": 2, "weights": torch.tensor([[-1.0, 1.0]])}, "weights: must be finite and >= 0"),
        ({"values": torch.zeros(1, 2, 1), "k": 2, "weights": torch.ones(2, 1)}, "weights: shape [2, 1]"),
        ({"values": torch.zeros(1, 2, 1), "k": 2, "max_iter": -1}, "max_iter: must be a non-negative integer"),
        ({"values": torch.full((1, 2, 1), float("nan")), "k": 2}, "values: must be finite"),
    ],
)
def test_kmeans_vector_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        kmeans_vector(**kwargs)
