"""Cost model: training FLOPs of a (sub)model and bytes of a payload. Pure functions."""
from __future__ import annotations

from typing import Mapping

import torch


def train_flops(params_through: int, tokens: int, trainable_params: int = 0) -> float:
    """FLOPs of one forward + backward pass over ``tokens`` tokens.

    ``6 * (params_through + trainable_params) * tokens``: the usual estimate of 2 FLOPs per
    parameter per token forward and 4 backward. ``params_through`` counts the frozen matmul
    weights the tokens actually flow through (skipped layers and pruned heads/channels
    excluded, embedding lookup excluded, LM head included); ``trainable_params`` the LoRA
    weights. With a frozen base the weight-gradient half of the backward of the base is
    not needed, so this is a conservative (upper) estimate, ~1.5x the strict minimum.
    """
    if params_through < 0 or tokens < 0 or trainable_params < 0:
        raise ValueError("train_flops: counts must be non-negative")
    return 6.0 * float(params_through + trainable_params) * float(tokens)


def payload_bytes(state: Mapping[str, torch.Tensor] | None) -> int:
    """Bytes of a dict of tensors on the wire (raw element bytes; keys and framing ignored)."""
    if not state:
        return 0
    return int(sum(t.numel() * t.element_size() for t in state.values()))
