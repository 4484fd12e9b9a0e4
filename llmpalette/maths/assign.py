"""Nearest-centroid assignment: which LUT entry each value (or vector) decodes to."""
from __future__ import annotations

import torch

_CHUNK_BYTES = 256 * 2**20


def nearest_sorted_1d(values: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """values [G, n], lut [G, K] sorted ascending (ties allowed) -> labels [G, n] int64.

    The nearest entry; on a tie between two entries the lower index wins, and among equal entries
    the first. Midpoints are computed in float64 so the decision matches `(x - c)^2` comparisons.
    """
    lut64 = lut.to(torch.float64)
    mids = (lut64[:, 1:] + lut64[:, :-1]) * 0.5  # [G, K-1]
    labels = torch.searchsorted(mids.contiguous(), values.to(torch.float64).contiguous(), side="left")
    positions = torch.arange(lut.shape[1], device=lut.device).expand_as(lut)
    starts = torch.ones_like(lut, dtype=torch.bool)
    starts[:, 1:] = lut64[:, 1:] != lut64[:, :-1]
    first_equal = torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=1).values  # [G, K]
    return torch.gather(first_equal, 1, labels)


def nearest_vectors(values: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """values [G, n, d], lut [G, K, d] -> labels [G, n] int64 (lowest index on ties); memory bounded by chunking groups."""
    G, n, _ = values.shape
    K = lut.shape[1]
    per_group = max(1, n * K * 8)
    step = max(1, _CHUNK_BYTES // per_group)
    out = torch.empty(G, n, dtype=torch.int64, device=values.device)
    lut64 = lut.to(torch.float64)
    for start in range(0, G, step):
        x = values[start : start + step].to(torch.float64)
        c = lut64[start : start + step]
        dist = torch.cdist(x, c, compute_mode="donot_use_mm_for_euclid_dist")  # [g, n, K]
        out[start : start + step] = dist.argmin(dim=-1)
    return out


def nearest(values: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """values [G, n, d], lut [G, K, d] -> labels [G, n]: the nearest LUT entry of each value/vector.

    Scalar LUTs: on a tie the smaller value wins, among equal entries the first (so, in a sorted
    LUT, the lowest index); vectors: the lowest index.
    """
    if values.shape[-1] == 1:
        scalar_lut = lut[..., 0]
        if bool((scalar_lut[:, 1:] >= scalar_lut[:, :-1]).all()):
            return nearest_sorted_1d(values[..., 0], scalar_lut)
        order = torch.argsort(scalar_lut, dim=1, stable=True)
        sorted_labels = nearest_sorted_1d(values[..., 0], torch.gather(scalar_lut, 1, order))
        return torch.gather(order, 1, sorted_labels)
    return nearest_vectors(values, lut)
