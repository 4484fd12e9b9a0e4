"""PostTrainingPalettizer / palettize_weight: optimal LUTs, exact decode, every option doing what it says."""
import itertools

import pytest
import torch

from llmpalette.errors import ConfigError
from llmpalette.layout.palettized import group_view
from llmpalette.palettization import ModulePostTrainingPalettizerConfig as ModuleCfg
from llmpalette.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig, palettize_weight
from tests.conftest import tiny_llama


def brute_force_sse(values: torch.Tensor, k: int) -> float:
    """Optimal 1-D k-means SSE by trying every split of the sorted values into k contiguous runs."""
    x = sorted(values.tolist())
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(x)), k - 1):
        bounds = (0, *cuts, len(x))
        sse = 0.0
        for a, b in zip(bounds, bounds[1:]):
            seg = torch.tensor(x[a:b], dtype=torch.float64)
            sse += float((seg - seg.mean()).square().sum())
        best = min(best, sse)
    return best


def test_grouped_lut_is_the_optimum_of_each_group():
    torch.manual_seed(0)
    w = torch.randn(4, 5)
    pw = palettize_weight(w, ModuleCfg(n_bits=2, granularity="per_grouped_channel", group_size=2, weight_threshold=0))
    assert pw.lut.shape == (2, 4, 1)
    decoded = pw.decode()
    for g in range(2):
        rows = slice(2 * g, 2 * g + 2)
        sse = float((w[rows].double() - decoded[rows].double()).square().sum())
        assert sse == pytest.approx(brute_force_sse(w[rows].reshape(-1), 4), rel=1e-5, abs=1e-9)
        assert set(decoded[rows].reshape(-1).tolist()) <= set(pw.lut[g, :, 0].tolist())


@pytest.mark.parametrize("granularity, group_size, axis, luts", [
    ("per_tensor", None, 0, 1), ("per_channel", None, 0, 16), ("per_channel", None, 1, 24),
    ("per_grouped_channel", 4, 0, 4), ("per_grouped_channel", 8, 1, 3),
])
def test_granularities_give_the_right_lut_count(granularity, group_size, axis, luts):
    w = torch.randn(16, 24)
    pw = palettize_weight(w, ModuleCfg(n_bits=3, granularity=granularity, group_size=group_size, channel_axis=axis))
    assert pw.lut.shape == (luts, 8, 1)
    d = pw.decode()
    # each LUT's channels decode to values of that LUT only
    per_lut = {"per_tensor": w.shape[axis], "per_channel": 1}.get(granularity, group_size)
    channels = group_view(d, axis, per_lut)
    for g in range(luts):
        assert set(channels[g].reshape(-1).tolist()) <= set(pw.lut[g, :, 0].tolist())


