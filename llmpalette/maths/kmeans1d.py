"""Exact weighted 1-D k-means, batched over groups.

For each group (a row of `values`) the optimal k-means partition of the sorted values is a split
into k contiguous clusters, found exactly by dynamic programming over the distinct values
(duplicates merged with their summed weights):

    D[j][t] = min_{s < t} D[j-1][s] + cost(s, t),     cost(s, t) = S2 - S1^2 / S0 over values s..t-1,

with prefix sums S0, S1, S2 of w, w*x, w*x^2 (x centred on the group's weighted mean, which
keeps the subtraction well conditioned). cost is Monge, so for each layer j the leftmost optimal
split T[j][t] is nondecreasing in t, and T[j-1][t] <= T[j][t] (Grønlund et al. 2017, "Fast exact
k-means, k-medians and Bregman divergence clustering in 1D"; the second bound is the
Knuth-Yao interleaving). Each layer is solved by divide and conquer on t, level by level: at
level h the rows t = tlo + h-1 + 2h*q take their candidate window from the rows already solved
at distance h on either side. Both backends walk exactly these windows and evaluate the same
expression, `E[s] - d1*d1 / d0`, so they pick the same splits.

- "numba": one compiled CPU call per tensor, parallel over groups, per-thread buffers.
- "torch": the same level-synchronous search as batched tensor ops; runs on any device.
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np
import torch
from numba import njit, prange

from llmpalette.maths.assign import nearest_sorted_1d

BACKENDS = ("auto", "numba", "torch")

# numba's default OpenMP layer loads the system libgomp next to torch's own copy; on a busy machine
# the two runtimes' spinning threads fight over the cores and slow both several-fold (measured:
# 48 s instead of 10 s for the 4-bit default model at load 3). numba's own work queue avoids it.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"
# The work queue takes one parallel region at a time (numba aborts the process when two Python threads
# enter one together): callers on several threads take turns.
_PARALLEL_REGION = threading.Lock()

# A window at least this long is scanned by the vectorised two-pass search.
_LONG_WINDOW = 48
# The torch backend handles groups in chunks of at most this many values (bounds its memory).
_TORCH_CHUNK_VALUES = 2**22


def kmeans_1d(
    values: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact weighted k-means of each row of `values`.

    values: [G, n] float (any float dtype; computed in float64). weights: [G, n] >= 0, or None for
    all ones; a row whose weights are all zero is clustered with uniform weights.
    Returns (centroids [G, k] float64 sorted ascending, labels [G, n] int64).

    centroids[g] is the global minimiser of sum_i w_i * (x_i - c_{label_i})^2 (up to float64
    rounding). A row with fewer than k distinct positively weighted values gets those values,
    padded by repeating the largest. labels[g, i] is the nearest centroid of values[g, i] (lowest
    index on ties, so the first of equal centroids), zero-weight values included.
    backend: "numba" (CPU), "torch" (any device), or "auto" (numba on CPU, torch elsewhere).
    The result is deterministic and does not depend on the number of threads.
    """
    _check_inputs(values, k, weights, backend)
    use_numba = backend == "numba" or (backend == "auto" and values.device.type == "cpu")
    if use_numba:
        return _kmeans_numba(values, k, weights)
    x = values.detach().to(torch.float64)
    w = None if weights is None else weights.detach().to(device=x.device, dtype=torch.float64)
    centroids = _centroids_torch(x, w, k)
    return centroids, nearest_sorted_1d(x, centroids)


