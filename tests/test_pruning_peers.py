"""Peer pruning methods: registered, hit their budgets, keep the model valid."""
import pytest
import torch

import fedprune
from fedprune.adapters import get_adapter
from fedprune.models.tiny import tiny_model
from fedprune.pruning import available_methods
from fedprune.pruning.criteria.units import activation_moments, magnitude_scores

NEURON_PEERS = ["magnitude", "wanda_sp", "flap", "llm_pruner"]


def calib(n=8, L=24, seed=0):
    return torch.randint(3, 128, (n, L), generator=torch.Generator().manual_seed(seed))


def test_all_methods_registered():
    assert set(available_methods()) >= {"comp", "magnitude", "wanda_sp", "flap", "llm_pruner", "shortgpt", "sleb"}


@pytest.mark.parametrize("method", NEURON_PEERS)
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_neuron_peers_hit_ratio_and_run(method, arch):
    kw = dict(intermediate_size=192) if arch != "opt" else dict(ffn_dim=192)
    m = tiny_model(arch, num_hidden_layers=8, **kw)
    res = fedprune.prune(m, method, 0.2, calib_ids=calib())
    assert abs(res.achieved_ratio - 0.2) < 0.02
    with torch.no_grad():
        assert m(input_ids=calib(2)).logits.isfinite().all()


@pytest.mark.parametrize("method", ["shortgpt", "sleb"])
def test_layer_peers_remove_whole_layers(method):
    m = tiny_model("llama", num_hidden_layers=8)
    res = fedprune.prune(m, method, 0.25, calib_ids=calib())
    assert len(res.report["removed_layers"]) == get_adapter(m).plan.orig_num_layers - get_adapter(m).num_layers >= 1
    with pytest.raises(ValueError, match="more layers than exist"):
        fedprune.prune(tiny_model("llama", num_hidden_layers=2), method, 0.9, calib_ids=calib())


def test_magnitude_scores_are_group_norms():
    m = tiny_model("llama")
    ad = get_adapter(m)
    layer = ad.layers[0]
    heads, chans = magnitude_scores(ad, layer)
    j = 5
    want = sum(float((l.weight[j] ** 2).sum()) for l in ad.ffn_in(layer)) + float((ad.ffn_out(layer).weight[:, j] ** 2).sum())
    assert float(chans[j]) == pytest.approx(want, rel=1e-6)
    hd = ad.head_dim
    want_h = float((ad.qkv(layer)[0].weight[hd:2 * hd] ** 2).sum() + (ad.o_proj(layer).weight[:, hd:2 * hd] ** 2).sum())
    assert float(heads[1]) == pytest.approx(want_h, rel=1e-6)


def test_activation_moments_match_direct_computation():
    m = tiny_model("llama")
    ad = get_adapter(m)
    ids = calib(4, 16)
    seen = []
    h = ad.ffn_out(ad.layers[1]).register_forward_hook(lambda mod, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        m(input_ids=ids)
    h.remove()
    x = torch.cat(seen).double()
    mom = activation_moments(ad, ids, batch_size=2)
    torch.testing.assert_close(mom[1]["ffn_mean"], x.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mom[1]["ffn_var"], x.var(0, unbiased=False), atol=1e-5, rtol=1e-4)


def test_flap_bias_compensation_reduces_output_shift():
    ids = calib(16, 32)
    errs = {}
    for bc in (False, True):
        m = tiny_model("llama", num_hidden_layers=4, intermediate_size=192)
        with torch.no_grad():
            ref = m(input_ids=ids).logits
        fedprune.prune(m, "flap", 0.3, calib_ids=ids, bias_compensation=bc)
        with torch.no_grad():
            errs[bc] = float((m(input_ids=ids).logits - ref).pow(2).mean())
    assert errs[True] < errs[False]
