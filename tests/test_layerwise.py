"""Layerwise (sequential, block by block) compression: layers grouped by the input they read, GPTQ
through the blocks beats rounding on the model's output, 2 gloo ranks give the 1-rank weights bit for
bit, and resuming at a block gives the same weights as an uninterrupted run."""
import textwrap

import torch
from torch import nn

from llmpalette.calibration.hessians import capture_block_inputs
from llmpalette.calibration.sums import ShardPlan
from llmpalette.distributed import World
from llmpalette.maths.gptq import gptq
from llmpalette.quantization.layerwise import compress_layerwise, input_groups
from tests.conftest import tiny_llama
from tests.test_distributed import run_two_ranks
from tests.test_hessians import SymmetricGrid, forward, windows

ONE = World(0, 1, torch.device("cpu"))
BITS = 3


def gptq_layer(name, module, hessian):
    grid = SymmetricGrid(module.weight.detach(), BITS)
    result = gptq(module.weight.detach(), hessian, grid, processing_group_size=16)
    return {"loss": result.loss}, result.weight


def rtn_layer(name, module, hessian):
    w = module.weight.detach()
    grid = SymmetricGrid(w, BITS)
    return {}, torch.stack([grid(w[:, j], j) for j in range(w.shape[1])], 1)


def blocks_of(model):
    return [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]


def run(model, compress_layer, *, samples=4, start_block=0, true_sequential=True, world=ONE, mine=None, length=24):
    plan = ShardPlan(samples, 1, world.world_size)
    data = mine if mine is not None else windows(samples, length)
    return compress_layerwise(model, blocks_of(model), data, plan, world, select=lambda n, m: True,
                              compress_layer=compress_layer, forward=forward, true_sequential=true_sequential,
                              start_block=start_block)


def test_layers_are_grouped_by_the_input_they_read_in_running_order():
    model = tiny_llama(seed=6).eval()
    block = model.model.layers[0]
    layers = {f"model.layers.0.{n}": m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    sample = capture_block_inputs(model, block, windows(1), forward)[0][1]
    groups = input_groups(block, layers, sample)
    short = [[n.split(".")[-1] for n in g] for g in groups]
    assert [sorted(g) for g in short] == [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def logits_error(model, reference) -> float:
    ids = torch.cat([w for _, w in windows(12, 64)][8:])  # samples the calibration did not see
    with torch.no_grad():
        return float(((model(input_ids=ids).logits - reference(input_ids=ids).logits) ** 2).mean())


def test_sequential_gptq_beats_rounding_on_the_models_output():
    reference = tiny_llama(seed=6).eval()
    errors = {}
    for label, fn, sequential in [("rtn", rtn_layer, True), ("gptq", gptq_layer, True), ("gptq-parallel", gptq_layer, False)]:
        model = tiny_llama(seed=6).eval()
        results = run(model, fn, true_sequential=sequential, samples=8, length=64)
        assert [r.index for r in results] == [0, 1] and all(len(r.compressed) == 7 for r in results)
        errors[label] = logits_error(model, reference)
    assert errors["gptq"] < 0.8 * errors["rtn"], errors
    assert errors["gptq-parallel"] < 0.9 * errors["rtn"], errors


def test_resuming_at_a_block_gives_the_uninterrupted_weights():
    whole = tiny_llama(seed=6).eval()
    run(whole, gptq_layer)
    resumed = tiny_llama(seed=6).eval()
    plan = ShardPlan(4, 1, 1)
    compress_layerwise(resumed, blocks_of(resumed)[:1], windows(4), plan, ONE, select=lambda n, m: True,
                       compress_layer=gptq_layer, forward=forward)  # block 0, then the job "dies"
    run(resumed, gptq_layer, start_block=1)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))


WORKER = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from llmpalette.distributed import current_world
    from llmpalette.calibration.sums import ShardPlan
    from tests.test_layerwise import run, gptq_layer
    from tests.test_hessians import windows
    from tests.conftest import tiny_llama

    dist.init_process_group("gloo")
    world = current_world()
    model = tiny_llama(seed=6).eval()
    plan = ShardPlan(5, 1, world.world_size)
    run(model, gptq_layer, samples=5, world=world, mine=[(i, s) for i, s in windows(5) if plan.rank_of_sample(i) == world.rank])
    torch.save(model.state_dict(), f"{sys.argv[1]}/rank{world.rank}.pt")
    dist.destroy_process_group()
''')


def test_two_ranks_give_the_one_rank_weights_bit_for_bit(tmp_path):
    run_two_ranks(tmp_path, WORKER)
    torch.set_num_threads(1)
    model = tiny_llama(seed=6).eval()
    run(model, gptq_layer, samples=5)
    expected = model.state_dict()
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert all(torch.equal(got[k], expected[k]) for k in expected), r
    assert not torch.equal(expected["model.layers.0.mlp.down_proj.weight"], tiny_llama(seed=6).state_dict()["model.layers.0.mlp.down_proj.weight"])
