"""A FedPruner device's submodel made real: free the weights the device does not hold.

During a federated run every simulated device shares one full base model and *skips* the layers
(or sub-blocks) outside its plan (``fedpruner.submodel``). A real device never receives those
weights. :func:`materialise_submodel` frees them in place, so the process's memory is what the
device would hold (what ``benchmarks/fedpruner`` measures against the memory model), and
training the planned submodel still runs unchanged: skipped modules are never called.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..adapters import get_adapter


def materialise_submodel(model: nn.Module, layers: Iterable[int], skip_attn: Iterable[int] = (),
                         skip_mlp: Iterable[int] = ()) -> int:
    """Free, in place, every parameter of the decoder layers not in ``layers`` (their LoRA too:
    the device never receives it) and the frozen weights of the bypassed attention / FFN
    sub-blocks of kept layers (their LoRA stays: its keys are part of the device's task).

    ``model``: the base model, or a PEFT model wrapping it. Returns the number of parameter
    elements freed. Afterwards only ``only_layers(model, layers)`` with
    ``skip_blocks(model, attn=skip_attn, mlp=skip_mlp)`` may run the model.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ad = get_adapter(base)
    keep, attn, mlp = set(map(int, layers)), set(map(int, skip_attn)), set(map(int, skip_mlp))
    if not keep or not keep <= set(range(ad.num_layers)):
        raise ValueError(f"layers must be a non-empty subset of range({ad.num_layers}), got {sorted(keep)}")
    if not (attn | mlp) <= keep:
        raise ValueError(f"bypassed sub-blocks {sorted((attn | mlp) - keep)} are in layers the device does not hold")
    freed = 0
    with torch.no_grad():
        for i, layer in enumerate(ad.layers):
            drop = [] if i in keep else [layer]
            if i in attn:
                drop.append(ad.attention(layer))
            if i in mlp:
                drop.append(ad.mlp(layer))
            for mod in drop:
                for name, p in mod.named_parameters():
                    if ("lora_" not in name or i not in keep) and p.numel():
                        freed += p.numel()
                        p.data = torch.empty(0, dtype=p.dtype)
    return freed
