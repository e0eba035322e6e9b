"""Run a model with only some of its decoder layers (FedPruner's device submodel).

``only_layers(model, keep)`` swaps the model's layer list for the selected layers, renumbers
their ``layer_idx`` (KV caches index by it) and sets ``config.num_hidden_layers`` (and
``layer_types``), then restores everything on exit (``DecoderAdapter.only_layers``). Skipped layers are not called at all:
the residual stream passes straight from one kept layer to the next. Goes through the
architecture adapter, so it works for every registered family.

``skip_blocks(model, attn=..., mlp=...)`` is the FedPruner+ variant: it bypasses the
attention or the FFN sub-block of chosen layers (the sub-block returns zeros, so the
residual passes through unchanged), leaving the layer's other sub-block running.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from ..adapters import get_adapter


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def only_layers(model: nn.Module, keep: Sequence[int]) -> Iterator[nn.Module]:
    """Within the block, ``model`` runs only decoder layers ``keep`` (original indices, in order)."""
    with get_adapter(_base(model)).only_layers(keep):
        yield model


def _zero_output_hook(module: nn.Module, args, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]),) + tuple(output[1:])
    return torch.zeros_like(output)


class _Bypass(nn.Module):
    """Stands in for a skipped sub-block: returns zeros shaped like its input, computes nothing."""

    def __init__(self, returns_tuple: bool, original: nn.Module | None = None):
        super().__init__()
        self.returns_tuple = returns_tuple
        # kept unregistered (its parameters are not the stub's), so that code reading the
        # layer's structure (adapters, cost counters) still finds q_proj, gate_proj, ...
        object.__setattr__(self, "_original", original)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_original")
            if original is None:
                raise
            return getattr(original, name)

    def forward(self, hidden_states: torch.Tensor | None = None, *args, **kwargs):
        x = hidden_states if hidden_states is not None else args[0]
        z = torch.zeros_like(x)
        return (z, None) if self.returns_tuple else z


def _child_name(parent: nn.Module, child: nn.Module) -> str | None:
    for name, c in parent.named_children():
        if c is child:
            return name
    return None


@contextlib.contextmanager
def skip_blocks(model: nn.Module, attn: Iterable[int] = (), mlp: Iterable[int] = ()) -> Iterator[nn.Module]:
    """Bypass the attention sub-block of layers ``attn`` and the FFN of layers ``mlp``.

    The bypassed sub-block outputs zeros, so ``h + block(norm(h))`` becomes ``h``. Where the
    sub-block is one child module of the layer (LLaMA family) it is swapped for a stub that
    computes nothing (no compute, no saved activations); otherwise (e.g. OPT's inline FFN)
    a forward hook zeroes its output.
    """
    ad = get_adapter(_base(model))
    hooks, swapped = [], []
    try:
        for kind, idxs in (("attn", attn), ("mlp", mlp)):
            for i in idxs:
                layer = ad.layers[int(i)]
                block = ad.attention(layer) if kind == "attn" else ad.mlp(layer)
                name = _child_name(layer, block) if block is not layer else None
                if name is not None:
                    setattr(layer, name, _Bypass(returns_tuple=kind == "attn", original=block))
                    swapped.append((layer, name, block))
                else:
                    target = block if block is not layer else ad.ffn_out(layer)
                    hooks.append(target.register_forward_hook(_zero_output_hook))
        yield model
    finally:
        for h in hooks:
            h.remove()
        for layer, name, block in reversed(swapped):
            setattr(layer, name, block)
