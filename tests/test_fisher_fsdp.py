"""The sensitivity pass under FSDP (llmpalette.calibration.sharded): 2 gloo processes, each holding half of
a sharded copy of the model, give the same Fisher sums as one process, bit for bit (odd sample counts,
shards of several samples, a resumed pass, the SKMPalettizer API with Core ML Tools' wrap policy), the
user's model is left as it was, and an FSDP `accelerate launch` of a job writes the same bytes."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from llmpalette.calibration.fisher import ShardPlan, causal_lm_loss, fisher_sums
from llmpalette.calibration.sharded import wrap_classes
from llmpalette.distributed import World
from tests.conftest import REPO, tiny_llama
from tests.test_distributed import free_port, run_two_ranks
from tests.test_jobs import layer_bytes
from tests.test_skm_jobs import ENV, stats_bytes, write_recipe

WORKER = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from llmpalette.calibration.fisher import ShardPlan, causal_lm_loss, fisher_sums
    from llmpalette.calibration.sharded import fisher_sums_sharded
    from llmpalette.distributed import World, current_world, owners_by_size
    from llmpalette.palettization import SKMPalettizer, SKMPalettizerConfig
    from tests.test_fisher_fsdp import samples, compressed
    from tests.conftest import tiny_llama

    out = sys.argv[1]
    dist.init_process_group("gloo")
    world = current_world()
    results = {}
    for count, shard, start in [(5, 1, 0), (7, 2, 0), (7, 2, 2)]:
        model = tiny_llama(seed=1)
        before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
        params = compressed(model)
        plan = ShardPlan(count, shard, world.world_size)
        owners = owners_by_size({n: p.numel() for n, p in params.items()}, world.world_size)
        totals = None
        if start:  # what a checkpoint after `start` shards holds, computed by one process
            done = fisher_sums(model, samples(plan.samples(start - 1).stop), causal_lm_loss, params,
                               ShardPlan(plan.samples(start - 1).stop, shard, 1), World(0, 1, torch.device("cpu")),
                               owners={n: 0 for n in params})
            totals = {n: t for n, t in done.items() if owners[n] == world.rank}
        mine = [(i, s) for i, s in samples(count) if i >= plan.samples(start).start and plan.rank_of_sample(i, True) == world.rank]
        rounds = []
        owned = fisher_sums_sharded(model, mine, causal_lm_loss, params, plan, world, owners=owners, totals=totals,
                                    start_shard=start, on_round=lambda done, get: rounds.append(done))
        assert all(torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] for n, p in model.named_parameters())
        results[f"{count}-{shard}-{start}"] = {"owned": owned, "rounds": rounds}
    model = tiny_llama(seed=1)
    config = SKMPalettizerConfig.from_dict({"global_config": {"n_bits": 2, "granularity": "per_grouped_channel", "group_size": 8},
                                            "module_name_configs": {"lm_head": None, "model.embed_tokens": None},
                                            "calibration_nsamples": 3})
    api = SKMPalettizer(model, config).compute_sensitivity([s for _, s in samples(3)], fsdp_auto_wrap_policy=[LlamaDecoderLayer])
    results["api"] = {"owned": api, "rounds": []}
    torch.save(results, f"{out}/rank{world.rank}.pt")
    dist.destroy_process_group()
''')


def samples(count: int) -> list[tuple[int, torch.Tensor]]:
    # longer than fisher.LOSS_CHUNK_TOKENS + 1: the chunked vocabulary projection runs, as on real windows
    return [(i, torch.randint(0, 257, (80,), generator=torch.Generator().manual_seed(100 + i))) for i in range(count)]


def compressed(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2}


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    run_two_ranks(folder, WORKER)
    ranks = [torch.load(folder / f"rank{r}.pt") for r in range(2)]
    return {case: ({n: t for r in ranks for n, t in r[case]["owned"].items()}, ranks[0][case]["rounds"], ranks)
            for case in ranks[0]}


@pytest.mark.parametrize("count, shard, start", [(5, 1, 0), (7, 2, 0), (7, 2, 2)])
def test_two_fsdp_ranks_give_the_one_process_sums_bit_for_bit(two_rank_results, count, shard, start):
    model = tiny_llama(seed=1)
    params = compressed(model)
    reference = fisher_sums(model, samples(count), causal_lm_loss, params, ShardPlan(count, shard, 1),
                            World(0, 1, torch.device("cpu")), owners={n: 0 for n in params})
    got, rounds, ranks = two_rank_results[f"{count}-{shard}-{start}"]
    assert set(got) == set(reference)
    assert all(torch.equal(got[n], reference[n]) for n in reference)
    assert all((t > 0).any() for t in got.values())
    # each layer's total is on exactly one rank: its owner
    assert sum(len(r[f"{count}-{shard}-{start}"]["owned"]) for r in ranks) == len(reference)
    # checkpoints are offered after whole shards only, up to the last
    plan = ShardPlan(count, shard, 2)
    assert rounds[-1] == plan.shards and rounds == sorted(set(rounds)) and rounds[0] > start


def test_the_api_with_core_ml_tools_wrap_policy_gives_the_one_process_sensitivities(two_rank_results):
    from llmpalette.palettization import SKMPalettizer, SKMPalettizerConfig

    config = SKMPalettizerConfig.from_dict({"global_config": {"n_bits": 2, "granularity": "per_grouped_channel", "group_size": 8},
                                            "module_name_configs": {"lm_head": None, "model.embed_tokens": None},
                                            "calibration_nsamples": 3})
    reference = SKMPalettizer(tiny_llama(seed=1), config).compute_sensitivity([s for _, s in samples(3)])
    got, _, ranks = two_rank_results["api"]
    assert set(ranks[0]["api"]["owned"]) == set(ranks[1]["api"]["owned"]) == set(reference)  # broadcast to every rank
    assert all(torch.equal(ranks[1]["api"]["owned"][n], reference[n]) for n in reference)


def test_an_fsdp_accelerate_launch_writes_the_one_process_bytes(tmp_path, tiny_llama_dir):
    recipe = write_recipe(tmp_path, tiny_llama_dir, samples=5, shard=1, seq_len=96)  # > 65: the chunked loss
    one = subprocess.run([sys.executable, "-m", "llmpalette", "compress", str(recipe), "--job-dir", str(tmp_path / "one"), "--quiet", "--no-eval"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/fsdp-cpu-2proc.yaml"),
                          "--main_process_port", str(free_port()), "-m", "llmpalette", "compress", str(recipe),
                          "--job-dir", str(tmp_path / "two"), "--no-eval"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "sharded over 2 ranks with FSDP" in two.stderr
    assert stats_bytes(tmp_path / "two") == stats_bytes(tmp_path / "one")
    assert layer_bytes(tmp_path / "two") == layer_bytes(tmp_path / "one")
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["world_size"] == 2


def test_wrap_classes_come_from_the_policy_the_environment_or_the_model(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP

    model = tiny_llama()
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    assert wrap_classes(model) == (LlamaDecoderLayer,)  # transformers' _no_split_modules

    class Policy:  # Core ML Tools' ModuleWrapPolicy has module_classes
        module_classes = [LlamaMLP]

    assert wrap_classes(model, Policy()) == (LlamaMLP,)
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaMLP")
    assert wrap_classes(model) == (LlamaMLP,)
    with pytest.raises(ValueError, match="LlamaDecoderLayr"):
        wrap_classes(model, ["LlamaDecoderLayr"])
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP")
    with pytest.raises(ValueError, match="no FSDP wrap classes"):
        wrap_classes(nn.Sequential(nn.Linear(2, 2)))


def test_fsdp_accelerate_configs_are_fsdp2_launches_that_load_weights_on_every_rank():
    from accelerate.commands.config.config_args import load_config_from_file

    for name in ("fsdp-cpu-2proc.yaml", "fsdp-multinode.yaml"):
        config = load_config_from_file(str(REPO / "launch" / name))
        assert config.distributed_type == "FSDP", name
        assert config.fsdp_config["fsdp_version"] == 2, name
        assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is False, name  # ranks > 0 would hold meta weights
