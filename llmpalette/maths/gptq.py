"""GPTQ's error feedback for one weight matrix (Frantar et al. 2022; the authors' `gptq.py`, as Core ML
Tools 9.0's `layerwise_compression/algorithms.py` runs it), with the grid left to the caller.

The weight W [rows, columns] multiplies inputs X [tokens, columns]; H = XᵀX / tokens. Columns are
quantized one at a time; each one's rounding error is spread over the columns not yet quantized, in
proportion to the rows of the upper Cholesky factor of H⁻¹, which minimises ‖(W − Ŵ) Xᵀ‖² column by
column. What "quantize a column" means is the caller's: the nearest point of a uniform grid
(linear quantization), or the nearest entry of each row's LUT (GPTQ onto a LUT). So one loop serves
every kind of the compressed-weight format.

Pure tensor maths: no modules, no files, no ranks.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MAX_DAMPING_TRIES = 6  # dampening x10 each time H + damp*I is not positive definite


@dataclass(frozen=True)
class GPTQResult:
    """The quantized weight (dequantized values, float32, the columns in their original order), the summed
    loss Σ (w − q)² / d² / 2 GPTQ minimises (d: the diagonal of the Cholesky factor of H⁻¹), the
    dampening actually added (a fraction of mean diag H) and the number of dead columns (zero in H)."""

    weight: torch.Tensor
    loss: float
    dampening: float
    dead_columns: int


class SingularHessian(ValueError):
    """H + damp·I was not positive definite even after raising the dampening MAX_DAMPING_TRIES times."""


def inverse_cholesky(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, float32, and the dampening used: the
    given one, or 10x, 100x, ... when the damped H is still not positive definite (a documented fallback;
    `SingularHessian` when none works)."""
    h = hessian.to(torch.float32)
    mean_diag = torch.mean(torch.diagonal(h)).item()
    if not mean_diag > 0:
        raise SingularHessian("the Hessian has no positive diagonal entry (the layer saw only zero inputs)")
    damp = dampening
    for _ in range(MAX_DAMPING_TRIES):
        damped = h.clone()
        damped.diagonal().add_(damp * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, damp
        damp = damp * 10 if damp > 0 else 1e-6
    raise SingularHessian(f"the Hessian is not positive definite even with dampening {damp / 10:g} of its mean diagonal")


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantize: Callable[[torch.Tensor, int], torch.Tensor],
    *,
    dampening: float = 0.01,
    processing_group_size: int = 128,
    act_order: bool = False,
    block_size: int | None = None,
    refit: Callable[[torch.Tensor, int], None] | None = None,
) -> GPTQResult:
    """Quantize `weight` [rows, columns] column by column with GPTQ's error feedback.

    quantize(column, j): the quantized (dequantized) float32 values of column `j` (its index in the
        original order) given its current, error-corrected values [rows]. A quantizer that also has
        `columns(wt, u1, errt, qt, start, stop, original)` (`UniformColumns`, `NearestLUTEntry`) runs a
        segment of a lazy batch at once, compiled, on the transposed batch (CPU tensors): the same values
        up to float rounding, ~10x faster.
    dampening: Core ML Tools' `hessian_dampening`, a fraction of the mean diagonal of H.
    processing_group_size: columns updated lazily together (the paper's block of 128; no effect on the
        result beyond float rounding); with `refit`, rounded up to a multiple of `block_size`, so each
        block lies inside one lazy batch.
    act_order: Core ML Tools' `use_activation_order_heuristic`: columns in order of decreasing diag H.
    block_size, refit: with a `block_size` and without act_order, `refit(columns, j0)` is called when
        column j0 starts a block, with the block's current columns [rows, block_size], so the caller can
        set that block's grid from the error-corrected weights (GPTQ's groups). With act_order the caller
        sets every block's grid from the original weight beforehand (static groups).
    """
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float32).clone()
    rows, columns = w.shape
    if h.shape != (columns, columns):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match a weight of {columns} columns")
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    h_inv, damp = inverse_cholesky(h, dampening)
    del h
    refitting = refit is not None and bool(block_size) and perm is None
    if refitting:
        processing_group_size = -(-processing_group_size // block_size) * block_size
    original = perm if perm is not None else torch.arange(columns)
    order = original.tolist()
    fast = getattr(quantize, "columns", None) if w.device.type == "cpu" else None
    q = torch.zeros_like(w)
    loss = torch.zeros((), dtype=torch.float64)
    for i1 in range(0, columns, processing_group_size):
        i2 = min(i1 + processing_group_size, columns)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = h_inv[i1:i2, i1:i2].contiguous()
        starts = [j for j in range(i1, i2) if refitting and j % block_size == 0]
        if fast is not None:  # transposed batch [B, rows] for the compiled segments
            wt, errt, qt = w1.t().contiguous(), torch.zeros_like(w1.t()).contiguous(), torch.zeros_like(w1.t()).contiguous()
            bounds = sorted({i1, i2, *starts})
            for a, b in zip(bounds, bounds[1:]):
                if a in starts:
                    refit(wt[a - i1 : a - i1 + block_size].t(), a)
                fast(wt, h1, errt, qt, a - i1, b - i1, original[a:b])
            q[:, i1:i2] = qt.t()
            err1 = errt.t()
        else:
            for i in range(i2 - i1):
                j = i1 + i
                if refitting and j % block_size == 0:
                    refit(w1[:, i : i + block_size], j)
                column = w1[:, i]
                quantized = quantize(column, order[j])
                q[:, j] = quantized
                error = (column - quantized) / h1[i, i]
                w1[:, i:].sub_(torch.outer(error, h1[i, i:]))
                err1[:, i] = error
        loss += torch.sum(err1.double().square()) / 2
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return GPTQResult(q, float(loss), damp, int(dead.sum()))


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖(W − Ŵ) Xᵀ‖² / tokens = trace((W − Ŵ) H (W − Ŵ)ᵀ) for H = XᵀX / tokens: what GPTQ minimises.
    (W − Ŵ) H is one float32 matmul (relative rounding ~1e-6, plenty for a metric and for ranking
    candidates), summed in float64."""
    delta = weight.to(torch.float32) - quantized.to(torch.float32)
    return float(torch.sum(torch.mm(delta, hessian.to(torch.float32)) * delta, dtype=torch.float64))
