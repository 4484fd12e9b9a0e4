"""The job's compressed-weight format -> iOS18 LUT op inputs, for every layout the format can hold.

Oracles: `PalettizedWeight.decode` (the definition of the weight) bit for bit in float16, and Core ML
Tools' own numpy decompression of `constexpr_lut_to_dense` (an implementation independent of ours).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmpalette.export.coreml.lut import coreml_lut
from llmpalette.export.coreml.reference import blockwise_shift_scale, lut_to_dense, sparse_to_dense
from llmpalette.layout.palettized import PalettizedWeight
from llmpalette.maths.lut import quantize_lut


def weight(shape, n_bits, channel_axis, group_size, cluster_dim=1, vector_axis=None, *, seed=0, lut_dtype=None,
           channel_scale=False, outliers=0, fp16_scale=False) -> PalettizedWeight:
    g = torch.Generator().manual_seed(seed)
    groups = shape[channel_axis] // group_size
    per_group = int(np.prod(shape)) // (groups * cluster_dim)
    lut = torch.randn(groups, 2**n_bits, cluster_dim, generator=g)
    labels = torch.randint(0, 2**n_bits, (groups, per_group), generator=g)
    extra = {}
    if lut_dtype:
        q, scale, zero = quantize_lut(lut, lut_dtype)
        if fp16_scale:
            scale = scale.to(torch.float16).to(torch.float32)
        lut, extra = q, {"lut_scale": scale, "lut_zero_point": zero}
    if channel_scale:
        extra["channel_scale"] = torch.rand(shape[0], generator=g) + 0.5
    if outliers:
        positions = torch.randperm(int(np.prod(shape)), generator=g)[:outliers].sort().values
        extra["outlier_positions"] = positions.to(torch.int32)
        extra["outlier_values"] = (torch.randn(outliers, generator=g) * 10).to(torch.float16)
    return PalettizedWeight.from_assignment(lut, labels, shape=shape, n_bits=n_bits, channel_axis=channel_axis,
                                            group_size=group_size, cluster_dim=cluster_dim, vector_axis=vector_axis, **extra)


def ops_dense(lut) -> np.ndarray:
    """The float16 weight the iOS18 ops compute from these inputs (the program's op chain, in numpy)."""
    table = lut.lut
    if lut.lut_scale is not None:
        table = blockwise_shift_scale(table, lut.lut_scale, lut.lut_offset).astype(np.float16)
    dense = lut_to_dense(lut.indices, table, lut.vector_axis)
    if lut.outlier_mask is not None:
        dense = np.where(sparse_to_dense(np.ones_like(lut.outlier_values), lut.outlier_mask) != 0,
                         sparse_to_dense(lut.outlier_values, lut.outlier_mask), dense)
    return dense


CASES = {
    "scalar, output-channel groups": dict(shape=(24, 10), n_bits=3, channel_axis=0, group_size=8),
    "scalar, input-channel groups": dict(shape=(6, 10), n_bits=2, channel_axis=1, group_size=5),
    "vectors along the output channels": dict(shape=(16, 6), n_bits=3, channel_axis=0, group_size=8, cluster_dim=2, vector_axis=0),
    "vectors along the input axis": dict(shape=(8, 6), n_bits=2, channel_axis=0, group_size=4, cluster_dim=2, vector_axis=1),
    "vectors along input-channel groups": dict(shape=(6, 8), n_bits=2, channel_axis=1, group_size=4, cluster_dim=2, vector_axis=1),
    "int8 LUT": dict(shape=(16, 12), n_bits=4, channel_axis=0, group_size=4, lut_dtype="int8"),
    "uint8 LUT": dict(shape=(16, 12), n_bits=4, channel_axis=0, group_size=4, lut_dtype="uint8"),
    "int8 LUT, float16 scales": dict(shape=(16, 12), n_bits=4, channel_axis=0, group_size=4, lut_dtype="int8", fp16_scale=True),
    "uint8 LUT, float16 scales": dict(shape=(16, 12), n_bits=3, channel_axis=0, group_size=8, lut_dtype="uint8", fp16_scale=True),
    "channel scale": dict(shape=(16, 12), n_bits=4, channel_axis=0, group_size=8, channel_scale=True),
    "channel scale, input-channel groups": dict(shape=(8, 12), n_bits=3, channel_axis=1, group_size=4, channel_scale=True),
    "channel scale, vectors along the output channels": dict(shape=(16, 6), n_bits=2, channel_axis=0, group_size=8,
                                                            cluster_dim=2, vector_axis=0, channel_scale=True),
    "channel scale on an int8 LUT": dict(shape=(16, 12), n_bits=4, channel_axis=0, group_size=8, lut_dtype="int8", channel_scale=True),
    "outliers": dict(shape=(16, 12), n_bits=4, channel_axis=0, group_size=8, outliers=7),
    "outliers in vectors": dict(shape=(16, 6), n_bits=3, channel_axis=0, group_size=8, cluster_dim=2, vector_axis=0, outliers=5),
}


@pytest.mark.parametrize("rank_extra", [0, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_ios18_inputs_decode_to_the_jobs_weight_bit_for_bit(case, rank_extra):
    w = weight(**CASES[case])
    lut = coreml_lut(w, len(w.shape) + rank_extra)
    assert lut.shape == tuple(w.shape) + (1,) * rank_extra
    expected = w.decode(torch.float16).numpy().reshape(lut.shape)
    got = ops_dense(lut)
    assert got.dtype == np.float16 and np.array_equal(got.view(np.uint16), expected.view(np.uint16))
    assert lut.lut.shape[-2:] == (2**w.n_bits, w.cluster_dim) and lut.lut.ndim == len(lut.shape) + 2
    assert int(lut.indices.max()) < 2**w.n_bits


@pytest.mark.parametrize("case", list(CASES))
def test_core_ml_tools_decompresses_the_same_lut(case):
    from coremltools.optimize import _utils as optimize_utils

    w = weight(**CASES[case])
    lut = coreml_lut(w, len(w.shape) + 2)
    table = lut.lut if lut.lut_scale is None else blockwise_shift_scale(lut.lut, lut.lut_scale, lut.lut_offset).astype(np.float16)
    theirs = optimize_utils.lut_to_dense(lut.indices, table, lut.vector_axis)
    ours = lut_to_dense(lut.indices, table, lut.vector_axis)
    assert np.array_equal(theirs.view(np.uint16), ours.view(np.uint16))


def test_what_each_layout_becomes():
    plain = coreml_lut(weight(**CASES["scalar, output-channel groups"]), 4)
    assert plain.lut.shape == (3, 1, 1, 1, 8, 1) and plain.lut.dtype == np.float16 and not plain.notes
    assert plain.indices.shape == (24, 10, 1, 1)
    inputs = coreml_lut(weight(**CASES["scalar, input-channel groups"]), 2)
    assert inputs.lut.shape == (1, 2, 4, 1)
    vectors = coreml_lut(weight(**CASES["vectors along the output channels"]), 2)
    assert vectors.indices.shape == (8, 6) and vectors.vector_axis == 0 and vectors.lut.shape == (2, 1, 8, 2)
    exact = coreml_lut(weight(**CASES["uint8 LUT, float16 scales"]), 2)
    assert exact.lut.dtype == np.uint8 and exact.lut_scale.dtype == np.float16 and exact.lut_offset.shape == (2, 1, 1, 1)
    fallback = coreml_lut(weight(**CASES["int8 LUT"]), 2)
    assert fallback.lut.dtype == np.float16 and "float16 decode" in fallback.notes[0]
    folded = coreml_lut(weight(**CASES["channel scale, vectors along the output channels"]), 2)
    assert folded.lut.shape == (8, 1, 4, 2) and "folded" in folded.notes[0]  # one LUT per row of vectors
    sparse = coreml_lut(weight(**CASES["outliers"]), 2)
    assert sparse.outlier_mask.sum() == 7 and sparse.outlier_values.dtype == np.float16
