"""LoRAPrune importance: the estimate formula, the LoRA-gradient identities and group sums."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedprune.adapters import get_adapter
from fedprune.fedspine.importance import (ImportanceEMA, ffn_channel_importance, head_importance,
                                          layer_unit_importance, lora_element_importance,
                                          lora_weight_grad_estimate, update_model_importance)
from fedprune.models.tiny import tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_setup(seed=0, out=6, inp=5, r=3, s=2.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    A = torch.randn(r, inp, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(out, r, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, inp, generator=g, dtype=torch.float64)
    t = torch.randn(7, out, generator=g, dtype=torch.float64)
    loss = ((x @ (W + s * B @ A).T - t) ** 2).sum()
    loss.backward()
    return W, A, B, x, t, s


def test_lora_grads_are_projections_of_the_merged_gradient():
    W, A, B, x, t, s = _lora_setup()
    Wm = (W + s * B.detach() @ A.detach()).requires_grad_()
    ((x @ Wm.T - t) ** 2).sum().backward()
    G_true = Wm.grad
    torch.testing.assert_close(B.grad, s * G_true @ A.detach().T)
    torch.testing.assert_close(A.grad, s * B.detach().T @ G_true)


def test_estimate_equals_minus_merged_change_of_one_sgd_step():
    W, A, B, x, t, s = _lora_setup(seed=1)
    G = lora_weight_grad_estimate(A.detach(), B.detach(), A.grad, B.grad, s)
    before = W + s * B.detach() @ A.detach()
    with torch.no_grad():
        after = W + s * (B - B.grad) @ (A - A.grad)
    torch.testing.assert_close(G, before - after)
    imp = lora_element_importance(W, A, B, A.grad, B.grad, s)
    torch.testing.assert_close(imp, (G * before).abs().float())
    assert imp.shape == W.shape and bool((imp >= 0).all())


def test_head_and_channel_group_sums_match_loops():
    torch.manual_seed(0)
    nh, nkv, hd, H, I = 6, 2, 3, 8, 5
    iq, ik, iv = torch.rand(nh * hd, H), torch.rand(nkv * hd, H), torch.rand(nkv * hd, H)
    io = torch.rand(H, nh * hd)
    per_q, per_kv = head_importance(iq, ik, iv, io, nh, nkv, hd)
    g = nh // nkv
    for h in range(nh):
        grp = h // g
        ref = iq[h * hd:(h + 1) * hd].sum() + io[:, h * hd:(h + 1) * hd].sum()
        ref += (ik[grp * hd:(grp + 1) * hd].sum() + iv[grp * hd:(grp + 1) * hd].sum()) / g
        assert per_q[h] == pytest.approx(float(ref), rel=1e-5)
    # a KV group's score covers all of its q/k/v/o weights
    for grp in range(nkv):
        heads = range(grp * g, (grp + 1) * g)
        ref = sum(float(iq[h * hd:(h + 1) * hd].sum() + io[:, h * hd:(h + 1) * hd].sum()) for h in heads)
        ref += float(ik[grp * hd:(grp + 1) * hd].sum() + iv[grp * hd:(grp + 1) * hd].sum())
        assert per_kv[grp] == pytest.approx(ref, rel=1e-5)
    assert per_q.sum() == pytest.approx(float(iq.sum() + ik.sum() + iv.sum() + io.sum()), rel=1e-5)
    gate, up, down = torch.rand(I, H), torch.rand(I, H), torch.rand(H, I)
    ch = ffn_channel_importance([gate, up], down, I)
    for c in range(I):
        assert ch[c] == pytest.approx(float(gate[c].sum() + up[c].sum() + down[:, c].sum()), rel=1e-5)
    # a module without LoRA contributes nothing
    assert torch.equal(ffn_channel_importance([None, None], None, I), torch.zeros(I))


def test_model_level_importance_on_a_tiny_peft_model(input_ids):
    model = tiny_model("llama")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    out = pm(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    ad = get_adapter(pm.get_base_model())
    layer = ad.layers[1]
    per_q, per_kv, per_c = layer_unit_importance(ad, layer, normalise=False)
    assert per_q.shape == (4,) and per_kv.shape == (2,) and per_c.shape == (96,)
    # brute force for the down projection's contribution to channel 7 plus gate/up rows
    ref = ref_norm = 0.0
    for name, dim in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 0)):
        m = getattr(layer.mlp, name)
        imp = lora_element_importance(m.base_layer.weight, m.lora_A["default"].weight, m.lora_B["default"].weight,
                                      m.lora_A["default"].weight.grad, m.lora_B["default"].weight.grad,
                                      m.scaling["default"])
        ref += float(imp[7].sum() if dim == 1 else imp[:, 7].sum())
        ref_norm += float((imp[7].sum() if dim == 1 else imp[:, 7].sum()) / imp.mean())
    assert per_c[7] == pytest.approx(ref, rel=1e-5)
    # normalised per module: each projection's scores divided by that projection's mean importance
    assert layer_unit_importance(ad, layer)[2][7] == pytest.approx(ref_norm, rel=1e-5)
    ema = ImportanceEMA(0.9)
    first = update_model_importance(pm, ema)
    assert set(first) == {0, 1, 2, 3}
    torch.testing.assert_close(first[1][1], layer_unit_importance(ad, layer)[2])


def test_ema_is_point9_point1():
    ema = ImportanceEMA()
    ema.update("a", torch.tensor([1.0, 0.0]))
    s = ema.update("a", torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(s, torch.tensor([0.9, 0.1]))
    other = ImportanceEMA()
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.get("a"), s)
    with pytest.raises(ValueError):
        ImportanceEMA(1.0)
