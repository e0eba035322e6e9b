"""Tiny random models of every supported family, built from configs (for tests and docs).

The configs live with the adapters (``DecoderAdapter.tiny_config``): a new family brings its
own, and every test parametrized over :data:`TINY_ARCHS` runs on it.
"""
from __future__ import annotations

import torch

from ..adapters import ADAPTERS, supported_architectures

TINY_ARCHS = tuple(supported_architectures())
"""every registered family (``model_type``); each adapter brings its own tiny config"""


def tiny_config(arch: str = "llama", **overrides):
    """The tiny config of family ``arch`` (``DecoderAdapter.tiny_config``), with ``overrides``."""
    if arch not in ADAPTERS:
        raise ValueError(f"no tiny config for {arch!r}; have {TINY_ARCHS}")
    return ADAPTERS.get(arch).tiny_config(arch, **overrides)


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
