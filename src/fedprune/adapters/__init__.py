"""Architecture adapters, one per model family, looked up by ``config.model_type``.

An adapter owns everything architecture-specific: where the layers and projections are,
surgery (remove layers, heads, channels; add a bias), soft masks, the sizes a memory model
needs (``model_shape``), how pruned sizes are written into a config, and a tiny test config.
A new family is one module here plus one entry in the loop below; ``tests/test_adapters.py``
then runs the contract suite on its tiny model.
"""
from __future__ import annotations

from torch import nn

from ..registry import Registry
from .base import DecoderAdapter, LayerPlan, PrunePlan, head_rows
from .shape import ModelShape
from .soft_masks import SoftMasks
from .llama import LlamaAdapter
from .opt import OPTAdapter

ADAPTERS: Registry[type[DecoderAdapter]] = Registry("architecture")
for _cls in (LlamaAdapter, OPTAdapter):
    for _mt in _cls.model_types:
        ADAPTERS.register(_mt, _cls)


def supported_architectures() -> list[str]:
    return ADAPTERS.names()


def get_adapter(model: nn.Module) -> DecoderAdapter:
    """The adapter for ``model`` (by ``model.config.model_type``), with a clear error otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_architectures())}"
        )
    return ADAPTERS.get(model_type)(model)


__all__ = ["DecoderAdapter", "LayerPlan", "PrunePlan", "ModelShape", "SoftMasks", "get_adapter",
           "supported_architectures", "head_rows", "ADAPTERS"]
