"""``-o preset=official``: each peer's official structure rule and calibration sizes.

The default preset (``project``) is held unchanged by ``test_pruning_contract.py`` and the golden runs.
"""
import json
import random

import pytest
import torch

import fedprune
from fedprune.adapters import get_adapter
from fedprune.data.toy_tokenizer import toy_tokenizer
from fedprune.models.tiny import tiny_model
from fedprune.pruning import method_options
from fedprune.pruning.criteria.layer import sleb_removal
from fedprune.pruning.criteria.units import activation_moments, wanda_sp_scores
from fedprune.pruning.methods import calibration_sizes
from fedprune.pruning.methods.flap import standardised
from fedprune.pruning.methods.llm_pruner import official_layer_cut

pytestmark = pytest.mark.usefixtures("one_thread")

PRESET_METHODS = ["wanda_sp", "flap", "llm_pruner", "sleb"]
OFFICIAL = {"wanda_sp": (128, 128), "flap": (1024, 128), "llm_pruner": (10, 64), "sleb": (128, 2048)}


def gqa_model(layers=8, **kw):
    """LLaMA-like: 6 query heads in 3 KV groups (head_dim 16), FFN width 64."""
    return tiny_model("llama", num_hidden_layers=layers, num_attention_heads=6, num_key_value_heads=3,
                      hidden_size=96, intermediate_size=64, **kw)


def calib(n=8, L=24, seed=0):
    return torch.randint(3, 128, (n, L), generator=torch.Generator().manual_seed(seed))


def layer_weights(model, i):
    return {k: v.clone() for k, v in model.model.layers[i].state_dict().items()}


def test_wanda_sp_official_prunes_no_attention_with_three_groups_at_a_third():
    m = gqa_model(4)
    ad = get_adapter(m)
    before = ad.num_parameters()
    res = fedprune.prune(m, "wanda_sp", 0.33, calib_ids=calib(), preset="official")
    for layer in ad.layers:  # int(0.33 * 3) = 0 KV groups; int(0.33 * 64) = 21 channels
        assert (ad.num_heads(layer), ad.num_kv_heads(layer), ad.intermediate_size(layer)) == (6, 3, 64 - 21)
    # reported honestly: MLP only, so well below the request (no rebalancing)
    assert res.achieved_ratio == pytest.approx(1 - ad.num_parameters() / before) and res.achieved_ratio < 0.25


