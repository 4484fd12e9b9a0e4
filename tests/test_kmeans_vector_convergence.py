"""Vector k-means converges per group: a group's result does not depend on the groups beside it."""

from __future__ import annotations

import pytest
import torch

import llmpalette.maths.kmeans_vector as kv
from llmpalette.maths.kmeans_vector import kmeans_plusplus, kmeans_vector


def weighted_sse(values: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[G, n, d], [G, n], [G, k, d], [G, n] -> [G] float64."""
    picked = torch.gather(centroids, 1, labels[..., None].expand(-1, -1, values.shape[2]))
    return (weights.double() * ((values - picked).double() ** 2).sum(-1)).sum(dim=1)


def mixed_scales(seed: int, scales: tuple[float, ...], n: int = 2000, d: int = 2):
    """Groups of random points at very different scales: [G, n, d] values and [G, n] weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(scales), n, d, generator=gen) * torch.tensor(scales)[:, None, None]
    w = torch.rand(len(scales), n, generator=gen)
    return x, w


def reference_lloyd(x: torch.Tensor, w: torch.Tensor, centroids: torch.Tensor, max_iter: int = 100, tol: float = 1e-6):
    """Lloyd on one group, x [n, 2], w [n], centroids [k, 2]: stop when no label changes, when the
    weighted squared error improves by at most tol (relative), or after max_iter updates."""
    x64, w64 = x.double(), w.double()
    labels, previous = None, None
    for _ in range(max_iter):
        new_labels = ((x[:, None] - centroids[None]) ** 2).sum(-1).argmin(dim=1)  # d = 2: one rounding, any order
        error = float((w64 * ((x64 - centroids[new_labels].double()) ** 2).sum(-1)).sum())
        if labels is not None and (torch.equal(new_labels, labels) or previous - error <= tol * previous):
            break
        labels, previous = new_labels, error
        centroids = centroids.clone()
        for c in range(centroids.shape[0]):
            members = labels == c
            assert bool(members.any()), "the reference does not re-seed empty clusters"
            centroids[c] = ((w64[members, None] * x64[members]).sum(0) / w64[members].sum()).float()
    return centroids


@pytest.mark.parametrize("seed", [7, 11])
def test_groups_at_scales_1e4_apart_give_what_each_gives_alone(seed):
    x, w = mixed_scales(seed, (1e-4, 1.0))
    centroids, labels = kmeans_vector(x, 16, w, seed=seed)
    for g in range(2):
        alone_c, alone_l = kmeans_vector(x[g : g + 1], 16, w[g : g + 1], seed=seed)
        assert torch.equal(centroids[g], alone_c[0]) and torch.equal(labels[g], alone_l[0]), g
    swapped_c, swapped_l = kmeans_vector(x.flip(0), 16, w.flip(0), seed=seed)
    assert torch.equal(swapped_c, centroids.flip(0)) and torch.equal(swapped_l, labels.flip(0))


def test_one_group_per_chunk_gives_the_same_result(monkeypatch):
    x, w = mixed_scales(3, (1e-4, 1.0, 1e-2, 30.0, 1e-3))
    whole = kmeans_vector(x, 16, w, seed=3)
    monkeypatch.setattr(kv, "_CHUNK_BYTES", 1)  # one group per chunk
    chunked = kmeans_vector(x, 16, w, seed=3)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_a_small_scale_group_is_not_stopped_by_a_large_one():
    x, w = mixed_scales(7, (1e-4, 1.0))
    centroids, labels = kmeans_vector(x, 16, w, seed=7)
    alone_c, alone_l = kmeans_vector(x[:1], 16, w[:1], seed=7)
    together = weighted_sse(x[:1], w[:1], centroids[:1], labels[:1])
    assert float(together) <= float(weighted_sse(x[:1], w[:1], alone_c, alone_l))
    seeds = kmeans_plusplus(x[:1], 16, w[:1], seed=7)
    assert torch.equal(centroids[0], reference_lloyd(x[0], w[0], seeds[0]))


def test_a_cluster_emptied_during_lloyd_is_reseeded_within_its_group():
    x, w = mixed_scales(5, (1e-4, 1.0), n=300)
    seeds = kmeans_plusplus(x, 8, w, seed=5)
    seeds[:, 3] = 1e3  # far from every point: empty after the first assignment
    together = kv._lloyd(x, w, seeds, 100, 1e-6)
    for g in range(2):
        alone = kv._lloyd(x[g : g + 1], w[g : g + 1], seeds[g : g + 1], 100, 1e-6)
        assert torch.equal(together[g], alone[0])
    assert bool((together.abs() < 10).all())  # the far centroid was moved onto a point
    labels = torch.cdist(x, together).argmin(-1)
    assert all(len(set(labels[g].tolist())) == 8 for g in range(2))