def _check_inputs(values: torch.Tensor, k: int, weights: torch.Tensor | None, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: must be a positive integer, got {k!r}")
    if values.dim() != 2 or not values.dtype.is_floating_point:
        raise ValueError(f"values: must be a float tensor [G, n], got {values.dtype} {list(values.shape)}")
    if values.shape[1] == 0:
        raise ValueError("values: each group needs at least one value, got n = 0")
    if not _all_finite(values):
        raise ValueError("values: must be finite (found NaN or inf)")
    if weights is None:
        return
    if weights.shape != values.shape:
        raise ValueError(f"weights: shape {list(weights.shape)} must equal the values' shape {list(values.shape)}")
    if not weights.dtype.is_floating_point:
        raise ValueError(f"weights: must be a float tensor, got {weights.dtype}")
    if weights.numel() and (not _all_finite(weights) or not bool(weights.min() >= 0)):
        raise ValueError("weights: must be finite and >= 0")


def _all_finite(t: torch.Tensor) -> bool:
    """A finite sum proves every entry finite; only an overflowing sum needs the elementwise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


# ---------------------------------------------------------------------------------------------
# numba backend


def _kmeans_numba(values: torch.Tensor, k: int, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The numba backend: sort with numpy, then one compiled call for all groups."""
    x = values.detach().cpu()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)  # exact for float16 / bfloat16
    x_np = np.ascontiguousarray(x.numpy())
    if weights is None:
        sorted_x = np.sort(x_np, axis=1)
        sorted_w = np.ones(sorted_x.shape)
    else:
        order = np.argsort(x_np, axis=1)
        sorted_x = np.take_along_axis(x_np, order, axis=1)
        w_np = weights.detach().cpu().to(torch.float64).numpy()
        sorted_w = np.take_along_axis(w_np, order, axis=1)
    n_chunks = max(1, min(x_np.shape[0], numba.get_num_threads()))
    with _PARALLEL_REGION:
        centroids, labels = _batch_kmeans(x_np, sorted_x, sorted_w, k, n_chunks)
    return torch.from_numpy(centroids).to(values.device), torch.from_numpy(labels).to(values.device)


@njit(cache=True, parallel=True, error_model="numpy")
def _batch_kmeans(x, sorted_x, sorted_w, k, n_chunks):
    """x [G, n] (float32 or float64), sorted_x its rows sorted, sorted_w [G, n] float64 in the
    sorted order -> (centroids [G, k] float64, labels [G, n] int64 for x).

    Groups are dealt to `n_chunks` workers round-robin; each worker allocates its buffers once.
    """
    G, n = x.shape
    centroids = np.empty((G, k))
    labels = np.empty((G, n), np.int64)
    for chunk in prange(n_chunks):
        P0 = np.empty(n + 1)
        P1 = np.empty(n + 1)
        P2 = np.empty(n + 1)
        ux = np.empty(n)
        E = np.empty(n + 1)
        D_prev = np.empty(n + 1)
        D_cur = np.empty(n + 1)
        T = np.zeros((k + 1, n + 1), np.int32)
        scratch = np.empty(n + 1)
        for g in range(chunk, G, n_chunks):
            m, mean = _unique_prefix_sums(sorted_x[g], sorted_w[g], P0, P1, P2, ux)
            if m <= k:
                for j in range(k):
                    centroids[g, j] = ux[min(j, m - 1)]
            else:
                _optimal_splits(P0, P1, P2, m, k, E, D_prev, D_cur, T, scratch)
                _backtrack(P0, P1, T, m, k, mean, centroids[g])
            _nearest_labels(x[g], centroids[g], labels[g])
    return centroids, labels


@njit(cache=True, error_model="numpy")
def _nearest_labels(x, c, out):
    """out[i] = the nearest of the sorted centroids c to x[i], the lowest index on ties.

    Counts the midpoints (c[j] + c[j+1]) / 2 below x[i], then moves to the first of equal
    centroids (a value above a repeated centroid counts the midpoints inside the repeat).
    """
    out[:] = 0
    for j in range(c.shape[0] - 1):
        mid = (c[j + 1] + c[j]) * 0.5
        for i in range(x.shape[0]):
            out[i] += np.float64(x[i]) > mid
    first = np.arange(c.shape[0])
    for j in range(1, c.shape[0]):
        if c[j] == c[j - 1]:
            first[j] = first[j - 1]
    for i in range(x.shape[0]):
        out[i] = first[out[i]]


@njit(cache=True, error_model="numpy")
def _unique_prefix_sums(x, w, P0, P1, P2, ux):
    """Merge equal values of the sorted row `x` and drop those with zero total weight.

    Writes the m distinct values to ux[:m] and the prefix sums over them (of w, w*c, w*c^2 with
    c = x - mean) to P0/P1/P2[:m+1]; returns (m, mean). All-zero weights count as uniform.
    """
    n = x.shape[0]
    total_w = 0.0
    total_wx = 0.0
    for i in range(n):
        total_w += w[i]
        total_wx += w[i] * x[i]
    uniform = total_w == 0.0
    if uniform:
        total_w = 0.0
        total_wx = 0.0
        for i in range(n):
            total_w += 1.0
            total_wx += x[i]
    mean = total_wx / total_w
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    P0[0] = 0.0
    P1[0] = 0.0
    P2[0] = 0.0
    m = 0
    for i in range(n):
        wi = 1.0 if uniform else w[i]
        c = x[i] - mean
        wc = wi * c
        s0 += wi
        s1 += wc
        s2 += wc * c
        if (i == n - 1 or x[i + 1] != x[i]) and s0 > P0[m]:
            ux[m] = x[i]
            m += 1
            P0[m] = s0
            P1[m] = s1
            P2[m] = s2
    return m, mean


