"""The Hessian floor (llmpalette.calibration.hessians) and GPTQ's error feedback (llmpalette.maths.gptq):
block inputs captured once and run block by block reproduce the model; Hessians are Σ XᵀX with the token
count, the same bits from 2 gloo ranks as from 1; GPTQ beats round-to-nearest on ‖(W − Ŵ)Xᵀ‖ and falls
back clearly on a singular Hessian."""
import textwrap

import pytest
import torch

from llmpalette.calibration.hessians import (
    TOKENS,
    capture_block_inputs,
    hessian_sums,
    mean_hessian,
    run_block,
)
from llmpalette.calibration.sums import ShardPlan
from llmpalette.distributed import World
from llmpalette.maths.gptq import SingularHessian, gptq, inverse_cholesky, output_error
from tests.conftest import tiny_llama
from tests.test_distributed import run_two_ranks

ONE = World(0, 1, torch.device("cpu"))


def windows(count: int, length: int = 24) -> list[tuple[int, torch.Tensor]]:
    return [(i, torch.randint(0, 257, (1, length), generator=torch.Generator().manual_seed(50 + i))) for i in range(count)]


def forward(model, ids):
    return model(input_ids=ids, use_cache=False)


def block_linears(block) -> dict:
    return {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


def test_captured_inputs_run_block_by_block_reproduce_the_models_hidden_states():
    model = tiny_llama(seed=4).eval()
    samples = windows(3)
    inputs = capture_block_inputs(model, model.model.layers[0], samples, forward)
    assert [i for i, _ in inputs] == [0, 1, 2]
    for (index, ids), (_, x) in zip(samples, inputs):
        with torch.no_grad():
            states = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
        assert torch.allclose(x.hidden, states[0])
        for b, block in enumerate(model.model.layers[:-1]):  # the last entry of hidden_states is after the norm
            x = run_block(block, x)
            assert torch.allclose(x.hidden, states[b + 1], atol=1e-5), (index, b)


def test_hessians_are_the_sum_of_xtx_with_the_token_count():
    model = tiny_llama(seed=4).eval()
    block = model.model.layers[1]
    inputs = capture_block_inputs(model, model.model.layers[0], windows(3), forward)
    inputs = [(i, run_block(model.model.layers[0], x)) for i, x in inputs]
    layers = block_linears(block)
    seen = {n: [] for n in layers}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1]).double()))
               for n, m in layers.items()]
    for _, x in inputs:
        run_block(block, x)
    for h in handles:
        h.remove()
    for shard in (1, 2):
        sums = hessian_sums(block, layers, inputs, ShardPlan(3, shard, 1), ONE, owners={n: 0 for n in layers})
        for name in layers:
            x = torch.cat(seen[name])
            assert float(sums[name + TOKENS]) == x.shape[0] == 3 * 24
            assert torch.allclose(sums[name].double(), x.t() @ x, rtol=1e-5, atol=1e-4), name
            assert torch.allclose(mean_hessian(sums, name), sums[name] / 72)


WORKER = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from llmpalette.calibration.hessians import capture_block_inputs, hessian_sums, run_block
    from llmpalette.calibration.sums import ShardPlan
    from llmpalette.distributed import current_world, owners_by_size
    from tests.test_hessians import windows, forward, block_linears
    from tests.conftest import tiny_llama

    dist.init_process_group("gloo")
    world = current_world()
    results = {}
    for count, shard in [(5, 1), (7, 2)]:
        model = tiny_llama(seed=4).eval()
        plan = ShardPlan(count, shard, world.world_size)
        mine = [(i, s) for i, s in windows(count) if plan.rank_of_sample(i) == world.rank]
        inputs = capture_block_inputs(model, model.model.layers[0], mine, forward)
        layers = block_linears(model.model.layers[0])
        owners = owners_by_size({n: m.weight.shape[1] ** 2 for n, m in layers.items()}, world.world_size)
        results[f"{count}-{shard}"] = hessian_sums(model.model.layers[0], layers, inputs, plan, world, owners=owners)
    torch.save(results, f"{sys.argv[1]}/rank{world.rank}.pt")
    dist.destroy_process_group()
