"""Turn per-unit scores into keep-sets that respect the architecture, and apply them."""
from __future__ import annotations

import torch

from ..adapters import DecoderAdapter
from .budget import LayerTarget


def choose_heads(adapter: DecoderAdapter, layer, scores: torch.Tensor, target: LayerTarget) -> list[int] | None:
    """Query heads to keep (``None``: keep all).

    GQA: drop the ``heads_per_group`` lowest-scoring query heads of *every* KV group, so all
    kept groups keep the same number of heads. MHA (group size 1): drop the ``groups``
    lowest heads.
    """
    nh, g = adapter.num_heads(layer), adapter.group_size(layer)
    if target.heads_per_group == 0 and target.groups == 0:
        return None
    if g == 1:
        drop = set(torch.argsort(scores)[: target.groups].tolist())
        return [h for h in range(nh) if h not in drop]
    keep: list[int] = []
    for grp in range(nh // g):
        heads = list(range(grp * g, (grp + 1) * g))
        order = sorted(heads, key=lambda h: float(scores[h]))
        keep += order[target.heads_per_group:]
    return sorted(keep)


def heads_removed(adapter: DecoderAdapter, layer, target: LayerTarget) -> int:
    return target.heads_per_group * adapter.num_kv_heads(layer) if adapter.group_size(layer) > 1 else target.groups


def apply_scores(adapter: DecoderAdapter, layer_idx: int, target: LayerTarget,
                 head_scores: torch.Tensor | None, channel_scores: torch.Tensor | None) -> dict:
    """Remove the lowest-scoring heads and channels of one layer as ``target`` says."""
    layer = adapter.layers[layer_idx]
    out = {}
    if head_scores is not None:
        keep = choose_heads(adapter, layer, head_scores, target)
        if keep is not None:
            adapter.prune_heads(layer_idx, keep)
            out["heads_kept"] = keep
    if channel_scores is not None and target.channels:
        drop = set(torch.argsort(channel_scores)[: target.channels].tolist())
        keep = [c for c in range(len(channel_scores)) if c not in drop]
        adapter.prune_ffn_channels(layer_idx, keep)
        out["channels_kept"] = len(keep)
    return out