def test_more_bits_never_worse_and_8_bit_close():
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    errs = []
    for bits in range(1, 9):
        d = palettize_weight(w, ModuleCfg(n_bits=bits, granularity="per_channel")).decode()
        errs.append(float((w - d).square().sum() / w.square().sum()))
    assert all(a >= b for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-3


def test_enforce_zero_puts_an_exact_zero_in_every_lut():
    w = torch.randn(8, 32) + 0.3
    pw = palettize_weight(w, ModuleCfg(n_bits=3, granularity="per_grouped_channel", group_size=4, enforce_zero=True))
    assert (pw.decoded_lut() == 0).any(dim=1).all()


def test_per_channel_scale_is_kept_and_applied():
    torch.manual_seed(2)
    w = torch.randn(8, 32) * torch.logspace(-2, 1, 8).unsqueeze(1)
    plain = palettize_weight(w, ModuleCfg(n_bits=2))
    scaled = palettize_weight(w, ModuleCfg(n_bits=2, enable_per_channel_scale=True))
    assert scaled.channel_scale is not None
    assert torch.allclose(scaled.channel_scale, w.abs().amax(dim=1))
    err = lambda p: float(((w - p.decode()) / w.abs().amax(dim=1, keepdim=True)).square().sum())
    assert err(scaled) < err(plain)  # small-magnitude rows are no longer crushed to one centroid


@pytest.mark.parametrize("dtype", ["float16", "int8", "uint8"])
def test_lut_dtypes_store_that_dtype_and_decode_to_the_nearest_stored_entry(dtype):
    torch.manual_seed(3)
    w = torch.randn(8, 64)
    pw = palettize_weight(w, ModuleCfg(n_bits=4, granularity="per_grouped_channel", group_size=4, lut_dtype=dtype))
    assert pw.lut.dtype == getattr(torch, dtype)
    lut = pw.decoded_lut()[..., 0]  # [G, K]
    groups = group_view(w, 0, 4)[..., 0]
    dist = (groups.unsqueeze(-1) - lut.unsqueeze(1)).abs()  # [G, n, K]
    best = dist.min(dim=-1).values
    chosen = dist.gather(-1, pw.labels().unsqueeze(-1)).squeeze(-1)
    assert torch.equal(best, chosen)
    ref = palettize_weight(w, ModuleCfg(n_bits=4, granularity="per_grouped_channel", group_size=4)).decode()
    assert float((w - pw.decode()).square().sum()) < 1.3 * float((w - ref).square().sum()) + 1e-3


@pytest.mark.parametrize("channel_axis", [0, 1])
def test_vector_palettization_along_the_channel_axis(channel_axis):
    """As in Core ML Tools, a vector is cluster_dim consecutive channels along channel_axis."""
    torch.manual_seed(4)
    base = torch.randn(4, 2)  # 4 planted 2-vectors, laid out along axis 0 (pairs of rows)
    planted = base[torch.randint(0, 4, (4, 32))].permute(0, 2, 1).reshape(8, 32) + 1e-4 * torch.randn(8, 32)
    w = planted if channel_axis == 0 else planted.T.contiguous()
    config = ModuleCfg(n_bits=2, cluster_dim=2, channel_axis=channel_axis)
    pw = palettize_weight(w, config)
    assert pw.lut.shape == (1, 4, 2) and pw.vector_axis == channel_axis
    assert float((w - pw.decode()).abs().max()) < 1e-3
    across = planted.T.contiguous() if channel_axis == 0 else planted  # no planted vectors along this axis
    assert float((across - palettize_weight(across, config).decode()).abs().max()) > 1e-2


def test_compress_decodes_in_place_skips_none_and_respects_threshold():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = PostTrainingPalettizerConfig.from_dict({
        "global_config": {"n_bits": 2, "granularity": "per_grouped_channel", "group_size": 8, "weight_threshold": 4096},
        "module_name_configs": {"lm_head": None, "model.embed_tokens": None, "model.layers.0.mlp.up_proj": None},
    })
    palettizer = PostTrainingPalettizer(model, cfg)
    out = palettizer.compress()
    assert out is not model
    after = dict(out.named_parameters())
    for name, pw in palettizer.compressed.items():
        assert torch.equal(after[f"{name}.weight"], pw.decode())
        assert after[f"{name}.weight"].unique().numel() <= 4 * pw.n_groups
    assert "model.layers.0.mlp.up_proj" not in palettizer.compressed
    assert torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    # q_proj is 64x64 = 4096 elements, not more than the threshold: untouched
    assert "model.layers.0.self_attn.q_proj" not in palettizer.compressed
    assert "model.layers.0.mlp.gate_proj" in palettizer.compressed
    assert torch.equal(dict(model.named_parameters())["model.layers.0.mlp.gate_proj.weight"], before["model.layers.0.mlp.gate_proj.weight"])
    report = palettizer.report()["model.layers.0.mlp.gate_proj"]
    assert report["lut_shape"] == [16, 4, 1] and report["nbytes"] < 128 * 64 * 2


def test_tied_embedding_compressed_once_and_shared():
    model = tiny_llama(tie=True)
    cfg = PostTrainingPalettizerConfig.from_dict({"global_config": {"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 1, "weight_threshold": 0}})
    palettizer = PostTrainingPalettizer(model, cfg)
    out = palettizer.compress()
    assert "lm_head" not in palettizer.compressed
    assert out.lm_head.weight is out.model.embed_tokens.weight
    assert torch.equal(out.lm_head.weight, palettizer.compressed["model.embed_tokens"].decode())


def test_group_size_not_dividing_is_rejected_naming_the_layer():
    model = tiny_llama()
    cfg = PostTrainingPalettizerConfig.from_dict({"global_config": {"granularity": "per_grouped_channel", "group_size": 48, "weight_threshold": 0}})
    with pytest.raises(ConfigError) as err:
        PostTrainingPalettizer(model, cfg).compress()
    assert err.value.field == "global_config.group_size" and "layer 'model.embed_tokens'" in str(err.value) and "257 channels" in str(err.value)


def test_cluster_dim_not_dividing_is_rejected():
    model = torch.nn.Sequential(torch.nn.Linear(64, 30))
    cfg = PostTrainingPalettizerConfig.from_dict({"global_config": {"cluster_dim": 4}})
    with pytest.raises(ConfigError, match="cluster_dim 4 does not divide the 30 channels along axis 0"):
        PostTrainingPalettizer(model, cfg).compress()


def test_deterministic_bytes():
    w = torch.randn(16, 32)
    cfg = ModuleCfg(n_bits=3, granularity="per_grouped_channel", group_size=4, cluster_dim=2)
    a, b = palettize_weight(w, cfg, seed=5), palettize_weight(w, cfg, seed=5)
    assert all(torch.equal(a.to_tensors("w")[k], b.to_tensors("w")[k]) for k in a.to_tensors("w"))


def test_nearest_assignment_picks_the_first_of_equal_entries_and_lowest_on_ties():
    from llmpalette.maths.assign import nearest

    lut = torch.tensor([[[-1.0], [0.0], [0.0], [1.0]]])
    values = torch.tensor([[[-0.5], [-0.1], [0.0], [0.2], [0.5], [2.0]]])
    assert nearest(values, lut).tolist() == [[0, 1, 1, 1, 1, 3]]
    shuffled = lut[:, [3, 1, 0, 2]]  # unsorted LUT: 1, 0, -1, 0; a tie goes to the smaller value
    assert nearest(values, shuffled).tolist() == [[2, 1, 1, 1, 1, 0]]
