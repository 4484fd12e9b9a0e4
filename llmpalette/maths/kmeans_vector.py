"""Weighted vector k-means (cluster_dim > 1), batched over groups.

k-means in more than one dimension is NP-hard, so this is the usual heuristic: weighted greedy
k-means++ seeding, then Lloyd iterations. Groups are batched in chunks sized so that the
[groups, n, k] distance tensor stays within `_CHUNK_BYTES`, but each group is its own problem:
it stops on its own test and is then frozen while the others go on.

Determinism: a group's result depends on its own values, weights and the seed only, not on
the other groups, the chunking or the thread count. The seeding's uniform draws come from a
CPU `torch.Generator` and are the same for every group. Lloyd uses only operations whose
result for one group is independent of the rest of the batch: distances one coordinate at a
time (elementwise), cluster sums by `scatter_add_` (sequential along the points), and the
error by a pairwise sum of elementwise adds (`torch.sum` splits a lone long row across
threads, so its rounding depends on the thread count and on the batch).
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
    on ties). Seeding is `kmeans_plusplus`; then each group runs Lloyd until its own labels do
    not change, its own weighted squared error improves by at most `tol` times its previous
    error, or after `max_iter` centroid updates. A group that has stopped is not updated further,
    so its result is the same whatever groups share the call. A cluster left empty is re-seeded
    at the point farthest (weighted) from its centroid. A group with fewer than k distinct
    positively weighted points gets those points (in lexicographic order), the last repeated.
    """
    _check_inputs(values, k, weights, max_iter, tol)
    x = values.detach().to(torch.float32)
    w = _effective_weights(x, weights)
    draws = _seeding_draws(k, seed).to(x.device)
    centroids = torch.empty(x.shape[0], k, x.shape[2], dtype=torch.float32, device=x.device)
    for chunk in _chunks(x.shape, k):
        seeds, exhausted = _seed_chunk(x[chunk], w[chunk], draws, k)
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
    points in lexicographic order, the last repeated. Every group uses the same uniform draws
    (from `seed`), so a group's centres do not depend on the other groups.
    """
    _check_inputs(values, k, weights, 1, 0.0)
    x = values.detach().to(torch.float32)
    w = _effective_weights(x, weights)
    draws = _seeding_draws(k, seed).to(x.device)
    centroids = torch.empty(x.shape[0], k, x.shape[2], dtype=torch.float32, device=x.device)
    for chunk in _chunks(x.shape, k):
        centroids[chunk] = _seed_chunk(x[chunk], w[chunk], draws, k)[0]
    return centroids


def _trials(k: int) -> int:
    return 2 + int(math.log(k))


def _seeding_draws(k: int, seed: int) -> torch.Tensor:
    """Every uniform draw of the seeding, [k, trials] float64 shared by all groups, from a CPU generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(k, _trials(k), generator=generator, dtype=torch.float64)


def _chunks(shape: torch.Size, k: int) -> list[slice]:
    """Slices of groups whose [g, n, k] distances and [g, trials, n, d] seeding tensors each
    stay within `_CHUNK_BYTES`."""
    G, n, d = shape
    per_group = n * max(4 * k, 8 * _trials(k) * (d + 1))
    step = max(1, _CHUNK_BYTES // per_group)
    return [slice(start, start + step) for start in range(0, G, step)]


def _seed_chunk(x: torch.Tensor, w: torch.Tensor, draws: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy k-means++ on x [g, n, d], w [g, n] with draws [k, trials] -> (centroids
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
        step_draws = (draws[j, :1] if j == 0 else draws[j]).expand(g, -1)  # [g, t]
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
    """Lloyd iterations, each group to its own stop: x [g, n, d], w [g, n], centroids [g, k, d]
    -> centroids [g, k, d].

    A group stops when its labels do not change or its weighted squared error improves by at
    most `tol` times its previous error; it is then dropped from the batch, so the groups still
    running never move it and its centroids are those it would reach alone.
    """
    centroids = centroids.clone()
    active = torch.arange(x.shape[0], device=x.device)  # the groups still running
    xa, wa = x, w
    labels = previous_error = None
    for _ in range(max_iter):
        nearest_dist, new_labels = _squared_distances(xa[:, :, None], centroids[active][:, None]).min(dim=-1)  # [a, n]
        error = _row_sums(wa.to(torch.float64) * nearest_dist.to(torch.float64))  # [a]
        if labels is not None:
            running = ~((new_labels == labels).all(dim=1) | (previous_error - error <= tol * previous_error))
            if not bool(running.all()):
                active, xa, wa, new_labels, error = (t[running] for t in (active, xa, wa, new_labels, error))
            if active.numel() == 0:
                break
        labels, previous_error = new_labels, error
        centroids[active] = _means(xa, wa, labels, centroids[active])
    return centroids


def _means(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The weighted mean of each cluster, [g, n, d], [g, n], [g, n], [g, k, d] -> [g, k, d]; an
    empty cluster is re-seeded (`_reseed_empty`). Sums in float64 by `scatter_add_`, which adds a
    cluster's points in order, whatever else is in the batch."""
    g, n, d = x.shape
    k = centroids.shape[1]
    w64 = w.to(torch.float64)
    mass = torch.zeros(g, k, dtype=torch.float64, device=x.device).scatter_add_(1, labels, w64)  # [g, k]
    sums = torch.zeros(g, k, d, dtype=torch.float64, device=x.device).scatter_add_(
        1, labels[..., None].expand(-1, -1, d), w64[..., None] * x.to(torch.float64)
    )  # [g, k, d]
    filled = mass > 0
    means = (sums / torch.where(filled, mass, 1.0)[..., None]).to(torch.float32)
    centroids = torch.where(filled[..., None], means, centroids)
    if bool(filled.all()):
        return centroids
    return _reseed_empty(x, w, centroids, labels, filled)


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j (a_j - b_j)^2 over the last dim of two broadcastable tensors, one coordinate at a
    time: elementwise, so exact differences and nothing that depends on the rest of the batch."""
    dist = (a[..., 0] - b[..., 0]).square()
    for j in range(1, a.shape[-1]):
        dist += (a[..., j] - b[..., j]).square()
    return dist


def _row_sums(t: torch.Tensor) -> torch.Tensor:
    """[g, n] -> [g]: pairwise sums by halving the zero-padded rows. Elementwise adds only, so a
    row's sum is the same bits whatever the other rows and the thread count."""
    size = 1 << (t.shape[1] - 1).bit_length()
    t = torch.nn.functional.pad(t, (0, size - t.shape[1]))
    while t.shape[1] > 1:
        half = t.shape[1] // 2
        t = t[:, :half] + t[:, half:]
    return t[:, 0]


def _reseed_empty(
    x: torch.Tensor, w: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, filled: torch.Tensor
) -> torch.Tensor:
    """Move the empty clusters of a group to its points of largest weighted squared distance to
    their own centroid (largest first, ties to the lower index), one point per cluster. Only
    points with a positive distance qualify; an empty cluster without one keeps its centroid."""
    centroids = centroids.clone()
    own = torch.gather(centroids, 1, labels[..., None].expand(-1, -1, x.shape[2]))  # [g, n, d]
    far = w * _squared_distances(x, own)  # [g, n]
    farthest = torch.sort(far, dim=1, descending=True, stable=True).indices  # [g, n]
    for g in (~filled).any(dim=1).nonzero()[:, 0].tolist():
        empty = (~filled[g]).nonzero()[:, 0]
        take = farthest[g, : empty.shape[0]]
        take = take[far[g, take] > 0]
        centroids[g, empty[: take.shape[0]]] = x[g, take]
    return centroids
