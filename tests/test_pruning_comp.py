"""COMP: criteria, mask tuning, budget and the end-to-end pruner on tiny random models."""
import pytest
import torch

import fedprune
from fedprune.adapters import get_adapter
from fedprune.models.tiny import tiny_model
from fedprune.pruning.budget import LayerTarget
from fedprune.pruning.criteria.neuron import NEURON_CRITERIA, UnitStats, removal_order
from fedprune.pruning.mask_tuning import reconstruction_error, solve_mask
from fedprune.pruning.methods.comp import CompOptions, prune_neurons_layerwise


def calib(n=8, L=24, seed=0):
    return torch.randint(3, 128, (n, L), generator=torch.Generator().manual_seed(seed))


def logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits


def redundant_stats(k=12, d=16, T=400, seed=0):
    """Channel 7 is half of channel 2, with the same output column: fully redundant."""
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(T, k, generator=g, dtype=torch.float64) + 0.3
    W = torch.randn(d, k, generator=g, dtype=torch.float64)
    W = W / W.norm(dim=0, keepdim=True)
    H[:, 7] = 0.5 * H[:, 2]
    W[:, 7] = W[:, 2]
    G = H.T @ H
    A = (W.T @ W) * G
    return UnitStats(G=G, w_norm2=(W * W).sum(0), A=A, mean=H.mean(0), n=T)


@pytest.mark.parametrize("criterion", NEURON_CRITERIA.names())
def test_each_metric_ranks_redundant_channel_lowest(criterion):
    st = redundant_stats()
    assert removal_order(criterion, st, 1) == [7]


def test_mask_solution_never_increases_error_and_fits_exact_case():
    g = torch.Generator().manual_seed(1)
    U = torch.randn(300, 5, 8, generator=g, dtype=torch.float64)  # tokens x units x d
    true_m = torch.tensor([1.5, 0.7, 1.0, 1.2, 0.9], dtype=torch.float64)
    e = torch.einsum("tkd,k->td", U, true_m)
    A = torch.einsum("tkd,tjd->kj", U, U)
    c = torch.einsum("tkd,td->k", U, e)
    sol = solve_mask(A, c, float((e * e).sum()), damp=1e-8)
    assert sol.accepted
    torch.testing.assert_close(sol.scales, true_m, atol=1e-5, rtol=0)
    assert sol.error_after < 1e-6 * sol.error_before
    assert reconstruction_error(A, c, float((e * e).sum()), sol.scales) == pytest.approx(sol.error_after)


