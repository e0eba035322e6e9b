"""Train a *submodel* of the shared base without copying it: a subset of layers, and
attention-head / FFN-channel masks.

- Layer subset: the decoder's layer list is swapped for the kept layers for the duration of
  the context (the others are skipped in the forward pass, as FedPruner's devices do;
  ``DecoderAdapter.only_layers``).
- Head mask ``{layer: bool[num_heads]}``: the input of ``o_proj`` is zeroed for masked heads,
  which is exactly the output of a model with those heads removed.
- Channel mask ``{layer: bool[intermediate]}``: the input of ``down_proj`` (fc2) is zeroed for
  masked channels, likewise (both: ``DecoderAdapter.soft_masks``).

:func:`lora_masks` translates unit masks into the rows/columns of LoRA tensors a client
really holds, for count-based averaging.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import torch

from .aggregators import A_SUFFIX, B_SUFFIX


@contextlib.contextmanager
def submodel(adapter, layers: Sequence[int] | None = None, head_masks: Mapping[int, torch.Tensor] | None = None,
             channel_masks: Mapping[int, torch.Tensor] | None = None) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if head_masks or channel_masks:
            stack.enter_context(adapter.soft_masks(head_masks, channel_masks))
        if layers is not None:
            stack.enter_context(adapter.only_layers(layers))
        yield


def lora_masks(adapter, keys: Sequence[str], head_masks: Mapping[int, torch.Tensor] | None,
               channel_masks: Mapping[int, torch.Tensor] | None) -> dict[str, dict[int, torch.Tensor]]:
    """Which rows/columns of each LoRA tensor a masked client holds: ``{tensor key: {dim: bool}}``.

    q: B rows of kept heads; k/v: B rows of KV groups with a kept head; o: A columns of kept heads;
    gate/up (fc1): B rows of kept channels; down (fc2): A columns of kept channels.
    """
    out: dict[str, dict[int, torch.Tensor]] = {}
    hd = adapter.head_dim
    for key in keys:
        i = int(key.split(".")[1])
        role = key.rsplit(".", 1)[-1]
        layer = adapter.layers[i]
        hm = (head_masks or {}).get(i)
        cm = (channel_masks or {}).get(i)
        if hm is not None and role in ("q_proj", "k_proj", "v_proj", "o_proj"):
            hm = hm.bool()
            if role in ("k_proj", "v_proj"):
                g = adapter.group_size(layer)
                hm = hm.view(-1, g).any(dim=1)
            rows = hm.repeat_interleave(hd)
            if role == "o_proj":
                out[key + A_SUFFIX] = {1: rows}
            else:
                out[key + B_SUFFIX] = {0: rows}
        if cm is not None and role in ("gate_proj", "up_proj", "fc1", "down_proj", "fc2"):
            if role in ("down_proj", "fc2"):
                out[key + A_SUFFIX] = {1: cm.bool()}
            else:
                out[key + B_SUFFIX] = {0: cm.bool()}
    return out
