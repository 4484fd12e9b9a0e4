"""GPTQ onto LUTs: the pieces `maths.gptq.gptq` needs to quantize a weight to per-grouped-channel LUTs
instead of a uniform grid (GPTVQ and GANQ do this for codebooks; Core ML Tools has nothing like it).

- `NearestLUTEntry`: the column quantizer: each element goes to the nearest entry of its row's LUT
  (rows of a group share one), and the chosen indices are kept.
- `refit_luts`: GANQ's closed-form update: with the indices fixed, each group's LUT T minimises the
  output error Σ_rows (w_r − T[idx_r]) H (w_r − T[idx_r])ᵀ, a K×K linear system per group
  (A = Σ_r S_rᵀ H S_r, b = Σ_r S_rᵀ H w_r, S_r the one-hot assignment of row r). Entries no weight uses
  keep their values.

Scalar LUTs (cluster_dim 1) along the output axis (rows), which is how a Linear's per_grouped_channel
LUT is laid out. Pure tensor maths.
"""
from __future__ import annotations

import torch


class NearestLUTEntry:
    """quantize(column, j) for `gptq`: the nearest entry of each row's LUT (first on ties); the indices
    chosen are kept in `indices` [rows, columns] (original column order). `columns` runs a segment of a
    lazy batch compiled (CPU)."""

    def __init__(self, luts: torch.Tensor, group_size: int, columns: int):
        if luts.dim() != 2:
            raise ValueError(f"luts must be [groups, entries], got shape {tuple(luts.shape)}")
        self.row_luts = luts.to(torch.float32).repeat_interleave(group_size, dim=0)
        self.indices = torch.zeros((self.row_luts.shape[0], columns), dtype=torch.long)

    def __call__(self, column: torch.Tensor, j: int) -> torch.Tensor:
        distance = (column.to(torch.float32).unsqueeze(1) - self.row_luts).abs()
        index = torch.argmin(distance, dim=1)
        self.indices[:, j] = index
        return self.row_luts.gather(1, index.unsqueeze(1)).squeeze(1)

    def columns(self, wt, u1, errt, qt, start: int, stop: int, original: torch.Tensor) -> None:
        """A segment of GPTQ's lazy batch, transposed ([B, rows]), at once (`gptq_kernels.lut_columns`, CPU)."""
        from llmpalette.maths.gptq_kernels import lut_columns

        chosen = torch.empty((stop - start, wt.shape[1]), dtype=torch.long)
        lut_columns(wt.numpy(), u1.numpy(), errt.numpy(), qt.numpy(), start, stop, self.row_luts.numpy(), chosen.numpy())
        self.indices[:, original] = chosen.t()


def refit_luts(weight: torch.Tensor, indices: torch.Tensor, hessian: torch.Tensor, luts: torch.Tensor,
               group_size: int) -> torch.Tensor:
    """The LUTs [groups, K] that minimise the output error for fixed `indices` [rows, columns] (see the
    module docstring); `luts` supplies the entries no weight uses. float32 out. S_rᵀ H S_r for the rows of a
    group are gathered by a compiled kernel (`gptq_kernels.lut_normal_matrices`, float32 rows summed in
    float64); the K×K systems are solved in float64."""
    groups, entries = luts.shape
    rows, columns = weight.shape
    if rows != groups * group_size or indices.shape != weight.shape or hessian.shape != (columns, columns):
        raise ValueError(f"shapes do not fit: weight {tuple(weight.shape)}, indices {tuple(indices.shape)}, "
                         f"hessian {tuple(hessian.shape)}, luts {tuple(luts.shape)} with group_size {group_size}")
    from llmpalette.maths.gptq_kernels import lut_normal_matrices

    h32 = hessian.detach().to("cpu", torch.float32).contiguous()
    hw = (weight.detach().to("cpu", torch.float32) @ h32).to(torch.float64)  # row r is (H w_r)ᵀ
    idx = indices.to("cpu", torch.int64).contiguous()
    normal = torch.from_numpy(lut_normal_matrices(h32.numpy(), idx.numpy(), group_size, entries))  # [groups, K, K]
    out = luts.detach().to("cpu", torch.float64).clone()
    for g in range(groups):
        a = normal[g]
        rows_g = slice(g * group_size, (g + 1) * group_size)
        b = torch.zeros(entries, dtype=torch.float64).index_add_(0, idx[rows_g].reshape(-1), hw[rows_g].reshape(-1))
        used = torch.diagonal(a) > 0
        if not used.any():
            continue
        a_u = a[used][:, used]
        ridge = 1e-12 * torch.diagonal(a_u).mean()
        solution = torch.linalg.lstsq(a_u + ridge * torch.eye(int(used.sum()), dtype=torch.float64), b[used].unsqueeze(1)).solution
        out[g, used] = solution.squeeze(1)
    return out.to(torch.float32)
