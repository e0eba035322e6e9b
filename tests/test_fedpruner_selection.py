"""Layer importance, softmax selection within groups, FedPruner+ sub-block selection, submodels."""
import numpy as np
import pytest
import torch

from fedprune.adapters import get_adapter
from fedprune.fedpruner.selection import (LAYER_IMPORTANCE, block_units, blocks_to_skip, cosine_importance,
                                          layer_io, model_loss_closure, select_blocks, select_layers,
                                          selection_probs, skip_loss_importance)
from fedprune.fedpruner.submodel import only_layers, skip_blocks
from fedprune.models.tiny import tiny_model


def count_calls(model):
    ad = get_adapter(model)
    calls = {i: 0 for i in range(ad.num_layers)}
    hooks = []
    for i, layer in enumerate(ad.layers):
        def hook(m, a, o, i=i):
            calls[i] += 1
        hooks.append(layer.register_forward_hook(hook))
    return calls, hooks


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_only_layers_runs_exactly_the_selected_layers_and_restores(arch, input_ids):
    model = tiny_model(arch, num_hidden_layers=6)
    ad = get_adapter(model)
    layers_before = list(ad.layers)
    with torch.no_grad():
        ref = model(input_ids=input_ids).logits
    calls, hooks = count_calls(model)
    with only_layers(model, [1, 4]):
        assert model.config.num_hidden_layers == 2
        with torch.no_grad():
            sub = model(input_ids=input_ids).logits
            # generation with a KV cache indexes layers by layer_idx: still works
            model.generate(input_ids[:1, :4], max_new_tokens=2, do_sample=False)
    assert calls[1] > 0 and calls[4] > 0
    assert all(calls[i] == 0 for i in (0, 2, 3, 5))
    assert calls[1] == calls[4]
    assert not torch.allclose(sub, ref)
    for h in hooks:
        h.remove()
    assert list(ad.layers) == layers_before and model.config.num_hidden_layers == 6
    if arch == "llama":
        assert [layer.self_attn.layer_idx for layer in ad.layers] == list(range(6))
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, ref)
    # all layers == the full model
    with only_layers(model, range(6)), torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, ref)
    with pytest.raises(ValueError):
        with only_layers(model, [6]):
            pass


def test_only_layers_equals_physical_layer_removal(input_ids):
    model = tiny_model("llama", num_hidden_layers=5)
    with only_layers(model, [0, 2, 3]), torch.no_grad():
        sub = model(input_ids=input_ids).logits
    get_adapter(model).remove_layers([1, 4])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, sub)


def test_skip_blocks_bypasses_sub_blocks(input_ids):
    model = tiny_model("llama", num_hidden_layers=3)
    ad = get_adapter(model)
    attn_calls = []
    h = ad.attention(ad.layers[1]).register_forward_hook(lambda *a: attn_calls.append(1))
    with skip_blocks(model, attn=[1], mlp=[0, 1, 2]), torch.no_grad():
        out = model(input_ids=input_ids).logits
    h.remove()
    assert attn_calls == []  # the real attention of layer 1 never ran
    # reference: layer 1 does nothing at all (attn bypassed, mlp bypassed) == removing it, except
    # that layers 0 and 2 also lose their FFN: zero their down projections instead
    ref_model = tiny_model("llama", num_hidden_layers=3)
    rad = get_adapter(ref_model)
    with torch.no_grad():
        for layer in rad.layers:
            rad.ffn_out(layer).weight.zero_()
        rad.o_proj(rad.layers[1]).weight.zero_()
        torch.testing.assert_close(ref_model(input_ids=input_ids).logits, out)
    assert type(ad.attention(ad.layers[1])).__name__ != "_Bypass"  # restored


def test_cosine_importance_by_hand_and_on_a_model(input_ids):
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    imp = cosine_importance([(x, x), (x, y)])
    assert imp[0] == pytest.approx(0.0, abs=1e-7)
    assert imp[1] == pytest.approx(1.0 - (1.0 + 2 ** -0.5) / 2)
    model = tiny_model("llama")
    io = layer_io(model, input_ids)
    assert len(io) == 4 and io[0][0].shape == (input_ids.numel(), 64)
    # layer i's output is layer i+1's input
    torch.testing.assert_close(io[0][1], io[1][0])
    assert "cosine" in LAYER_IMPORTANCE and "skip_loss" in LAYER_IMPORTANCE


