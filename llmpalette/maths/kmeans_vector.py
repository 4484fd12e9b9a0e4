"""Weighted vector k-means (cluster_dim > 1), batched over groups.

k-means in more than one dimension is NP-hard, so this is the usual heuristic: weighted greedy
k-means++ seeding, then Lloyd iterations. The groups of a chunk run in lockstep; chunks are
sized so that the [groups, n, k] distance tensor stays within `_CHUNK_BYTES`. Every random
draw comes from a CPU `torch.Generator` and is drawn up front for all groups, so the result
depends on the seed, not on the chunking or the thread count.
"""

from __future__ import annotations

import math

import torch

from llmpalette.maths.assign import nearest_vectors

_CHUNK_BYTES = 256 * 2**20


def kmeans_vector(
    values: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means of the n vectors of each group.

    values: [G, n, d] float. weights: [G, n] >= 0, or None for all ones; a group whose weights
    are all zero is clustered with uniform weights.
    Returns (centroids [G, k, d] float32, labels [G, n] int64: the nearest centroid, lowest index
    on ties). Seeding is `kmeans_plusplus`; Lloyd then stops when no label changes, when the
    weighted squared error improves by less than `tol` (relative), or after `max_iter`
    iterations. A cluster left empty is re-seeded at the point farthest (weighted) from its
    centroid. A group with fewer than k distinct positively weighted points gets those points
    (in lexicographic order), the last repeated.
    """
    _check_inputs(values, k, weights, max_iter, tol)
    x = values.detach().to(torch.float32)
    w = _effective_weights(x, weights)
    draws = _seeding_draws(x.shape[0], k, seed).to(x.device)
    centroids = torch.empty(x.shape[0], k, x.shape[2], dtype=torch.float32, device=x.device)
    for chunk in _chunks(x.shape, k):
        seeds, exhausted = _seed_chunk(x[chunk], w[chunk], draws[:, chunk], k)
        todo = ~exhausted  # groups with at least k distinct points; the others are final
        seeds[todo] = _lloyd(x[chunk][todo], w[chunk][todo], seeds[todo], max_iter, tol)
        centroids[chunk] = seeds
    return centroids, nearest_vectors(x, centroids)


def kmeans_plusplus(
    values: torch.Tensor, k: int, weights: torch.Tensor | None = None, *, seed: int = 0
) -> torch.Tensor:
    """Weighted greedy k-means++ seeding: [G, n, d], [G, n] or None -> centroids [G, k, d] float32.

    The first centre is drawn with probability proportional to w. For each next one, 2 + ln(k)
    candidates are drawn with probability proportional to w * (squared distance to the nearest
    centre so far) and the one that leaves the smallest weighted squared error is kept (the
    greedy variant of Arthur & Vassilvitskii's seeding, as in scikit-learn). A group that runs
    out of points with positive mass has no more distinct points: its centres become those
    points in lexicographic order, the last repeated.
    """
    _check_inputs(values, k, weights, 1, 0.0)
    x = values.detach().to(torch.float32)
    w = _effective_weights(x, weights)
    draws = _seeding_draws(x.shape[0], k, seed).to(x.device)
    centroids = torch.empty(x.shape[0], k, x.shape[2], dtype=torch.float32, device=x.device)
    for chunk in _chunks(x.shape, k):
        centroids[chunk] = _seed_chunk(x[chunk], w[chunk], draws[:, chunk], k)[0]
    return centroids


def _trials(k: int) -> int:
    return 2 + int(math.log(k))


def _seeding_draws(G: int, k: int, seed: int) -> torch.Tensor:
    """Every uniform draw of the seeding, [k, G, trials] float64, from a CPU generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(k, G, _trials(k), generator=generator, dtype=torch.float64)


def _chunks(shape: torch.Size, k: int) -> list[slice]:
    """Slices of groups whose [g, n, k] distances and [g, trials, n, d] seeding tensors each
    stay within `_CHUNK_BYTES`."""
    G, n, d = shape
    per_group = n * max(4 * k, 8 * _trials(k) * (d + 1))
    step = max(1, _CHUNK_BYTES // per_group)
    return [slice(start, start + step) for start in range(0, G, step)]


def _seed_chunk(x: torch.Tensor, w: torch.Tensor, draws: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy k-means++ on x [g, n, d], w [g, n] with draws [k, g, trials] -> (centroids
    [g, k, d], exhausted [g] bool: the group has fewer than k distinct points)."""
    g, n, d = x.shape
    rows = torch.arange(g, device=x.device)
    centroids = torch.empty(g, k, d, dtype=torch.float32, device=x.device)
    exhausted = torch.zeros(g, dtype=torch.bool, device=x.device)
    nearest_sq = torch.full((g, n), torch.inf, dtype=torch.float64, device=x.device)
    mass = w.to(torch.float64)  # [g, n]
    for j in range(k):
        cumulative = torch.cumsum(mass, dim=1)  # [g, n]
        total = cumulative[:, -1:]
        exhausted |= total[:, 0] <= 0
        step_draws = draws[j, :, :1] if j == 0 else draws[j]  # [g, t]
        picks = torch.searchsorted(cumulative, step_draws * total, right=True).clamp(max=n - 1)  # [g, t]
        candidates = x[rows[:, None], picks]  # [g, t, d]
        sq = ((x[:, None] - candidates[:, :, None]).to(torch.float64) ** 2).sum(dim=-1)  # [g, t, n]
        after = torch.minimum(nearest_sq[:, None], sq)  # [g, t, n]
        best = (w[:, None] * after).sum(dim=-1).argmin(dim=1)  # [g]
        centroids[:, j] = candidates[rows, best]
        nearest_sq = after[rows, best]
        mass = w * nearest_sq
    for i in exhausted.nonzero()[:, 0].tolist():
        centroids[i] = _distinct_padded(x[i][w[i] > 0], k)
    return centroids, exhausted


def _check_inputs(values: torch.Tensor, k: int, weights: torch.Tensor | None, max_iter: int, tol: float) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: must be a positive integer, got {k!r}")
    if values.dim() != 3 or not values.dtype.is_floating_point:
        raise ValueError(f"values: must be a float tensor [G, n, d], got {values.dtype} {list(values.shape)}")
    if values.shape[1] == 0 or values.shape[2] == 0:
        raise ValueError(f"values: each group needs at least one vector of size >= 1, got {list(values.shape)}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("values: must be finite (found NaN or inf)")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter: must be a non-negative integer, got {max_iter!r}")
    if not tol >= 0:
        raise ValueError(f"tol: must be >= 0, got {tol!r}")
    if weights is None:
        return
    if weights.shape != values.shape[:2]:
        raise ValueError(f"weights: shape {list(weights.shape)} must be [G, n] = {list(values.shape[:2])}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("weights: must be finite and >= 0")


def _effective_weights(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """[G, n] float32 weights; None and all-zero groups become uniform."""
    if weights is None:
        return torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
    w = weights.detach().to(device=x.device, dtype=torch.float32)
    return torch.where((w.sum(dim=1) == 0)[:, None], torch.ones_like(w), w)


def _distinct_padded(points: torch.Tensor, k: int) -> torch.Tensor:
    """[p, d] -> [k, d]: the distinct points in lexicographic order, the last repeated (p' <= k)."""
    distinct = torch.unique(points, dim=0)  # sorted lexicographically
    index = torch.arange(k, device=points.device).clamp(max=distinct.shape[0] - 1)
    return distinct[index]


def _lloyd(x: torch.Tensor, w: torch.Tensor, centroids: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Batched Lloyd iterations: x [g, n, d], w [g, n], centroids [g, k, d] -> centroids [g, k, d]."""
    k = centroids.shape[1]
    x_sq = (x * x).sum(dim=-1)  # [g, n]
    labels = None
    previous_error = torch.inf
    for _ in range(max_iter):
        dist = _squared_distances(x, x_sq, centroids)  # [g, n, k]
        nearest_dist, new_labels = dist.min(dim=-1)
        error = float((w * nearest_dist).sum())
        if labels is not None and (torch.equal(new_labels, labels) or previous_error - error <= tol * previous_error):
            break
        labels, previous_error = new_labels, error
        one_hot = torch.nn.functional.one_hot(labels, k).to(x.dtype) * w[..., None]  # [g, n, k]
        mass = one_hot.sum(dim=1)  # [g, k]
        sums = one_hot.transpose(1, 2) @ x  # [g, k, d]
        filled = mass > 0
        centroids = torch.where(filled[..., None], sums / mass.clamp(min=torch.finfo(x.dtype).tiny)[..., None], centroids)
        if not bool(filled.all()):
            centroids = _reseed_empty(x, w, centroids, labels, filled)
    return centroids


def _squared_distances(x: torch.Tensor, x_sq: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """||x - c||^2 for every point and centroid: [g, n, d], [g, n], [g, k, d] -> [g, n, k] (>= 0)."""
    c_sq = (centroids * centroids).sum(dim=-1)  # [g, k]
    dist = torch.baddbmm(x_sq[..., None] + c_sq[:, None, :], x, centroids.transpose(1, 2), alpha=-2.0)
    return dist.clamp(min=0)


def _reseed_empty(
    x: torch.Tensor, w: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, filled: torch.Tensor
) -> torch.Tensor:
    """Move the empty clusters of a group to its points of largest weighted squared distance to
    their own centroid (largest first, ties to the lower index), one point per cluster. Only
    points with a positive distance qualify; an empty cluster without one keeps its centroid."""
    centroids = centroids.clone()
    own = torch.gather(centroids, 1, labels[..., None].expand(-1, -1, x.shape[2]))  # [g, n, d]
    far = w * ((x - own) ** 2).sum(dim=-1)  # [g, n]
    farthest = torch.sort(far, dim=1, descending=True, stable=True).indices  # [g, n]
    for g in (~filled).any(dim=1).nonzero()[:, 0].tolist():
        empty = (~filled[g]).nonzero()[:, 0]
        take = farthest[g, : empty.shape[0]]
        take = take[far[g, take] > 0]
        centroids[g, empty[: take.shape[0]]] = x[g, take]
    return centroids
