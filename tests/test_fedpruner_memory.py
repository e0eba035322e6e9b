"""Memory model: hand-checked components, exact saved-activation count, budget inversion."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedprune.fedpruner.memory import (LLAMA_TARGETS, ModelShape, TrainSetup, block_costs, layer_activation_bytes,
                                       lora_params_per_layer, max_layers_for_budget, saved_tensor_bytes,
                                       training_memory)
from fedprune.fedpruner.submodel import only_layers
from fedprune.models.tiny import tiny_model

SMOL = ModelShape(hidden=576, intermediate=1536, num_heads=9, num_kv_heads=3, vocab=49152, num_layers=30,
                  tied_embeddings=True, head_dim=64)


def test_component_counts_by_hand():
    setup = TrainSetup(seq_len=256, batch_size=2, lora_rank=8)
    # LoRA: r * sum(in + out) = 8 * [(576+576) + 2 (576+192) + (576+576) + 2 (576+1536) + (1536+576)]
    assert lora_params_per_layer(SMOL, 8) == 8 * (1152 + 2 * 768 + 1152 + 3 * 2112)
    mb = training_memory(SMOL, setup, 10)
    assert mb.per_layer["weights"] == 4 * (576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576)
    assert mb.per_layer["lora_state"] == 4 * 4 * lora_params_per_layer(SMOL, 8)  # param, grad, 2 AdamW states
    assert mb.embed_head == 4 * (49152 * 576 + 576)  # tied: one matrix
    assert mb.transient == 4 * 4 * 512 * 49152  # logits + log-softmax + 2 grads, float32
    assert mb.total == mb.embed_head + 10 * sum(mb.per_layer.values()) + mb.transient
    untied = ModelShape(**{**SMOL.__dict__, "tied_embeddings": False})
    assert training_memory(untied, setup, 10).embed_head - mb.embed_head == 4 * 49152 * 576
    # full parameter count of SmolLM2-135M (134.5M) from the same formulas
    n_params = (training_memory(SMOL, setup, 30).embed_head + 30 * mb.per_layer["weights"]) // 4
    assert n_params == 134_515_008
    bf16 = TrainSetup(seq_len=256, batch_size=2, lora_rank=8, dtype="bf16")
    assert training_memory(SMOL, bf16, 1).per_layer["weights"] * 2 == mb.per_layer["weights"]


@pytest.mark.parametrize("B,T,r,targets", [(2, 16, 4, LLAMA_TARGETS), (1, 32, 8, LLAMA_TARGETS),
                                           (2, 8, 2, ("q_proj", "v_proj", "down_proj"))])
def test_activation_formula_equals_counted_saved_tensors(B, T, r, targets):
    """Count every tensor autograd saves (distinct storages, parameters excluded) per middle layer."""
    model = tiny_model("llama", num_hidden_layers=4)
    model.train()
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    ids = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(0))
    params = list(pm.parameters())

    def saved(k):
        with only_layers(pm, list(range(k))):
            return saved_tensor_bytes(lambda: pm(input_ids=ids, labels=ids), params)

    per_layer = saved(3) - saved(2)
    setup = TrainSetup(seq_len=T, batch_size=B, lora_rank=r, lora_targets=tuple(targets))
    assert per_layer == layer_activation_bytes(ModelShape.from_config(model.config), setup)


def test_max_layers_fits_and_is_monotone():
    setup = TrainSetup(seq_len=256, batch_size=1, lora_rank=8, fixed_overhead_bytes=50 * 2**20)
    prev = 0
    for mib in range(0, 3000, 7):
        budget = mib * 2**20
        K = max_layers_for_budget(budget, SMOL, setup)
        assert 0 <= K <= 30
        assert K >= prev  # monotone in the budget
        if K > 0:
            assert training_memory(SMOL, setup, K).total <= budget
        if K < 30:
            assert training_memory(SMOL, setup, K + 1).total > budget  # largest that fits
        prev = K
    assert max_layers_for_budget(0, SMOL, setup) == 0
    assert max_layers_for_budget(1e15, SMOL, setup) == 30
    # exactly at a boundary
    t5 = training_memory(SMOL, setup, 5).total
    assert max_layers_for_budget(t5, SMOL, setup) == 5
    assert max_layers_for_budget(t5 - 1, SMOL, setup) == 4


def test_more_expensive_setups_fit_fewer_layers():
    budget = 0.8 * 2**30
    base = TrainSetup(seq_len=256, batch_size=1, lora_rank=8)
    k = max_layers_for_budget(budget, SMOL, base)
    assert 0 < k < 30
    assert max_layers_for_budget(budget, SMOL, TrainSetup(seq_len=512, batch_size=2, lora_rank=8)) < k
    assert max_layers_for_budget(budget, SMOL, TrainSetup(seq_len=256, batch_size=1, lora_rank=8,
                                                          dtype="bf16", lora_dtype="float32")) > k
    eager = TrainSetup(seq_len=256, batch_size=1, lora_rank=8, attention="eager")
    assert layer_activation_bytes(SMOL, eager) > layer_activation_bytes(SMOL, base)


def test_block_costs_split_a_layer():
    setup = TrainSetup(seq_len=256, batch_size=1, lora_rank=8)
    c = block_costs(SMOL, setup)
    assert c["attn"] + c["mlp"] == sum(training_memory(SMOL, setup, 1).per_layer.values())
    assert c["mlp"] > c["attn"] > 0  # SmolLM2's FFN is the larger half


def test_bad_setups_are_refused():
    with pytest.raises(ValueError, match="optimizer"):
        TrainSetup(optimizer="lion")
    with pytest.raises(ValueError, match="LoRA targets"):
        TrainSetup(lora_targets=("qkv",))
    with pytest.raises(ValueError):
        ModelShape(hidden=64, intermediate=96, num_heads=4, num_kv_heads=3, vocab=10, num_layers=2)
    with pytest.raises(ValueError):
        training_memory(SMOL, TrainSetup(), 31)


def test_eager_attention_formula_equals_counted_saved_tensors():
    B, T, r = 2, 16, 4
    model = tiny_model("llama", num_hidden_layers=4)
    model.config._attn_implementation = "eager"
    model.train()
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(LLAMA_TARGETS)))
    ids = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(0))
    params = list(pm.parameters())

    def saved(k):
        with only_layers(pm, list(range(k))):
            return saved_tensor_bytes(lambda: pm(input_ids=ids, labels=ids), params)

    setup = TrainSetup(seq_len=T, batch_size=B, lora_rank=r, attention="eager")
    assert saved(3) - saved(2) == layer_activation_bytes(ModelShape.from_config(model.config), setup)