def test_wanda_sp_official_removes_the_weakest_whole_kv_group():
    m = gqa_model(2)
    ad = get_adapter(m)
    ids = calib()
    mom = activation_moments(ad, ids)
    weakest = [int(wanda_sp_scores(ad, layer, mom[i])[0].reshape(3, 2).sum(1).argmin())
               for i, layer in enumerate(ad.layers)]
    fedprune.prune(m, "wanda_sp", 0.4, calib_ids=ids, preset="official")  # int(0.4 * 3) = 1 group
    for i, layer in enumerate(ad.layers):
        assert (ad.num_heads(layer), ad.num_kv_heads(layer)) == (4, 2)
        assert weakest[i] not in ad.plan.layers[i].kv_heads
        assert sorted({h // 2 for h in ad.plan.layers[i].q_heads}) == ad.plan.layers[i].kv_heads


def test_llm_pruner_official_prunes_only_layers_4_to_L_minus_3_at_the_local_ratio():
    m = gqa_model(8)
    ad = get_adapter(m)
    untouched = {i: layer_weights(m, i) for i in (0, 1, 2, 3, 6, 7)}
    res = fedprune.prune(m, "llm_pruner", 0.4, calib_ids=calib(), preset="official")
    assert res.report["pruned_layers"] == [4, 5]
    for i, w in untouched.items():
        assert all(torch.equal(w[k], v) for k, v in layer_weights(m, i).items()), f"layer {i} changed"
    # kv_width 48: (48 - int(48 * 0.6)) // 16 = 1 KV group; 64 - int(64 * 0.6) = 26 channels
    for i in (4, 5):
        layer = ad.layers[i]
        assert (ad.num_heads(layer), ad.num_kv_heads(layer), ad.intermediate_size(layer)) == (4, 2, 38)
    assert res.achieved_ratio < 0.15  # two of eight layers at 40 %: below the request, as measured


def test_llm_pruner_official_keeps_attention_when_the_rule_rounds_to_no_group():
    m = gqa_model(8)
    ad = get_adapter(m)
    fedprune.prune(m, "llm_pruner", 0.2, calib_ids=calib(), preset="official")
    # (48 - int(48 * 0.8)) // 16 = (48 - 38) // 16 = 0 groups; 64 - int(64 * 0.8) = 13 channels
    assert [(ad.num_kv_heads(l), ad.intermediate_size(l)) for l in ad.layers[4:6]] == [(3, 51), (3, 51)]


def test_llm_pruner_official_channel_count_rounds_up_like_the_official_code():
    ad = get_adapter(gqa_model(1))
    # 64 - int(64 * 0.7) = 64 - 44 = 20 (round(0.3 * 64) would be 19); kv: (48 - int(33.6)) // 16 = 0
    assert official_layer_cut(ad, ad.layers[0], 0.3) == (0, 20)


def test_flap_official_standardises_squared_columns_per_layer_then_averages_per_head():
    # one layer, head_dim 2: attention columns 1, 1, 2, 4 (two heads), channels 1, 2, 3
    cols = [(torch.tensor([1.0, 1.0, 2.0, 4.0]), torch.tensor([1.0, 2.0, 3.0]))]
    # squared columns 1, 1, 4, 16: mean 5.5, sample std sqrt(((4.5^2) * 2 + 1.5^2 + 10.5^2) / 3) = sqrt(51)
    z = (torch.tensor([1.0, 1.0, 4.0, 16.0]) - 5.5) / 51 ** 0.5
    heads, chans = standardised(cols, head_dim=2, preset="official")[0]
    assert torch.allclose(heads, torch.stack([z[:2].mean(), z[2:].mean()]))
    assert torch.allclose(chans, torch.tensor([-1.0, 0.0, 1.0]))
    # project: z-scores of the head sums 2 and 6 (mean 4, std sqrt(8)) and of the channels
    heads_p, chans_p = standardised(cols, head_dim=2, preset="project")[0]
    assert torch.allclose(heads_p, torch.tensor([-2.0, 2.0]) / 8 ** 0.5) and torch.allclose(chans_p, chans)


def test_flap_standardises_each_layer_on_its_own_scale():
    """The official ``standarlization`` works along each layer's row: a layer whose scores are all 100x
    smaller gets the same z-scores, so the global threshold does not empty it (the earlier reading,
    z-scores over all layers, cut SmolLM2-135M's attention to 3 of 9 heads in every layer)."""
    a = (torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([1.0, 4.0, 9.0]))
    small = (a[0] * 0.1, a[1] * 0.01)
    for preset in ("project", "official"):
        za, zs = standardised([a, small], head_dim=2, preset=preset)
        assert torch.allclose(za[0], zs[0]) and torch.allclose(za[1], zs[1])
    with pytest.raises(ValueError, match="preset"):
        standardised([a], head_dim=2, preset="global")


def test_sleb_official_never_removes_the_first_or_last_block():
    m = gqa_model(6)
    res = fedprune.prune(m, "sleb", 0.45, calib_ids=calib(), preset="official")
    assert len(res.report["removed_layers"]) >= 2 and not {0, 5} & set(res.report["removed_layers"])
    ad = get_adapter(gqa_model(4))
    # the barriers leave blocks 1 and 2 only: asking for both gives exactly them, a third is refused
    assert sleb_removal(ad, calib(), 2, keep_first=1, keep_last=1) == [1, 2]
    with pytest.raises(ValueError, match="cannot remove 3 of 4 blocks while keeping the first 1 and last 1"):
        sleb_removal(ad, calib(), 3, keep_first=1, keep_last=1)


def test_sleb_project_may_remove_an_end_block():
    """Without barriers block 0 or 3 is a candidate: removing three of four blocks must take one."""
    ad = get_adapter(gqa_model(4))
    assert {0, 3} & set(sleb_removal(ad, calib(), 3))


@pytest.mark.parametrize("method", PRESET_METHODS)
def test_calibration_defaults_apply_only_when_not_given(method):
    official = method_options(method, {"preset": "official"})
    assert calibration_sizes(official, None, None) == OFFICIAL[method]
    assert calibration_sizes(official, 7, None) == (7, OFFICIAL[method][1])
    assert calibration_sizes(official, None, 33) == (OFFICIAL[method][0], 33)
    assert calibration_sizes(method_options(method, {}), None, None) == (128, 512)
    assert calibration_sizes(method_options("comp", {}), None, None) == (128, 512)


def test_prune_draws_the_presets_calibration_unless_told(tmp_path):
    random.seed(0)
    words = "the of and a to in is was for on that with as by it at from his an were are".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(random.choice(words) for _ in range(3000)))
    tok = toy_tokenizer(vocab_size=300)
    for kw, want in (({}, (10, 64)), ({"nsamples": 3, "seq_len": 20}, (3, 20))):
        out = tmp_path / f"out{len(kw)}"
        fedprune.prune(gqa_model(6, vocab_size=len(tok)), "llm_pruner", 0.2, tokenizer=tok,
                       calibration=f"text:{corpus}", output=out, preset="official", **kw)
        cal = json.loads((out / "plan.json").read_text())["calibration"]
        assert (cal["nsamples"], cal["seq_len"]) == want


def test_cli_resolves_the_presets_calibration_before_loading(tmp_path):
    from fedprune.cli import build_parser
    from fedprune.commands.prune import check_before_loading

    model_dir = tmp_path / "tiny"
    gqa_model(2).save_pretrained(model_dir)
    parser = build_parser()
    base = ["prune", "--model", str(model_dir), "--output", str(tmp_path / "o"), "--calibration", "wikitext2"]
    args = parser.parse_args(base + ["--method", "flap", "-o", "preset=official"])
    check_before_loading(args)
    assert (args.nsamples, args.seq_len) == (1024, 128)
    args = parser.parse_args(base + ["--method", "flap", "-o", "preset=official", "--seq-len", "100"])
    check_before_loading(args)
    assert (args.nsamples, args.seq_len) == (1024, 100)
    args = parser.parse_args(base + ["--method", "flap", "--seq-len", "64"])
    check_before_loading(args)
    assert (args.nsamples, args.seq_len) == (128, 64)  # no preset: the usual 128
    # without a preset the default window is 512, the official SLEB one 2048: both exceed the
    # tiny model's 256-token context, so both are refused before loading, naming --seq-len
    for extra in ([], ["-o", "preset=official"]):
        args = parser.parse_args(base + ["--method", "sleb"] + extra)
        with pytest.raises(ValueError, match="--seq-len"):
            check_before_loading(args)
        assert args.seq_len == (2048 if extra else 512)


@pytest.mark.parametrize("method", PRESET_METHODS)
def test_unknown_preset_is_refused_with_the_known_ones(method):
    with pytest.raises(ValueError, match=r"preset 'paper' is not known; known presets: project, official"):
        method_options(method, {"preset": "paper"})
