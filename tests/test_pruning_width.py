"""width_multiple: kept FFN widths and heads x head_dim in multiples of llama.cpp's quantization blocks."""
import json
import logging

import pytest
import torch

import fedprune
from fedprune.adapters import get_adapter
from fedprune.models.tiny import tiny_model
from fedprune.pruning.budget import channel_cost
from fedprune.pruning.width import (block_scores, gqa_head_counts, head_multiple, head_stops, removal_blocks,
                                    round_channel_removals, round_heads)

pytestmark = pytest.mark.usefixtures("one_thread")


def calib(n=8, L=24, seed=0):
    return torch.randint(3, 128, (n, L), generator=torch.Generator().manual_seed(seed))


def logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits


# ---- the rounding maths, by hand ----------------------------------------------------------


def test_removal_blocks_keep_multiples_and_at_least_one():
    assert removal_blocks(128, 32) == [32, 32, 32]  # kept 96, 64, 32
    assert removal_blocks(100, 32) == [4, 32, 32]  # kept 96, 64, 32: the remainder goes first
    assert removal_blocks(1536, 256) == [256] * 5
    assert removal_blocks(32, 32) == [] and removal_blocks(20, 32) == []
    assert removal_blocks(5, 1) == [1, 1, 1, 1]


def test_head_multiple_and_smollm2_head_counts():
    assert [head_multiple(n, 64) for n in (1, 32, 64, 128, 256)] == [1, 1, 1, 2, 4]
    assert head_multiple(96, 64) == 3  # 3 heads x 64 = 192 = 2 x 96
    assert gqa_head_counts(9, 3) == [9, 6, 3]  # SmolLM2-135M: a query head from each of 3 KV groups at a time
    assert gqa_head_counts(4, 4) == [4, 3, 2, 1]  # multi-head attention: single heads
    assert head_stops([9, 6, 3], 2) == [1] and head_stops([9, 6, 3], 4) == []


def test_round_heads_nearest_feasible_count_or_none():
    # SmolLM2, N = 128 (kept heads even): removing 2 per group (3 kept) rounds to 1 per group (6 kept)
    assert round_heads([9, 6, 3], 2, 2) == 1
    assert round_heads([9, 6, 3], 1, 2) == 1
    assert round_heads([9, 6, 3], 0, 2) == 0  # no head pruning is never started
    assert round_heads([9, 6, 3], 1, 4) is None  # N = 256: no count is a multiple of 4
    mha = gqa_head_counts(12, 12)
    assert round_heads(mha, 1, 4) == 0  # 11 kept -> 12 (dense)
    assert round_heads(mha, 2, 4) == 0  # 10 kept: 12 and 8 tie, more heads kept
    assert round_heads(mha, 3, 4) == 4  # 9 kept -> 8
    assert round_heads(mha, 3, 1) == 3


def test_round_channel_removals_by_hand():
    w, c = [128, 128, 128], [1, 1, 1]
    # 40 each (120 in all): floors 32 each (96), 24 short; one more block (32) gets within 8 of 120
    assert round_channel_removals([40, 40, 40], w, 32, c) == [64, 32, 32]  # equal shortfall: first layer
    assert round_channel_removals([40, 40, 40], w, 32, c, scores=[[0, 5, 9], [0, -1, 9], [0, 2, 9]]) == [32, 64, 32]
    # nearest first: layer 2 is 28 of 32 above its floor, layer 0 18, layer 1 10
    assert round_channel_removals([50, 10, 60], w, 32, c) == [64, 0, 64]
    # a layer clamped at its smallest width (64 -> 32 kept) passes its shortfall on to the others
    assert round_channel_removals([60, 30], [64, 256], 32, [1, 1]) == [32, 64]
    # widths that are not multiples lose the remainder first: 100 -> 96 kept
    assert round_channel_removals([10], [100], 32, [1]) == [4]
    # the goal is in parameters: with 40 to remove, a 32-parameter block helps, a 96-parameter one does not
    assert round_channel_removals([10, 10], [128, 128], 32, [1, 3]) == [32, 0]
    assert round_channel_removals([10, 10], [128, 128], 32, [3, 1]) == [0, 32]


def test_round_channel_removals_stays_within_half_a_block():
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        L = int(torch.randint(2, 12, (1,), generator=g))
        n = [8, 16, 32][trial % 3]
        widths = [int(x) * n for x in torch.randint(4, 12, (L,), generator=g)]
        targets = [float(torch.rand(1, generator=g)) * 0.6 * w for w in widths]
        got = round_channel_removals(targets, widths, n, [5] * L)
        assert all((w - k) % n == 0 and w - k >= n for w, k in zip(widths, got))
        assert abs(sum(got) * 5 - sum(targets) * 5) <= n * 5 / 2 + 1e-6


def test_block_scores_are_means_of_the_layers_z_scores_lowest_first():
    std = (5 / 3) ** 0.5  # scores 3 1 2 4: mean 2.5, sample deviation sqrt(5/3)
    assert block_scores([3, 1, 2, 4], 2) == pytest.approx([(-1.5 - 0.5) / 2 / std])  # one block: 4 -> 2 kept
    assert block_scores(torch.arange(8.0), 2) == pytest.approx([-1.2, -0.4, 0.4], abs=1e-1)
    assert block_scores(torch.arange(8.0), 2)[0] < block_scores(torch.arange(8.0), 2)[1]


# ---- end to end ------------------------------------------------------------------------------


def _check_widths(m, n, ratio, res, heads=True):
    ad = get_adapter(m)
    widths = [ad.intermediate_size(l) for l in ad.layers]
    assert all(w % n == 0 for w in widths), widths
    if heads:
        assert all(ad.num_heads(l) * ad.head_dim % n == 0 for l in ad.layers)
    ccost = channel_cost(ad, ad.layers[0])
    removed = res.params_before - res.params_after
    # stated tolerance: half a block of n channels (n x one channel's parameters), plus the target's int()
    assert abs(removed - ratio * res.params_before) <= n * ccost / 2 + 1, (removed, ratio * res.params_before)
    return widths


