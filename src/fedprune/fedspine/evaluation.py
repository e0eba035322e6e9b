"""What FedSpine deploys, evaluated: each device's pruned model, not the dense global one.

FedSpine's output is the pruned model each device keeps (the frozen base plus the global LoRA,
under that device's masks), so its time to target is measured on those models: the data-weighted
mean held-out loss of the devices' deployed models. Scoring the global LoRA merged into the
*unpruned* base would rate a model nobody runs.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..federated.evaluation import heldout_loss, merged_delta, spread_subset

UnitMasks = tuple[Mapping[int, torch.Tensor], Mapping[int, torch.Tensor]]


def _key(masks: UnitMasks) -> tuple:
    hm, cm = masks
    return (tuple((i, tuple(hm[i].bool().tolist())) for i in sorted(hm)),
            tuple((i, tuple(cm[i].bool().tolist())) for i in sorted(cm)))


@torch.no_grad()
def deployed_heldout_loss(base, tokenizer, records: Sequence[dict], seq_len: int, batch_size: int,
                          base_delta: Mapping[str, torch.Tensor], eval_delta: Mapping[str, torch.Tensor],
                          device_masks: Mapping[int, UnitMasks], weights: Mapping[int, float],
                          loss_examples: int | None = None) -> dict:
    """Data-weighted mean held-out loss of the devices' deployed models.

    ``base``: the shared base (``federated.lora.SharedBaseModel``); each device ``cid`` in
    ``device_masks`` deploys ``W0 + base_delta + eval_delta`` (LoRA off) under its unit masks
    ``({layer: bool[heads]}, {layer: bool[channels]})`` (soft masks: logits equal the physically
    pruned model's, ``fedspine.export``); ``weights[cid]``: its data size. Devices with identical
    masks are evaluated once. Returns ``{"deployed_loss", "per_device": {cid: loss}, "devices"}``;
    leaves the base at ``W0 + base_delta``.
    """
    from .masks import apply_masks

    if not device_masks:
        raise ValueError("deployed_heldout_loss: no device masks given")
    missing = [c for c in device_masks if c not in weights]
    if missing:
        raise ValueError(f"deployed_heldout_loss: no data weight for device(s) {missing}")
    recs = spread_subset(records, loss_examples) if loss_examples else list(records)
    base.set_base_delta(merged_delta(base_delta, eval_delta))
    base.model.eval()
    cache: dict[tuple, float] = {}
    per_device: dict[int, float] = {}
    try:
        with base.lora_disabled():
            for cid, masks in sorted(device_masks.items()):
                k = _key(masks)
                if k not in cache:
                    with apply_masks(base.model, *masks):
                        cache[k] = heldout_loss(base, tokenizer, recs, seq_len, batch_size)["test_loss"]
                per_device[cid] = cache[k]
    finally:
        base.set_base_delta(base_delta)
    total = sum(float(weights[c]) for c in per_device)
    if total <= 0:
        raise ValueError("deployed_heldout_loss: the devices' data weights sum to 0")
    mean = sum(float(weights[c]) * loss for c, loss in per_device.items()) / total
    return {"deployed_loss": mean, "per_device": per_device, "devices": len(per_device)}
