"""FedSpine outputs: physically pruned, deployable models.

- ``deployable_model``: ``W0 + (merged deltas)`` as a plain model (LoRA merged), then the
  device's heads/channels removed by the adapter surgery. Its logits equal those of the
  soft-masked model with the same weights (``fedspine.masks.prune_to_masks``).
- ``consensus_masks``: the global pruned model at the fleet's average ratio: a unit's score
  is the fraction of devices that kept it (ties broken by position), then the usual
  GQA-valid, budgeted mask selection.
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch

from .masks import model_keep_masks, prune_to_masks


def plain_model_with_delta(shared_base, delta: Mapping[str, torch.Tensor]):
    """A standalone copy of the shared base with ``W = W0 + delta`` and no LoRA modules.

    ``shared_base`` is a ``federated.lora.SharedBaseModel``; its own weights are restored.
    """
    current = {k: m.base_layer.weight.detach().clone() for k, m in shared_base.modules.items()}
    try:
        shared_base.set_base_delta(delta)
        plain = copy.deepcopy(shared_base.peft).unload()  # drops the LoRA layers without merging them
    finally:
        with torch.no_grad():
            for k, m in shared_base.modules.items():
                m.base_layer.weight.copy_(current[k])
    plain.eval()
    for p in plain.parameters():
        p.requires_grad_(False)
    return plain


def deployable_model(shared_base, delta: Mapping[str, torch.Tensor], head_masks: Mapping[int, torch.Tensor],
                     channel_masks: Mapping[int, torch.Tensor]):
    """Plain model with ``delta`` merged, pruned to the masks (in place on the copy)."""
    model = plain_model_with_delta(shared_base, delta)
    return prune_to_masks(model, head_masks, channel_masks)


def consensus_masks(model, device_masks: Sequence[tuple[Mapping[int, torch.Tensor], Mapping[int, torch.Tensor]]],
                    ratio: float) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Masks at ``ratio`` keeping the units most devices kept (``device_masks``: (heads, channels) each)."""
    if not device_masks:
        raise ValueError("consensus_masks needs at least one device's masks")
    heads, chans = {}, {}
    for i in device_masks[0][0]:
        h = torch.stack([d[0][i].float() for d in device_masks]).mean(dim=0)
        c = torch.stack([d[1][i].float() for d in device_masks]).mean(dim=0)
        # tiny positional tie-breaker keeps the choice deterministic
        heads[i] = h - 1e-6 * torch.arange(h.numel()) / h.numel()
        chans[i] = c - 1e-6 * torch.arange(c.numel()) / c.numel()
    return model_keep_masks(model, heads, chans, ratio)