def test_skip_loss_importance(input_ids):
    model = tiny_model("llama")
    loss = model_loss_closure(model, input_ids)
    imp = skip_loss_importance(loss, 4)
    with torch.no_grad():
        full = float(model(input_ids=input_ids, labels=input_ids).loss)
        get_adapter(model).remove_layers([2])
        without2 = float(model(input_ids=input_ids, labels=input_ids).loss)
    assert imp[2] == pytest.approx(without2 - full, rel=1e-4, abs=1e-6)
    # synthetic closure: importance is exactly the loss jump
    fake = lambda keep: 1.0 + sum(0.1 * (i + 1) for i in range(3) if i not in keep)  # noqa: E731
    torch.testing.assert_close(skip_loss_importance(fake, 3), torch.tensor([0.1, 0.2, 0.3]))


def test_selection_follows_softmax_and_keeps_every_layer_alive():
    groups = [[0, 1, 2], [3, 4], [5]]
    imp = torch.tensor([0.0, 1.0, 0.5, 2.0, 2.0, 9.0])
    p = selection_probs(imp[[0, 1, 2]], temperature=0.5)
    expected = torch.softmax(torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64) / 0.5, 0)
    torch.testing.assert_close(p, expected)
    rng = np.random.default_rng(0)
    counts = np.zeros(6)
    n = 4000
    for _ in range(n):
        sel = select_layers(groups, imp, temperature=0.5, rng=rng)
        assert len(sel) == 3 and sel[2] == 5 and sel[0] in (0, 1, 2) and sel[1] in (3, 4)
        counts[sel] += 1
    freq = counts[:3] / n
    assert np.allclose(freq, expected.numpy(), atol=0.03)
    assert counts.min() > 0  # even the least important layer trains sometimes
    assert abs(counts[3] - counts[4]) / n < 0.05  # ties are fair
    # seeded: reproducible
    assert select_layers(groups, imp, rng=7) == select_layers(groups, imp, rng=7)
    # temperature -> 0 approaches argmax; large -> uniform
    assert selection_probs(imp[[0, 1, 2]], 1e-3)[1] > 0.999
    assert torch.allclose(selection_probs(imp[[0, 1, 2]], 1e6), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_select_blocks_respects_budget_and_groups():
    L = 6
    units = block_units(L)
    costs = [3.0 if k == "attn" else 5.0 for _, k in units]
    imp = [float(i % 5) for i in range(len(units))]
    groups = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        chosen = select_blocks(units, imp, costs, budget=17.0, groups=groups, rng=rng)
        cost = sum(costs[units.index(u)] for u in chosen)
        assert cost <= 17.0
        # one per group first (3 + 5 <= 17 whatever is drawn), so every group is represented
        for g in groups:
            assert any(units[i] in chosen for i in g)
        # the budget is filled: nothing else would still fit
        left = 17.0 - cost
        assert all(costs[i] > left for i in range(len(units)) if units[i] not in chosen)
        seen.update(chosen)
    assert seen == set(units)  # every sub-block is trained sometimes
    keep, attn_skip, mlp_skip = blocks_to_skip([(0, "attn"), (2, "mlp"), (2, "attn"), (4, "mlp")], L)
    assert keep == [0, 2, 4] and attn_skip == [4] and mlp_skip == [0]
    with pytest.raises(ValueError):
        select_blocks(units, imp[:-1], costs, 10.0)


def test_device_layer_plan_end_to_end_on_a_tiny_model(input_ids):
    from fedprune.fedpruner import cka_matrix, device_layer_plan, layer_outputs

    model = tiny_model("llama", num_hidden_layers=6)
    S = cka_matrix(layer_outputs(model, input_ids))
    imp = cosine_importance(layer_io(model, input_ids))
    groups, chosen = device_layer_plan(S, imp, 3, temperature=0.5, rng=0)
    assert len(groups) == 3 and [i for g in groups for i in g] == list(range(6))
    assert len(chosen) == 3 and all(any(c in g for c in chosen) for g in groups)
    calls, hooks = count_calls(model)
    with only_layers(model, chosen), torch.no_grad():
        model(input_ids=input_ids)
    assert {i for i, n in calls.items() if n} == set(chosen)
    for h in hooks:
        h.remove()