def test_mask_solution_rejects_ill_conditioned_systems():
    A = torch.diag(torch.tensor([1.0, 1e-14], dtype=torch.float64))
    sol = solve_mask(A, torch.tensor([1.0, 1.0], dtype=torch.float64), 2.0, damp=0.0, max_cond=1e8)
    assert not sol.accepted and "ill conditioned" in sol.reason
    assert torch.equal(sol.scales, torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_zero_removal_leaves_logits_unchanged(arch):
    m = tiny_model(arch)
    ids = calib()
    ref = logits(m, ids)
    ad = get_adapter(m)
    prune_neurons_layerwise(ad, ids, [], [LayerTarget(0, 0, 0)] * ad.num_layers, CompOptions(), list(ad.layers))
    assert torch.equal(logits(m, ids), ref)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "opt"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_comp_hits_ratio_within_half_a_point(arch, ratio):
    m = tiny_model(arch, num_hidden_layers=6, intermediate_size=192) if arch != "opt" else \
        tiny_model(arch, num_hidden_layers=6, ffn_dim=192)
    res = fedprune.prune(m, "comp", ratio, calib_ids=calib(), layer_fraction=0.25, head_sparsity=None)
    assert abs(res.achieved_ratio - ratio) <= 0.005
    assert res.params_after == get_adapter(m).num_parameters()
    assert logits(m, calib(2)).isfinite().all()


def test_mask_tuning_lowers_every_layers_reconstruction_error():
    m = tiny_model("llama", num_hidden_layers=4, intermediate_size=192)
    res = fedprune.prune(m, "comp", 0.3, calib_ids=calib(16, 32), layer_fraction=0.0)
    fits = [e[k] for e in res.report["layers"] for k in ("ffn_mask", "heads_mask") if k in e]
    assert fits and all(f["err_after"] <= f["err_before"] + 1e-9 for f in fits)
    assert sum(f["err_after"] < 0.999 * f["err_before"] for f in fits) >= len(fits) // 2


def test_mask_tuning_helps_the_pruned_model():
    ids = calib(16, 32)
    out = {}
    for tune in (False, True):
        m = tiny_model("llama", num_hidden_layers=4, intermediate_size=192)
        ref = logits(m, ids)
        fedprune.prune(m, "comp", 0.3, calib_ids=ids, layer_fraction=0.0, mask_tuning=tune)
        out[tune] = float((logits(m, ids) - ref).pow(2).mean())
    assert out[True] < out[False]


def test_pruned_model_reloads_with_identical_logits(tmp_path):
    m = tiny_model("llama", num_hidden_layers=6, intermediate_size=192)
    res = fedprune.prune(m, "comp", 0.3, calib_ids=calib(), layer_fraction=0.5, output=tmp_path / "p")
    assert res.report["removed_layers"]
    again = fedprune.load_model(tmp_path / "p")
    assert torch.equal(logits(again, calib(2)), logits(m, calib(2)))
    plan = get_adapter(again).plan
    assert [lp.orig_index for lp in plan.layers] == [i for i in range(6) if i not in res.report["removed_layers"]]


def test_bad_input_is_named():
    m = tiny_model("llama")
    for bad in (0, 0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\)"):
            fedprune.prune(m, "comp", bad, calib_ids=calib())
    with pytest.raises(KeyError, match="unknown pruning method 'nope'.*comp"):
        fedprune.prune(m, "nope", 0.2, calib_ids=calib())
    with pytest.raises(ValueError, match="n_layers=10 is more than"):
        fedprune.prune(m, "comp", 0.2, calib_ids=calib(), n_layers=10)
    with pytest.raises(KeyError, match="unknown neuron criterion"):
        fedprune.prune(m, "comp", 0.2, calib_ids=calib(), neuron_metric="magic")
    with pytest.raises(ValueError, match="layer_fraction"):
        fedprune.prune(m, "comp", 0.2, calib_ids=calib(), layer_fraction=2)


def test_auto_layer_fraction_picks_a_candidate():
    m = tiny_model("llama", num_hidden_layers=6, intermediate_size=192)
    res = fedprune.prune(m, "comp", 0.3, calib_ids=calib(12, 24), layer_fraction="auto", auto_nsamples=4)
    trials = res.report["auto_trials"]
    assert len(trials) == 4
    best = min(trials, key=lambda t: t["calibration_nll"])
    assert res.report["layer_fraction"] == best["layer_fraction"]


def test_prune_cli_saves_a_reloadable_model(tmp_path, monkeypatch):
    """The CLI calls the same function; the saved model reloads with the plan."""
    from fedprune.cli import main
    from fedprune import save_model

    src = tmp_path / "tiny"
    save_model(tiny_model("llama", num_hidden_layers=4, intermediate_size=192), src)
    import fedprune.pruning as P

    monkeypatch.setattr(P, "get_calibration", lambda tok, corpus, n, L, seed, data_dir=None: calib(n, L))
    import fedprune.models.loading as loading

    monkeypatch.setattr(loading, "load_tokenizer", lambda spec: None)
    import fedprune

    monkeypatch.setattr(fedprune, "load_tokenizer", lambda spec: None)
    rc = main(["prune", "--model", str(src), "--method", "comp", "--ratio", "0.25", "--nsamples", "4", "--seq-len",
               "16", "--layer-fraction", "0", "--output", str(tmp_path / "out")])
    assert rc == 0
    m = fedprune.load_model(tmp_path / "out")
    assert abs(1 - get_adapter(m).num_parameters() / get_adapter(fedprune.load_model(src)).num_parameters() - 0.25) < 0.005
    assert main(["prune", "--model", str(src), "--ratio", "1.5", "--output", str(tmp_path / "bad")]) == 1


def test_condition_estimate_matches_eigenvalues():
    from fedprune.pruning.mask_tuning import condition_estimate

    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    ev = torch.logspace(0, 5, 40, dtype=torch.float64)
    M = Q @ torch.diag(ev) @ Q.T
    est = condition_estimate(M, torch.linalg.cholesky(M), iters=200)
    assert est == pytest.approx(1e5, rel=0.05)


def test_importance_weights_prune_important_layers_less():
    from fedprune.pruning.budget import importance_weights

    w = importance_weights([0.1, 0.2, 0.3], strength=1.0)
    assert w[0] > w[1] > w[2]
    # z-scores are -1.2247, 0, 1.2247: the weights are exp(-z)
    assert w[1] == pytest.approx(1.0) and w[0] * w[2] == pytest.approx(1.0)
    assert importance_weights([0.1, 0.2, 0.3], strength=0.0) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="strength"):
        importance_weights([0.1], -1.0)


def test_allocate_water_fills_over_the_cap():
    from fedprune.pruning.budget import allocate

    # proportional: 60 over sizes 100/100/100 with weights 1/1/4 -> 10/10/40
    assert allocate(60, [100, 100, 100], [1, 1, 4], cap=0.9) == pytest.approx([10, 10, 40])
    # the heavy layer would get 160 > 90: it is capped, the 110 left split evenly
    assert allocate(200, [100, 100, 100], [1, 1, 16], cap=0.9) == pytest.approx([55, 55, 90])
    with pytest.raises(ValueError, match="remove more whole layers"):
        allocate(280, [100, 100, 100], [1, 1, 1], cap=0.9)


@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_comp_importance_allocation_hits_ratio_and_varies_layers(strength):
    model = tiny_model("llama", num_hidden_layers=4, intermediate_size=192)
    res = fedprune.prune(model, "comp", 0.2, calib_ids=calib(), layer_fraction=0.0, head_sparsity=0,
                         allocation_strength=strength)
    assert abs(res.achieved_ratio - 0.2) <= 0.005
    widths = [get_adapter(model).intermediate_size(l) for l in get_adapter(model).layers]
    assert (max(widths) - min(widths) > 1) == (strength > 0)  # uniform: rounding only
