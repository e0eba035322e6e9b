"""Tiny random models of every supported family, built from configs (for tests and docs)."""
from __future__ import annotations

import torch

TINY_ARCHS = ("llama", "mistral", "qwen2", "opt")


def tiny_config(arch: str = "llama", **overrides):
    from transformers import AutoConfig

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=256)
    if arch in ("llama", "mistral", "qwen2"):
        kw = dict(common, intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=arch == "llama",
                  head_dim=16)
        if arch == "qwen2":
            kw.update(use_sliding_window=False)
        if arch == "mistral":
            kw.update(sliding_window=None)
    elif arch == "opt":
        kw = dict(common, ffn_dim=96, word_embed_proj_dim=64, do_layer_norm_before=True, enable_bias=True,
                  pad_token_id=1, bos_token_id=2, eos_token_id=2)
    else:
        raise ValueError(f"no tiny config for {arch!r}; have {TINY_ARCHS}")
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    # Random init leaves norms at 1 and biases at 0; perturb them so tests see them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    return model