@njit(cache=True, error_model="numpy")
def _optimal_splits(P0, P1, P2, m, k, E, D_prev, D_cur, T, scratch):
    """Fill T[j][t] (2 <= j <= k), the leftmost optimal start of the last of j clusters of the
    first t distinct values, for every t an optimal k-partition can use (m > k)."""
    for t in range(1, m + 1):
        D_prev[t] = P2[t] - P1[t] * P1[t] / P0[t]
        T[1, t] = 0
    for j in range(2, k + 1):
        tmax_prev = m - (k - j + 1)
        for s in range(j - 1, tmax_prev + 1):
            E[s] = D_prev[s] - P2[s]
        tlo = j if j < k else m
        thi = m - (k - j)
        R = thi - tlo + 1
        h = 1
        while 2 * h <= R:
            h *= 2
        Tj = T[j]
        Tp = T[j - 1]
        while h >= 1:
            for i in range(h - 1, R, 2 * h):
                t = np.uint64(tlo + i)  # unsigned, as in _argmin_short
                lo = np.int64(Tj[t - np.uint64(h)]) if i >= h else j - 1
                hi = np.int64(Tj[t + np.uint64(h)]) if i + h < R else thi - 1
                hi = min(hi, np.int64(t) - 1)
                lo = min(max(lo, np.int64(Tp[min(t, np.uint64(tmax_prev))])), hi)
                if hi - lo >= _LONG_WINDOW:
                    best, arg = _argmin_long(E, P0, P1, lo, hi, P0[t], P1[t], scratch)
                else:
                    best, arg = _argmin_short(E, P0, P1, lo, hi, P0[t], P1[t])
                D_cur[t] = best + P2[t]
                Tj[t] = arg
            h //= 2
        D_prev, D_cur = D_cur, D_prev


@njit(cache=True, error_model="numpy", inline="always")
def _argmin_short(E, P0, P1, lo, hi, P0t, P1t):
    """(min, leftmost argmin) over s in [lo, hi] of E[s] - (P1t - P1[s])^2 / (P0t - P0[s])."""
    # unsigned indices spare every access the negative-index wraparound
    best = np.inf
    arg = np.uint64(lo)
    for s in range(np.uint64(lo), np.uint64(hi + 1)):
        d1 = P1t - P1[s]
        v = E[s] - d1 * d1 / (P0t - P0[s])
        if v < best:
            best = v
            arg = s
    return best, np.int64(arg)


@njit(cache=True, error_model="numpy")
def _argmin_long(E, P0, P1, lo, hi, P0t, P1t, scratch):
    """Same result as `_argmin_short`, in passes the compiler vectorises: values, min, first hit."""
    n = hi + 1 - lo
    e = E[lo:]
    p0 = P0[lo:]
    p1 = P1[lo:]
    for i in range(n):
        d1 = P1t - p1[i]
        scratch[i] = e[i] - d1 * d1 / (P0t - p0[i])
    # eight independent running minima break the dependency chain of a single one
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = np.inf
    n8 = n - n % 8
    for i in range(0, n8, 8):
        m0 = min(m0, scratch[i])
        m1 = min(m1, scratch[i + 1])
        m2 = min(m2, scratch[i + 2])
        m3 = min(m3, scratch[i + 3])
        m4 = min(m4, scratch[i + 4])
        m5 = min(m5, scratch[i + 5])
        m6 = min(m6, scratch[i + 6])
        m7 = min(m7, scratch[i + 7])
    best = min(min(min(m0, m1), min(m2, m3)), min(min(m4, m5), min(m6, m7)))
    for i in range(n8, n):
        best = min(best, scratch[i])
    for i in range(n):
        if scratch[i] == best:
            return best, lo + i
    return best, lo


@njit(cache=True, error_model="numpy")
def _backtrack(P0, P1, T, m, k, mean, out):
    """Walk the optimal splits back from t = m and write the k cluster means to `out`."""
    b = m
    for j in range(k, 0, -1):
        a = T[j, b] if j > 1 else 0
        out[j - 1] = (P1[b] - P1[a]) / (P0[b] - P0[a]) + mean
        b = a