@pytest.mark.parametrize("opts", [dict(layer_fraction=0.0), dict(layer_fraction=0.3, head_sparsity=None)])
def test_comp_width_multiple_end_to_end_reloads_identically(opts, tmp_path):
    m = tiny_model("llama", num_hidden_layers=6, intermediate_size=256)
    res = fedprune.prune(m, "comp", 0.3, calib_ids=calib(), width_multiple=32, output=tmp_path / "p", **opts)
    widths = _check_widths(m, 32, 0.3, res)
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    rec = plan["pruning"]["width_multiple"]
    assert rec["value"] == 32 and rec["ffn_widths"] == widths and rec["ffn_not_multiple"] == []
    assert plan["options"]["width_multiple"] == "32"
    again = fedprune.load_model(tmp_path / "p")
    assert torch.equal(logits(again, calib(2)), logits(m, calib(2)))


def test_comp_without_width_multiple_leaves_odd_widths():
    m = tiny_model("llama", num_hidden_layers=6, intermediate_size=256)
    fedprune.prune(m, "comp", 0.3, calib_ids=calib(), layer_fraction=0.0)
    ad = get_adapter(m)
    assert any(ad.intermediate_size(l) % 32 for l in ad.layers)  # the option does something


def test_unroundable_heads_are_left_and_warned_once(caplog):
    # head_dim 16, N = 64: kept heads must be a multiple of 4, but 4 heads in 2 KV groups can only go to 2
    m = tiny_model("llama", num_hidden_layers=4, intermediate_size=256)
    with caplog.at_level(logging.WARNING, logger="fedprune.pruning.width"):
        res = fedprune.prune(m, "comp", 0.3, calib_ids=calib(), width_multiple=64, layer_fraction=0.0,
                             head_sparsity=0.5)
    ad = get_adapter(m)
    assert [ad.num_heads(l) for l in ad.layers] == [2] * 4
    assert all(ad.intermediate_size(l) % 64 == 0 for l in ad.layers)
    warnings = [r for r in caplog.records if "width_multiple=64 not met" in r.getMessage()]
    assert len(warnings) == 1 and "o_proj" in warnings[0].getMessage()
    assert res.report["width_multiple"]["o_proj_not_multiple"] == [0, 1, 2, 3]


@pytest.mark.parametrize("method", ["magnitude", "wanda_sp", "flap", "llm_pruner"])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_peers_width_multiple(method, arch, tmp_path):
    kw = dict(intermediate_size=256) if arch != "opt" else dict(ffn_dim=256)
    m = tiny_model(arch, num_hidden_layers=8, **kw)
    extra = dict(first_layer=2) if method == "llm_pruner" else {}  # 4 of 8 layers pruned (default: 2)
    res = fedprune.prune(m, method, 0.2, calib_ids=calib(), width_multiple=32, output=tmp_path / "p", **extra)
    _check_widths(m, 32, 0.2, res)
    again = fedprune.load_model(tmp_path / "p")
    assert torch.equal(logits(again, calib(2)), logits(m, calib(2)))


def test_a_ratio_the_blocks_cannot_reach_is_refused():
    # LLM-Pruner prunes only layers 4 and 5 of 8 by default: 20 % of the model needs 240 of their 256 channels,
    # more than width_multiple=32 allows (224: 32 kept)
    m = tiny_model("llama", num_hidden_layers=8, intermediate_size=256)
    with pytest.raises(ValueError, match="ratio too high for width_multiple=32"):
        fedprune.prune(m, "llm_pruner", 0.2, calib_ids=calib(), width_multiple=32)


def test_bad_width_multiple_is_refused_by_name():
    m = tiny_model("llama")  # FFN width 96
    for bad in (0, -32, 2.5, "abc", True):
        with pytest.raises(ValueError, match="width_multiple"):
            fedprune.prune(m, "comp", 0.2, calib_ids=calib(), width_multiple=bad)
    with pytest.raises(ValueError, match="width_multiple=128 is larger than the FFN width 96"):
        fedprune.prune(m, "magnitude", 0.2, calib_ids=calib(), width_multiple=128)
    with pytest.raises(ValueError, match="unknown option 'width_multipel'"):
        fedprune.prune(m, "comp", 0.2, calib_ids=calib(), width_multipel=32)
    with pytest.raises(ValueError, match="unknown option 'width_multiple'"):
        fedprune.prune(m, "shortgpt", 0.2, calib_ids=calib(), width_multiple=32)  # whole layers only
    with pytest.raises(ValueError, match="width_multiple=32 applies to preset='project' only"):
        fedprune.prune(m, "wanda_sp", 0.2, calib_ids=calib(), preset="official", width_multiple=32)
    assert get_adapter(m).num_parameters() == get_adapter(tiny_model("llama")).num_parameters()  # nothing pruned


def test_cli_refuses_a_width_multiple_above_the_ffn_width_before_loading(tmp_path, capsys):
    from fedprune.cli import main

    src = tmp_path / "tiny"
    fedprune.save_model(tiny_model("llama", intermediate_size=96), src)
    assert main(["prune", "--model", str(src), "--seq-len", "16", "-o", "width_multiple=256", "--output", str(tmp_path / "o")]) == 1
    assert "width_multiple=256 is larger than the FFN width 96" in capsys.readouterr().err
    assert main(["prune", "--model", str(src), "--seq-len", "16", "-o", "width_multiple=0", "--output", str(tmp_path / "o")]) == 1
    assert "width_multiple must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
