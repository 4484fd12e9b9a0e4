"""Compiled inner loop of GPTQ's lazy batch (numba), for the two quantizers llmpalette uses: a uniform
grid (`uniform_columns`) and the nearest entry of a per-row LUT (`lut_columns`).

Inside a lazy batch of B columns, GPTQ quantizes column i, divides its error by d = U[i, i] and
subtracts error x U[i, i+1:] from the batch's later columns (U: the batch's block of the upper Cholesky
factor of H⁻¹). In Python that is a dozen small torch calls per column (~0.2 ms each: most of a
layer's time); here it is one call per segment, on the batch transposed ([B, rows], so the update of a
column runs along contiguous rows and vectorizes). The float32 operations are `maths.gptq.gptq`'s
torch loop's (q = clamp(round(w / s) + z) -> (q - z) * s; e = (w - q) / d; w -= e * u), but the
compiler may fuse a multiply and an add (one rounding fewer), so the two paths agree to float rounding,
not bit for bit; each is deterministic on its own. Arrays are C-contiguous numpy views of the caller's
float32 tensors, updated in place; `nogil`, so the layers of a group run on threads.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, error_model="numpy")
def uniform_columns(wt, u1, errt, qt, start, stop, scales, zeros, ints, qmin, qmax):  # pragma: no cover - compiled
    """Columns start..stop-1 of the batch, transposed: wt [B, rows], onto uniform grids: scales, zeros
    [stop-start, rows] (float32; zeros 0 for a signed symmetric grid); ints [stop-start, rows] int32
    receives the integers, qt [B, rows] the values, errt [B, rows] the scaled errors."""
    width, rows = wt.shape
    lo, hi = np.float32(qmin), np.float32(qmax)
    for i in range(start, stop):
        d = u1[i, i]
        for r in range(rows):
            x = wt[i, r]
            s = scales[i - start, r]
            z = zeros[i - start, r]
            v = np.round(x / s) + z
            if v < lo:
                v = lo
            elif v > hi:
                v = hi
            value = (v - z) * s
            ints[i - start, r] = np.int32(v)
            qt[i, r] = value
            errt[i, r] = (x - value) / d
        _feedback(wt, u1, errt, i)


@njit(cache=True, nogil=True, error_model="numpy")
def lut_columns(wt, u1, errt, qt, start, stop, luts, indices):  # pragma: no cover - compiled
    """Columns start..stop-1 of the batch, transposed: wt [B, rows], onto each row's LUT luts [rows, K]
    (float32; the nearest entry, the first on ties); indices [stop-start, rows] int64 receives the
    entries chosen."""
    width, rows = wt.shape
    entries = luts.shape[1]
    for i in range(start, stop):
        d = u1[i, i]
        for r in range(rows):
            x = wt[i, r]
            best = 0
            gap = abs(x - luts[r, 0])
            for k in range(1, entries):
                g = abs(x - luts[r, k])
                if g < gap:
                    gap = g
                    best = k
            value = luts[r, best]
            indices[i - start, r] = best
            qt[i, r] = value
            errt[i, r] = (x - value) / d
        _feedback(wt, u1, errt, i)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _feedback(wt, u1, errt, i):  # pragma: no cover - compiled
    """Column i's error onto the batch's later columns: wt[c] -= errt[i] * U[i, c] (rows innermost)."""
    width, rows = wt.shape
    for c in range(i + 1, width):
        u = u1[i, c]
        for r in range(rows):
            wt[c, r] -= errt[i, r] * u


@njit(cache=True, nogil=True, error_model="numpy")
def lut_normal_matrices(h, indices, group_size, entries):  # pragma: no cover - compiled
    """A_g = Σ_r S_rᵀ H S_r for each group g of `group_size` consecutive rows (S_r: row r's one-hot
    assignment [columns, K] from indices [rows, columns]), float64 [groups, K, K]. Per row: Y = S_rᵀ H
    ([K, columns], H's rows added by index; H symmetric), then A += Y S_r (Y's columns added by index):
    columns² additions per row instead of a dense columns² x K product."""
    rows, columns = indices.shape
    groups = rows // group_size
    out = np.zeros((groups, entries, entries), dtype=np.float64)
    y = np.empty((entries, columns), dtype=np.float32)
    for g in range(groups):
        for r in range(g * group_size, (g + 1) * group_size):
            y[:] = 0.0
            for i in range(columns):
                k = indices[r, i]
                for j in range(columns):
                    y[k, j] += h[i, j]
            for j in range(columns):
                l = indices[r, j]
                for k in range(entries):
                    out[g, k, l] += y[k, j]
    return out