# ---------------------------------------------------------------------------------------------
# torch backend


def _centroids_torch(x: torch.Tensor, w: torch.Tensor | None, k: int) -> torch.Tensor:
    """x [G, n] float64, w [G, n] float64 or None -> centroids [G, k] float64, on x's device."""
    G, n = x.shape
    step = max(1, _TORCH_CHUNK_VALUES // n)
    out = torch.empty(G, k, dtype=torch.float64, device=x.device)
    for start in range(0, G, step):
        xs = x[start : start + step]
        if w is None:
            sorted_x = torch.sort(xs, dim=1).values
            sorted_w = torch.ones_like(sorted_x)
        else:
            sorted_x, order = torch.sort(xs, dim=1)
            sorted_w = torch.gather(w[start : start + step], 1, order)
        out[start : start + step] = _sorted_centroids_torch(sorted_x, sorted_w, k)
    return out


def _sorted_centroids_torch(sorted_x: torch.Tensor, sorted_w: torch.Tensor, k: int) -> torch.Tensor:
    """Rows sorted ascending -> centroids [G, k]; the torch twin of `_batch_kmeans`."""
    ux, P0, P1, P2, m, mean = _unique_prefix_sums_torch(sorted_x, sorted_w)
    G = ux.shape[0]
    rows = torch.arange(G, device=ux.device)
    # few distinct values: the values themselves, the largest repeated
    pad_index = torch.minimum(torch.arange(k, device=ux.device)[None, :], (m - 1)[:, None])  # [G, k]
    out = torch.gather(ux, 1, pad_index.clamp(max=ux.shape[1] - 1))
    solve = m > k
    if bool(solve.any()):
        g = rows[solve]
        T = _optimal_splits_torch(P0[g], P1[g], P2[g], m[g], k)
        out[g] = _backtrack_torch(P0[g], P1[g], T, m[g], k, mean[g])
    return out


def _unique_prefix_sums_torch(sorted_x: torch.Tensor, sorted_w: torch.Tensor):
    """Distinct values of each sorted row with positive weight, and prefix sums over them.

    Returns ux [G, M] (padded), P0/P1/P2 [G, M+1] (zero first column), m [G], mean [G], with
    the same sequence of float operations as `_unique_prefix_sums`.
    """
    G, n = sorted_x.shape
    uniform = sorted_w.sum(dim=1, keepdim=True) == 0
    w = torch.where(uniform, torch.ones_like(sorted_w), sorted_w)
    mean = torch.cumsum(w * sorted_x, dim=1)[:, -1] / torch.cumsum(w, dim=1)[:, -1]  # [G]
    c = sorted_x - mean[:, None]
    wc = w * c
    s0 = torch.cumsum(w, dim=1)
    s1 = torch.cumsum(wc, dim=1)
    s2 = torch.cumsum(wc * c, dim=1)
    run_end = torch.ones_like(sorted_x, dtype=torch.bool)
    run_end[:, :-1] = sorted_x[:, 1:] != sorted_x[:, :-1]
    # weight accumulated before each run starts, carried forward over the run (s0 is nondecreasing)
    run_start = torch.ones_like(run_end)
    run_start[:, 1:] = run_end[:, :-1]
    before = torch.zeros_like(s0)
    before[:, 1:] = s0[:, :-1]
    before_run = torch.cummax(torch.where(run_start, before, torch.zeros_like(before)), dim=1).values
    keep = run_end & (s0 > before_run)  # [G, n]
    m = keep.sum(dim=1)
    M = int(m.max())
    slot = torch.cumsum(keep, dim=1) - 1
    gi, ii = keep.nonzero(as_tuple=True)
    si = slot[gi, ii]
    ux = torch.zeros(G, M, dtype=torch.float64, device=sorted_x.device)
    ux[gi, si] = sorted_x[gi, ii]
    prefix = []
    for s in (s0, s1, s2):
        p = torch.zeros(G, M + 1, dtype=torch.float64, device=sorted_x.device)
        p[gi, si + 1] = s[gi, ii]
        prefix.append(p)
    return ux, prefix[0], prefix[1], prefix[2], m, mean


def _optimal_splits_torch(P0: torch.Tensor, P1: torch.Tensor, P2: torch.Tensor, m: torch.Tensor, k: int) -> torch.Tensor:
    """P0/P1/P2 [G, M+1], m [G] (> k) -> T [k+1, G, M+1] int64, as `_optimal_splits`.

    Each level of each layer is one batch: all (group, row) pairs of the level and all their
    candidates, flattened, evaluated at once and reduced per row (lowest index on ties).
    """
    G, width = P0.shape
    device = P0.device
    T = torch.zeros(k + 1, G, width, dtype=torch.int64, device=device)
    D_prev = P2 - P1 * P1 / torch.where(P0 > 0, P0, torch.ones_like(P0))
    middle_levels = _levels(m - k + 1)  # rows 0..R-1 of every layer 2..k-1, R = m - k + 1
    last_levels = _levels(torch.ones_like(m))  # the last layer needs its row t = m only
    for j in range(2, k + 1):
        tlo = m if j == k else torch.full_like(m, j)
        thi = m - (k - j)
        R = thi - tlo + 1  # [G]
        tmax_prev = m - (k - j + 1)
        E = D_prev - P2
        D_cur = torch.zeros_like(D_prev)
        for h, gi, i in last_levels if j == k else middle_levels:
            t = tlo[gi] + i
            lo = torch.where(i >= h, T[j, gi, (t - h).clamp(min=0)], j - 1)
            hi = torch.where(i + h < R[gi], T[j, gi, (t + h).clamp(max=width - 1)], thi[gi] - 1)
            hi = torch.minimum(hi, t - 1)
            lb = T[j - 1, gi, torch.minimum(t, tmax_prev[gi])]
            lo = torch.minimum(torch.maximum(lo, lb), hi)
            best, arg = _window_argmin(E, P0, P1, gi, t, lo, hi)
            D_cur[gi, t] = best + P2[gi, t]
            T[j, gi, t] = arg
        D_prev = D_cur
    return T


def _levels(R: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """The divide-and-conquer schedule over rows 0..R_g-1 of each group: for h = 2^p, ..., 2, 1
    (largest 2^p <= max R), the rows i = h-1 + 2h*q < R_g, as (h, group index, i) flat pairs."""
    levels = []
    h = 1
    while 2 * h <= int(R.max()):
        h *= 2
    while h >= 1:
        i = torch.arange(h - 1, int(R.max()), 2 * h, device=R.device)
        gi, qi = (i[None, :] < R[:, None]).nonzero(as_tuple=True)
        levels.append((h, gi, i[qi]))
        h //= 2
    return levels


def _window_argmin(E, P0, P1, gi, t, lo, hi):
    """For each row r: (min, leftmost argmin) over s in [lo_r, hi_r] of
    E[g, s] - (P1[g, t] - P1[g, s])^2 / (P0[g, t] - P0[g, s]), g = gi_r, t = t_r."""
    lengths = hi - lo + 1  # [rows]
    rows = torch.arange(lengths.shape[0], device=lo.device)
    row = torch.repeat_interleave(rows, lengths)  # [cands]
    first = torch.cumsum(lengths, dim=0) - lengths
    s = lo[row] + torch.arange(row.shape[0], device=lo.device) - first[row]
    g = gi[row]
    tt = t[row]
    d1 = P1[g, tt] - P1[g, s]
    v = E[g, s] - d1 * d1 / (P0[g, tt] - P0[g, s])
    best = torch.full(lengths.shape, torch.inf, dtype=v.dtype, device=v.device)
    best = best.scatter_reduce(0, row, v, reduce="amin")
    hit = torch.where(v == best[row], s, torch.iinfo(torch.int64).max)
    arg = torch.full_like(lo, torch.iinfo(torch.int64).max).scatter_reduce(0, row, hit, reduce="amin")
    return best, arg


def _backtrack_torch(P0, P1, T, m, k, mean):
    """T [k+1, G, M+1] -> the k cluster means [G, k] of the optimal partition ending at m."""
    G = P0.shape[0]
    rows = torch.arange(G, device=P0.device)
    out = torch.empty(G, k, dtype=torch.float64, device=P0.device)
    b = m
    for j in range(k, 0, -1):
        a = T[j, rows, b] if j > 1 else torch.zeros_like(b)
        out[:, j - 1] = (P1[rows, b] - P1[rows, a]) / (P0[rows, b] - P0[rows, a]) + mean
        b = a
    return out