''')


def test_two_ranks_give_the_one_process_hessians_bit_for_bit(tmp_path):
    run_two_ranks(tmp_path, WORKER)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): the same matrix-product kernels
    for count, shard in [(5, 1), (7, 2)]:
        model = tiny_llama(seed=4).eval()
        inputs = capture_block_inputs(model, model.model.layers[0], windows(count), forward)
        layers = block_linears(model.model.layers[0])
        reference = hessian_sums(model.model.layers[0], layers, inputs, ShardPlan(count, shard, 1), ONE, owners={n: 0 for n in layers})
        got = {k: v for r in ranks for k, v in r[f"{count}-{shard}"].items()}
        assert set(got) == set(reference) and all(len(r[f"{count}-{shard}"]) < len(reference) for r in ranks)
        assert all(torch.equal(got[k], reference[k]) for k in reference), (count, shard)


# --- GPTQ's error feedback --------------------------------------------------------------------------------

def correlated_inputs(tokens: int, columns: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(columns, columns, generator=g) / columns ** 0.5 + torch.eye(columns)
    scales = torch.logspace(-1, 1, columns)[torch.randperm(columns, generator=g)]
    return (torch.randn(tokens, columns, generator=g) @ mix) * scales


class SymmetricGrid:
    """A per-row (or per row and block of columns) symmetric grid, as a caller of gptq() supplies it."""

    def __init__(self, weight: torch.Tensor, bits: int, block: int | None = None):
        self.qmax = 2 ** (bits - 1) - 1
        self.block = block or weight.shape[1]
        self.scales = torch.stack([self._scale(weight[:, j : j + self.block]) for j in range(0, weight.shape[1], self.block)], 1)

    def _scale(self, columns: torch.Tensor) -> torch.Tensor:
        return columns.abs().amax(dim=1).clamp(min=1e-8) / self.qmax

    def refit(self, columns: torch.Tensor, j: int) -> None:
        self.scales[:, j // self.block] = self._scale(columns)

    def __call__(self, column: torch.Tensor, j: int) -> torch.Tensor:
        s = self.scales[:, j // self.block]
        return torch.clamp(torch.round(column / s), -self.qmax - 1, self.qmax) * s


@pytest.mark.parametrize("bits, act_order, block", [(4, False, None), (3, False, None), (4, True, None), (3, False, 16), (3, True, 16)])
def test_gptq_has_a_lower_output_error_than_round_to_nearest(bits, act_order, block):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 64, generator=g)
    x = correlated_inputs(512, 64)
    hessian = x.t() @ x / x.shape[0]
    rtn_grid = SymmetricGrid(weight, bits, block)
    rtn = torch.stack([rtn_grid(weight[:, j], j) for j in range(64)], 1)
    grid = SymmetricGrid(weight, bits, block)
    result = gptq(weight, hessian, grid, act_order=act_order, block_size=block, refit=grid.refit, processing_group_size=24)
    # every column is on its row's grid
    steps = torch.stack([result.weight[:, j] / grid.scales[:, j // grid.block] for j in range(64)], 1)
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= grid.qmax + 1
    ours, theirs = output_error(weight, result.weight, hessian), output_error(weight, rtn, hessian)
    assert ours < (0.8 if block is None else 0.97) * theirs, (ours, theirs)  # per channel: by a wide margin
    assert abs(torch.sum((x @ (weight - result.weight).t()) ** 2).item() / x.shape[0] - ours) < 1e-3 * ours


def test_gptq_lazy_batches_change_nothing_but_rounding():
    weight = torch.randn(16, 40, generator=torch.Generator().manual_seed(2))
    x = correlated_inputs(200, 40, seed=3)
    hessian = x.t() @ x / 200
    a = gptq(weight, hessian, SymmetricGrid(weight, 4), processing_group_size=40)
    b = gptq(weight, hessian, SymmetricGrid(weight, 4), processing_group_size=7)
    assert torch.allclose(a.weight, b.weight, atol=1e-5) and abs(a.loss - b.loss) < 1e-4 * a.loss


def test_dead_columns_are_zero_and_counted():
    weight = torch.randn(8, 12, generator=torch.Generator().manual_seed(5))
    x = correlated_inputs(100, 12)
    x[:, [3, 7]] = 0
    result = gptq(weight, x.t() @ x / 100, SymmetricGrid(weight, 4))
    assert result.dead_columns == 2 and torch.all(result.weight[:, [3, 7]] == 0)


def test_a_singular_hessian_gets_more_dampening_and_then_a_clear_error():
    x = correlated_inputs(4, 16)  # rank 4 of 16
    hessian = x.t() @ x / 4
    _, damp = inverse_cholesky(hessian, 0.0)
    assert damp > 0  # the documented fallback: dampening raised until H + damp*I is positive definite
    _, damp = inverse_cholesky(hessian, 0.01)
    assert damp == 0.01
    with pytest.raises(SingularHessian, match="no positive diagonal"):
        inverse_cholesky(torch.zeros(4, 4), 0.01)
    with pytest.raises(SingularHessian, match="not positive definite"):
        inverse_cholesky(torch.diag(torch.tensor([10.0, -1.0])), 0.0)  # indefinite
    with pytest.raises(ValueError, match="does not match"):
        gptq(torch.zeros(2, 3), torch.eye(4), lambda c, j: c)


# --- GPTQ onto LUTs ---------------------------------------------------------------------------------------

def quantile_luts(weight: torch.Tensor, group_size: int, entries: int) -> torch.Tensor:
    groups = weight.reshape(-1, group_size * weight.shape[1])
    return torch.quantile(groups, torch.linspace(0.02, 0.98, entries), dim=1).t().contiguous()


def test_gptq_onto_luts_beats_nearest_entry_and_keeps_every_weight_on_its_groups_lut():
    from llmpalette.maths.lut_gptq import NearestLUTEntry

    weight = torch.randn(32, 48, generator=torch.Generator().manual_seed(7))
    x = correlated_inputs(400, 48, seed=8)
    hessian = x.t() @ x / 400
    luts = quantile_luts(weight, 8, 8)  # 3-bit LUT per group of 8 rows
    nearest = NearestLUTEntry(luts, 8, 48)
    rounded = torch.stack([nearest(weight[:, j], j) for j in range(48)], 1)
    quantizer = NearestLUTEntry(luts, 8, 48)
    result = gptq(weight, hessian, quantizer, processing_group_size=16)
    assert torch.equal(result.weight, quantizer.row_luts.gather(1, quantizer.indices))
    assert output_error(weight, result.weight, hessian) < 0.8 * output_error(weight, rounded, hessian)


def test_refit_luts_solves_the_normal_equations_and_never_raises_the_error():
    from llmpalette.maths.lut_gptq import NearestLUTEntry, refit_luts

    weight = torch.randn(16, 24, generator=torch.Generator().manual_seed(9))
    x = correlated_inputs(300, 24, seed=10)
    hessian = x.t() @ x / 300
    luts = quantile_luts(weight, 8, 4)
    luts[1, 3] = 100.0  # an entry nobody is nearest to keeps its value
    quantizer = NearestLUTEntry(luts, 8, 24)
    before = gptq(weight, hessian, quantizer).weight
    refit = refit_luts(weight, quantizer.indices, hessian, luts, 8)
    assert refit[1, 3] == 100.0 and not torch.equal(refit, luts)
    after = refit.repeat_interleave(8, 0).gather(1, quantizer.indices)
    assert output_error(weight, after, hessian) <= output_error(weight, before, hessian)
    # the gradient of the output error with respect to every used entry is zero (dense one-hot check)
    t = refit.double().clone().requires_grad_(True)
    onehot = torch.nn.functional.one_hot(quantizer.indices, 4).double()  # [rows, columns, K]
    q = torch.einsum("rck,rk->rc", onehot, t.repeat_interleave(8, 0))
    delta = weight.double() - q
    torch.einsum("ri,ij,rj->", delta, hessian.double(), delta).backward()
    used = onehot.reshape(2, -1, 4).sum(1) > 0
    assert t.grad[used].abs().max() < 1e-6 * hessian.abs().max() * weight.abs().max() * 24 * 8


def test_lut_gptq_palettizes_with_a_lower_output_error_than_weighted_kmeans():
    from llmpalette.palettization import ModulePostTrainingPalettizerConfig, palettize_weight
    from llmpalette.palettization.gptq_lut import gptq_palettize_weight

    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(11))
    x = correlated_inputs(512, 64, seed=12)
    hessian = x.t() @ x / 512
    config = ModulePostTrainingPalettizerConfig.from_dict({"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 8})
    palettized, info = gptq_palettize_weight(weight, hessian, config, iterations=2, processing_group_size=16)
    plain = output_error(weight, palettize_weight(weight, config).decode(), hessian)
    ours = output_error(weight, palettized.decode(), hessian)
    assert palettized.n_bits == 3 and palettized.group_size == 8 and tuple(palettized.lut.shape) == (4, 8, 1)
    assert abs(ours - info.error) <= 1e-6 * ours and info.best_pass >= 0
    assert ours < 0.8 * info.kmeans_error < 0.8 * plain, (ours, info, plain)  # GPTQ + refits; diag(H)-weighted start
    with pytest.raises(ValueError, match="scalar float LUTs"):
        gptq_palettize_weight(weight, hessian, ModulePostTrainingPalettizerConfig.from_dict(
            {"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 8, "cluster_dim": 2}))


@pytest.mark.parametrize("act_order", [True, False])
def test_lut_gptq_ends_on_a_refit_so_its_luts_are_optimal_for_its_indices(act_order):
    # the last GPTQ pass is followed by a refit too: whatever pass wins, refitting its LUTs to its own
    # indices cannot lower the output error any more (without the last refit the final pass's raw LUTs win)
    from llmpalette.maths.lut_gptq import refit_luts
    from llmpalette.palettization import ModulePostTrainingPalettizerConfig
    from llmpalette.palettization.gptq_lut import gptq_palettize_weight

    config = ModulePostTrainingPalettizerConfig.from_dict({"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 8})
    for seed in range(3):
        weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(20 + seed))
        x = correlated_inputs(512, 64, seed=30 + seed)
        hessian = x.t() @ x / 512
        for iterations in (0, 1):
            palettized, info = gptq_palettize_weight(weight, hessian, config, iterations=iterations, act_order=act_order,
                                                     processing_group_size=16)
            lut, indices = palettized.lut[..., 0], palettized.labels().reshape(32, 64)
            again = refit_luts(weight, indices, hessian, lut, 8).repeat_interleave(8, 0).gather(1, indices)
            assert output_error(weight, again, hessian) >= info.error * (1 - 1e-5), (seed, iterations, info)


# --- GPTQ onto the uniform grid (the linear-quantized kind) -------------------------------------------------

def test_gptq_on_the_rtn_grid_beats_rtn_and_decodes_to_what_it_chose():
    from llmpalette.quantization.gptq import ModuleGPTQConfig, gptq_quantize_weight
    from llmpalette.quantization.post_training import rtn_quantize_weight

    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(13))
    x = correlated_inputs(512, 64, seed=14)
    hessian = x.t() @ x / 512
    for fields, margin in [({"weight_dtype": "int4"}, 0.8), ({"weight_dtype": "uint4", "quantization_scheme": "affine"}, 0.8),
                           ({"weight_dtype": "int3", "granularity": "per_block", "block_size": 16}, 0.97),
                           ({"weight_dtype": "int4", "use_activation_order_heuristic": True}, 0.8),
                           ({"weight_dtype": "int3", "granularity": "per_block", "block_size": 16, "use_activation_order_heuristic": True}, 0.97)]:
        config = ModuleGPTQConfig.from_dict(fields)
        quantized, info = gptq_quantize_weight(weight, hessian, config)
        rtn = rtn_quantize_weight(weight, config)
        assert quantized.shape == rtn.shape and quantized.n_bits == rtn.n_bits and quantized.scale.shape == rtn.scale.shape
        ours, theirs = output_error(weight, quantized.decode(), hessian), output_error(weight, rtn.decode(), hessian)
        assert ours < margin * theirs, (fields, ours, theirs)
        assert info.dampening == 0.01 and info.dead_columns == 0


def test_gptq_config_has_core_ml_tools_fields_and_refuses_bad_values():
    from llmpalette.quantization.gptq import ModuleGPTQConfig

    config = ModuleGPTQConfig.from_dict({"algorithm": "gptq", "weight_dtype": "uint4", "hessian_dampening": 0.05,
                                         "use_activation_order_heuristic": True, "processing_group_size": 64})
    assert (config.weight_n_bits, config.hessian_dampening, config.processing_group_size) == (4, 0.05, 64)
    for field, value in [("hessian_dampening", -0.1), ("processing_group_size", 0), ("enable_normal_float", True), ("algorithm", "sparse_gpt")]:
        with pytest.raises(Exception, match=field):
            ModuleGPTQConfig.from_dict({field: value})
