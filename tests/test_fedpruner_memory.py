"""Memory model: hand-checked components, exact saved-activation count, budget inversion."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedprune.fedpruner.memory import (LLAMA_TARGETS, ModelShape, TrainSetup, block_costs, head_transient_bytes,
                                       layer_activation_bytes, lora_params_per_layer, max_layers_for_budget,
                                       saved_tensor_bytes, training_memory, transient_bytes)
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
    # chunked loss (default): one 64-token chunk's log-softmax + 2 grads, float32, + gathered hidden and its grad
    assert mb.transient == 3 * 4 * 64 * 49152 + 2 * 4 * 512 * 576
    assert mb.total == mb.embed_head + 10 * sum(mb.per_layer.values()) + mb.transient
    full = training_memory(SMOL, TrainSetup(seq_len=256, batch_size=2, lora_rank=8, chunked_loss=False), 10)
    assert full.transient == 3 * 4 * 512 * 49152  # full log-softmax + its grad + logits grad, float32
    assert full.total - mb.total == full.transient - mb.transient
    untied = ModelShape(**{**SMOL.__dict__, "tied_embeddings": False})
    assert training_memory(untied, setup, 10).embed_head - mb.embed_head == 4 * 49152 * 576
    # full parameter count of SmolLM2-135M (134.5M) from the same formulas
    n_params = (training_memory(SMOL, setup, 30).embed_head + 30 * mb.per_layer["weights"]) // 4
    assert n_params == 134_515_008
    bf16 = TrainSetup(seq_len=256, batch_size=2, lora_rank=8, dtype="bf16")
    assert training_memory(SMOL, bf16, 1).per_layer["weights"] * 2 == mb.per_layer["weights"]


@pytest.mark.parametrize("B,T,r,targets,dropout", [(2, 16, 4, LLAMA_TARGETS, 0.0), (1, 32, 8, LLAMA_TARGETS, 0.0),
                                                   (2, 8, 2, ("q_proj", "v_proj", "down_proj"), 0.0),
                                                   (2, 16, 4, LLAMA_TARGETS, 0.05),
                                                   (2, 8, 2, ("q_proj", "v_proj", "down_proj"), 0.05)])
def test_activation_formula_equals_counted_saved_tensors(B, T, r, targets, dropout):
    """Count every tensor autograd saves (distinct storages, parameters excluded) per middle layer."""
    model = tiny_model("llama", num_hidden_layers=4)
    model.train()
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=list(targets)))
    ids = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(0))
    params = list(pm.parameters())

    def saved(k):
        with only_layers(pm, list(range(k))):
            return saved_tensor_bytes(lambda: pm(input_ids=ids, labels=ids), params)

    per_layer = saved(3) - saved(2)
    setup = TrainSetup(seq_len=T, batch_size=B, lora_rank=r, lora_targets=tuple(targets), lora_dropout=dropout)
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


def test_chunked_head_modes():
    """Chunked head: transient independent of the sequence beyond the hidden-state term, bounded
    by the chunk; far below the full logits; more layers fit a budget; both modes kept."""
    full = TrainSetup(seq_len=256, batch_size=1, lora_rank=8, chunked_loss=False)
    for chunk in (16, 64, 128):
        ch = TrainSetup(seq_len=256, batch_size=1, lora_rank=8, loss_chunk_tokens=chunk)
        assert head_transient_bytes(SMOL, ch) == 12 * chunk * 49152 + 2 * 4 * 256 * 576
        assert transient_bytes(SMOL, ch) < transient_bytes(SMOL, full)
        assert max_layers_for_budget(0.3 * 2**30, SMOL, ch) > max_layers_for_budget(0.3 * 2**30, SMOL, full)
    # a chunk as large as the batch saves nothing: the full working set + the gathered hidden states
    big = TrainSetup(seq_len=256, batch_size=1, lora_rank=8, loss_chunk_tokens=4096)
    assert head_transient_bytes(SMOL, big) == head_transient_bytes(SMOL, full) + 2 * 4 * 256 * 576
    # bf16: the head's float32 working set is the same, the gathered hidden states are bf16
    bf = TrainSetup(seq_len=256, batch_size=1, lora_rank=8, dtype="bf16")
    assert head_transient_bytes(SMOL, bf) == 12 * 64 * 49152 + 2 * 2 * 256 * 576
    # a tiny vocabulary: one layer's backward dominates
    small_v = ModelShape(**{**SMOL.__dict__, "vocab": 100})
    assert transient_bytes(small_v, TrainSetup()) == 3 * 256 * 1536 * 4
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        TrainSetup(loss_chunk_tokens=0)


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


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_predicted_parameter_count_equals_the_real_model(arch):
    """The memory model's weight terms read the family's sizes from its adapter: an OPT (biases,
    LayerNorms, learned positions, fc1/fc2) is counted as exactly as a LLaMA."""
    model = tiny_model(arch, num_hidden_layers=3)
    shape = ModelShape.from_config(model.config)
    setup = TrainSetup(seq_len=16, lora_rank=2, lora_targets=("q_proj", "v_proj"))
    mb = training_memory(shape, setup, shape.num_layers)
    predicted = (mb.embed_head + mb.layer_weights) // 4  # float32
    assert predicted == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if arch == "opt":
        assert "fc1" in shape.linear_shapes() and "gate_proj" not in shape.linear_shapes()
        with pytest.raises(ValueError, match="not projections of this model"):
            lora_params_per_layer(shape, 2, ("gate_proj",))
