"""Rotary-embedding row layout: Hugging Face LLaMA versus llama.cpp.

Both rotate pairs of coordinates of each head by the same angles; they only disagree on
*which* coordinates form a pair. Hugging Face's ``rotate_half`` pairs coordinate ``i``
with ``i + d/2`` (the first half of the head with the second half). llama.cpp's LLaMA
graph uses "normal" RoPE, which pairs neighbours ``2i`` and ``2i + 1``. So the rows of the
q and k projections must be reordered, per head, so that HF row ``i`` lands at position
``2i`` and HF row ``i + d/2`` at ``2i + 1``. Attention scores are unchanged because q and k
receive the same reordering (a permutation inside each head preserves ``q . k``).
"""
from __future__ import annotations

import torch


def rotary_row_order(head_dim: int) -> torch.Tensor:
    """For one head: ``order[j]`` is the HF row that goes to llama.cpp row ``j``.

    ``head_dim=4`` gives ``[0, 2, 1, 3]``: pairs (0, 2) and (1, 3) become neighbours.
    """
    if head_dim % 2:
        raise ValueError(f"rotary head_dim must be even, got {head_dim}")
    half = head_dim // 2
    i = torch.arange(half)
    # position 2i <- row i (first half), position 2i+1 <- row i + half (second half)
    return torch.stack([i, i + half], dim=1).reshape(-1)


def to_llamacpp_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection ``[n_heads * head_dim, in]`` (or a bias ``[n_heads * head_dim]``)."""
    rows = weight.shape[0]
    if rows % n_heads:
        raise ValueError(f"{rows} rows do not split into {n_heads} heads")
    head_dim = rows // n_heads
    order = rotary_row_order(head_dim)
    idx = (torch.arange(n_heads)[:, None] * head_dim + order[None, :]).reshape(-1)
    return weight.index_select(0, idx.to(weight.device))
