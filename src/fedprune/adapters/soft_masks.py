"""Soft masks: zero attention heads and FFN channels without removing them.

A forward pre-hook multiplies the input of ``o_proj`` by the head mask (expanded over
``head_dim``) and the input of ``ffn_out`` (``down_proj`` / ``fc2``) by the channel mask. A
masked unit then contributes exactly nothing, which is the output of the model with that
unit removed (``prune_heads`` / ``prune_ffn_channels`` give the same logits), while the
weights stay in place for training or for changing the mask later. One implementation
serves FedSpine's evolving masks and the federated runtimes' fixed submodels.
"""
from __future__ import annotations

from typing import Mapping

import torch


class SoftMasks:
    """Keep-masks ``{layer: bool[num_heads]}`` and ``{layer: bool[width]}`` attached by hooks.

    Edit :attr:`head_masks` / :attr:`channel_masks` in place to change them (a layer without
    an entry runs unmasked); :meth:`remove` detaches. Usable as a context manager.
    """

    def __init__(self, adapter, head_masks: Mapping[int, torch.Tensor] | None = None,
                 channel_masks: Mapping[int, torch.Tensor] | None = None):
        self.adapter = adapter
        self.head_masks = {int(k): v.bool() for k, v in (head_masks or {}).items()}
        self.channel_masks = {int(k): v.bool() for k, v in (channel_masks or {}).items()}
        self._hooks = []
        hd = adapter.head_dim
        for i, layer in enumerate(adapter.layers):
            self._hooks.append(adapter.o_proj(layer).register_forward_pre_hook(self._make_hook(i, hd, True)))
            self._hooks.append(adapter.ffn_act_input(layer).register_forward_pre_hook(self._make_hook(i, 1, False)))

    def _make_hook(self, i: int, repeat: int, heads: bool):
        def hook(module, args):
            mask = (self.head_masks if heads else self.channel_masks).get(i)
            if mask is None:
                return None
            x = args[0]
            m = mask.to(device=x.device, dtype=x.dtype)
            if repeat > 1:
                m = m.repeat_interleave(repeat)
            return (x * m,) + tuple(args[1:])

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> "SoftMasks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
