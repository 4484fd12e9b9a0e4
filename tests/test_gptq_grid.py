"""GPTQ's grid from the clipping search: each block's range shrunk to minimise its H-diagonal-weighted
rounding error; never worse than the full range per block, and GPTQ's output error falls with it."""
import pytest
import torch

from llmpalette.maths.uniform import quant_range, uniform_grid
from tests.test_threads import _problem

@pytest.mark.parametrize("block_sizes,signed,scheme", [((1, 64), True, "symmetric"), ((1, 16), True, "symmetric"),
                                                       ((1, 64), False, "affine"), ((2, 16), False, "symmetric")])
def test_the_clipped_grid_rounds_each_block_no_worse_than_the_full_range(block_sizes, signed, scheme):
    from llmpalette.maths.uniform import clipped_grid, dequantize_blocks, quantize_blocks, to_blocks

    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 64, generator=g) * 0.05
    w[0, 5] = 0.6  # an outlier: clipping it must pay in its row
    importance = torch.rand(1, 64, generator=g) + 0.1
    qmin, qmax = quant_range(3, signed, scheme)

    def block_errors(scale, zero):
        values = dequantize_blocks(quantize_blocks(w, scale, zero, block_sizes, qmin, qmax), scale, zero, block_sizes)
        return to_blocks(importance * (w - values).square(), block_sizes).sum(dim=(1, 3))

    full = uniform_grid(w, block_sizes, 3, signed, scheme)
    clipped = clipped_grid(w, block_sizes, 3, signed, scheme, importance)
    assert torch.equal(clipped_grid(w, block_sizes, 3, signed, scheme, importance, steps=1)[0], full[0])
    assert (block_errors(*clipped) <= block_errors(*full)).all()
    assert (block_errors(*clipped) < block_errors(*full)).any()  # the search found something on this weight
    assert (clipped[0] <= full[0] * (1 + 1e-6)).all()  # only ever a shrink


def test_gptq_with_the_clipping_search_has_a_lower_output_error():
    from llmpalette.maths.gptq import output_error
    from llmpalette.quantization.gptq import ModuleGPTQConfig, gptq_quantize_weight

    w, h = _problem(rows=64, columns=96, seed=4)
    w[torch.rand(w.shape, generator=torch.Generator().manual_seed(5)) < 0.01] *= 8  # a few outliers
    errors = {}
    for clip in (False, True):
        config = ModuleGPTQConfig.from_dict({"weight_dtype": "int4", "granularity": "per_channel", "clipping_search": clip,
                                             "use_activation_order_heuristic": True})
        quantized, _ = gptq_quantize_weight(w, h, config)
        errors[clip] = output_error(w, quantized.decode(), h)
    assert errors[True] < 0.9 * errors[False]
