"""Layer importance."""
from __future__ import annotations

import torch


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """Block Influence (ShortGPT): ``BI = 1 - mean_t cos(x_in_t, x_out_t)`` over tokens.

    ``x_in``, ``x_out``: hidden states entering and leaving a block, ``[..., d]``.
    A block that barely rotates its input (BI near 0) can be removed cheaply.
    """
    a = x_in.reshape(-1, x_in.shape[-1]).double()
    b = x_out.reshape(-1, x_out.shape[-1]).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
    return float(1.0 - cos.mean())
