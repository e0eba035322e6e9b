"""Masks: GQA validity, parameter budget, soft masking == physical pruning."""
import copy

import pytest
import torch

from fedprune.adapters import get_adapter
from fedprune.fedspine.masks import (apply_masks, attention_params, check_gqa_valid, ffn_params,
                                     gqa_head_keep_mask, layer_keep_masks, model_keep_masks, prune_to_masks)
from fedprune.models.tiny import tiny_model


def test_head_mask_is_gqa_valid_and_prefers_high_scores():
    scores = torch.tensor([5.0, 4.0, 0.1, 0.2, 3.0, 0.3, 9.0, 0.0])  # 4 KV groups of 2
    hd, H = 4, 16
    full = attention_params(8, 4, hd, H)
    m = gqa_head_keep_mask(scores, 4, full / 2, hd, H)
    check_gqa_valid(m, 4)
    assert attention_params(int(m.sum()), int(m.reshape(4, 2).any(1).sum()), hd, H) <= full / 2
    # budget 1/2: best is 2 full groups (4 heads, 2 kv) or 3 groups x 1 head (3 q + 3 kv = same cost); the
    # top-scoring among the equal-cost options wins: groups {0, 3} full = 5+4+9+0 = 18 > 5+3+9 = 17
    assert m.tolist() == [True, True, False, False, False, False, True, True]
    # never zero heads, even with a tiny budget
    m1 = gqa_head_keep_mask(scores, 4, 0.0, hd, H)
    assert m1.tolist() == [False] * 6 + [True, False]


def test_layer_masks_respect_budget_and_monotonicity():
    torch.manual_seed(0)
    nh, nkv, hd, H, I = 8, 2, 4, 32, 64
    total = attention_params(nh, nkv, hd, H) + ffn_params(I, H)
    prev = None
    for ratio in (0.0, 0.1, 0.25, 0.4, 0.6):
        hs, cs = torch.rand(nh), torch.rand(I)
        h, c = layer_keep_masks(hs, cs, nkv, hd, H, ratio, prev_heads=prev and prev[0], prev_channels=prev and prev[1])
        check_gqa_valid(h, nkv)
        kept = attention_params(int(h.sum()), int(h.reshape(nkv, -1).any(1).sum()), hd, H) + ffn_params(int(c.sum()), H)
        assert kept <= (1 - ratio) * total + 1e-6
        # close to the budget: within one FFN channel
        assert kept > (1 - ratio) * total - ffn_params(1, H) - 1e-6
        if prev is not None:  # a pruned unit never comes back
            assert not bool((h & ~prev[0]).any()) and not bool((c & ~prev[1]).any())
        prev = (h, c)
    h0, c0 = layer_keep_masks(torch.rand(nh), torch.rand(I), nkv, hd, H, 0.0)
    assert bool(h0.all()) and bool(c0.all())
    with pytest.raises(ValueError):
        layer_keep_masks(torch.rand(nh), torch.rand(I), nkv, hd, H, 1.0)


def test_check_gqa_valid_rejects_uneven_groups():
    with pytest.raises(ValueError):
        check_gqa_valid(torch.tensor([True, True, True, False]), 2)
    check_gqa_valid(torch.tensor([True, False, False, False]), 2)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_soft_masks_equal_physical_pruning(arch, input_ids):
    model = tiny_model(arch)
    ad = get_adapter(model)
    g = torch.Generator().manual_seed(1)
    hs = {i: torch.rand(ad.num_heads(l), generator=g) for i, l in enumerate(ad.layers)}
    cs = {i: torch.rand(ad.intermediate_size(l), generator=g) for i, l in enumerate(ad.layers)}
    hm, cm = model_keep_masks(model, hs, cs, 0.4)
    assert any(not bool(m.all()) for m in hm.values()) and all(not bool(m.all()) for m in cm.values())
    with torch.no_grad():
        ref = model(input_ids=input_ids).logits
        with apply_masks(model, hm, cm):
            masked = model(input_ids=input_ids).logits
        assert torch.equal(model(input_ids=input_ids).logits, ref)  # hooks removed
        assert not torch.allclose(masked, ref)
        pruned = prune_to_masks(copy.deepcopy(model), hm, cm)
        torch.testing.assert_close(pruned(input_ids=input_ids).logits, masked, rtol=1e-4, atol=1e-5)
    pad = get_adapter(pruned)
    for i, layer in enumerate(pad.layers):
        assert pad.num_heads(layer) == int(hm[i].sum())
        assert pad.intermediate_size(layer) == int(cm[i].sum())


def test_soft_masks_let_training_continue_and_block_pruned_units(input_ids):
    model = tiny_model("llama")
    model.train()
    ad = get_adapter(model)
    hm = {0: torch.tensor([True, True, False, False])}
    cm = {0: torch.zeros(96, dtype=torch.bool)}
    cm[0][:10] = True
    with apply_masks(model, hm, cm) as handle:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        o_grad = ad.o_proj(ad.layers[0]).weight.grad
        assert o_grad[:, 32:].abs().sum() == 0 and o_grad[:, :32].abs().sum() > 0
        d_grad = ad.ffn_out(ad.layers[0]).weight.grad
        assert d_grad[:, 10:].abs().sum() == 0 and d_grad[:, :10].abs().sum() > 0
        # masks are live: editing them in place changes the next forward
        handle.channel_masks[0][:] = True
        model.zero_grad()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        assert ad.ffn_out(ad.layers[0]).weight.grad[:, 10:].abs().sum() > 0
