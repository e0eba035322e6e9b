"""Keep-masks for attention heads and FFN channels: choose, apply (soft), materialise (hard).

Choosing (pure): scores + a pruning ratio ``p`` -> boolean keep-masks for one layer that

- are valid for grouped-query attention: every kept KV group keeps the same number ``j``
  of query heads (``repeat_kv`` needs it); a KV group with no kept head is dropped;
- fit a parameter budget: kept attention + FFN parameters <= ``(1 - p)`` x the layer's.
  Parameters per unit (``H`` hidden, ``d`` head dim): a query head ``2 d H`` (q rows, o
  columns), a KV group ``2 d H`` (k, v rows), an FFN channel ``3 H`` (gate, up rows +
  down column; ``2 H`` for fc1/fc2). Heads take ``(1 - p)`` of the attention budget with
  the largest valid (groups ``m`` x heads ``j``) that fits, best total score first; FFN
  channels then fill what is left of the layer budget;
- are monotone when ``prev`` masks are given (iterative pruning never revives a unit).

Applying (soft): the adapters' soft masks (forward pre-hooks multiply the input of ``o_proj``
by the head mask, expanded over ``head_dim``, and the input of ``down_proj`` by the channel
mask), so a pruned unit contributes exactly nothing and training of the rest continues.

Materialising (hard): ``prune_to_masks`` calls the adapter surgery; the pruned model's
logits equal the masked model's.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from ..adapters.soft_masks import SoftMasks


def attention_params(n_q: int, n_kv: int, head_dim: int, hidden: int) -> int:
    """Weights of q/k/v/o for ``n_q`` query heads and ``n_kv`` KV heads (biases ignored)."""
    return 2 * n_q * head_dim * hidden + 2 * n_kv * head_dim * hidden


def ffn_params(width: int, hidden: int, gated: bool = True) -> int:
    return (3 if gated else 2) * width * hidden


def gqa_head_keep_mask(scores: torch.Tensor, num_kv_heads: int, max_params: float, head_dim: int,
                       hidden: int, prev: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean keep-mask ``[num_heads]``: the GQA-valid head set with the most parameters within
    ``max_params`` (ties: highest summed score). Always keeps at least one head."""
    nh = scores.numel()
    g = nh // num_kv_heads
    if g * num_kv_heads != nh:
        raise ValueError(f"{nh} heads are not divisible into {num_kv_heads} KV groups")
    eligible = torch.ones(nh, dtype=torch.bool) if prev is None else prev.bool().clone()
    s = scores.detach().float().reshape(num_kv_heads, g).clone()
    s[~eligible.reshape(num_kv_heads, g)] = -math.inf
    n_elig = eligible.reshape(num_kv_heads, g).sum(dim=1)
    best: tuple[int, float, int, int] | None = None  # (params, score, m, j)
    for j in range(1, g + 1):
        top = s.topk(j, dim=1).values.sum(dim=1)  # best j heads of each group
        ok = n_elig >= j
        for m in range(1, int(ok.sum()) + 1):
            cost = attention_params(m * j, m, head_dim, hidden)
            if cost > max_params and not (m == 1 and j == 1):
                continue
            score = float(top[ok].topk(m).values.sum())
            key = (cost if cost <= max_params else -1, score, m, j)
            if best is None or key[:2] > best[:2]:
                best = key
    if best is None:
        raise ValueError("no eligible head left to keep (all heads masked in prev)")
    _, _, m, j = best
    top = s.topk(j, dim=1)
    group_score = torch.where(n_elig >= j, top.values.sum(dim=1), torch.tensor(-math.inf))
    mask = torch.zeros(num_kv_heads, g, dtype=torch.bool)
    for grp in group_score.topk(m).indices.tolist():
        mask[grp, top.indices[grp]] = True
    return mask.reshape(nh)


def layer_keep_masks(head_scores: torch.Tensor, channel_scores: torch.Tensor, num_kv_heads: int,
                     head_dim: int, hidden: int, ratio: float, gated: bool = True,
                     prev_heads: torch.Tensor | None = None,
                     prev_channels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-masks ``([num_heads], [width])`` for pruning ratio ``ratio`` of one layer (module doc).

    Kept parameters never exceed ``(1 - ratio)`` of the layer's attention+FFN parameters,
    except that one head and one channel are always kept.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must lie in [0, 1), got {ratio}")
    nh, width = head_scores.numel(), channel_scores.numel()
    attn_total = attention_params(nh, num_kv_heads, head_dim, hidden)
    total = attn_total + ffn_params(width, hidden, gated)
    budget = (1.0 - ratio) * total
    heads = gqa_head_keep_mask(head_scores, num_kv_heads, (1.0 - ratio) * attn_total, head_dim, hidden, prev_heads)
    n_q = int(heads.sum())
    n_kv = int(heads.reshape(num_kv_heads, -1).any(dim=1).sum())
    left = budget - attention_params(n_q, n_kv, head_dim, hidden)
    eligible = torch.ones(width, dtype=torch.bool) if prev_channels is None else prev_channels.bool()
    n_ch = int(min(max(math.floor(left / ffn_params(1, hidden, gated) + 1e-9), 1), int(eligible.sum())))
    cs = channel_scores.detach().float().clone()
    cs[~eligible] = -math.inf
    channels = torch.zeros(width, dtype=torch.bool)
    channels[cs.topk(n_ch).indices] = True
    return heads, channels


def protected_layer_ratio(layer_params: Sequence[int], protect: Sequence[int], ratio: float,
                          max_ratio: float = 0.95) -> float:
    """The ratio every unprotected layer takes so that the whole model loses ``ratio`` of its
    parameters while the ``protect``-ed layers keep all theirs: ``ratio * total / unprotected``,
    capped at ``max_ratio`` (a model cannot reach its target by emptying the layers it may prune)."""
    total = sum(layer_params)
    free = total - sum(layer_params[i] for i in set(protect))
    if free <= 0:
        return 0.0
    return float(min(ratio * total / free, max_ratio))


def resolve_layers(indices: Sequence[int], num_layers: int) -> set[int]:
    """Layer indices with Python's negative indexing (``-1`` = the last layer); out of range refused."""
    out = set()
    for i in indices:
        if not -num_layers <= int(i) < num_layers:
            raise ValueError(f"protect_layers: layer {i} does not exist in a model of {num_layers} layers")
        out.add(int(i) % num_layers)
    return out


def model_keep_masks(model: nn.Module, head_scores: Mapping[int, torch.Tensor],
                     channel_scores: Mapping[int, torch.Tensor], ratio: float,
                     prev: tuple[Mapping[int, torch.Tensor], Mapping[int, torch.Tensor]] | None = None,
                     protect: Sequence[int] = (),
                     ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per-layer masks with the same ratio in every layer (``layer_keep_masks`` per layer).

    ``protect``: layers that keep every unit (``-1`` = the last); the others then take the higher
    ratio of :func:`protected_layer_ratio`, so the model's sparsity still reaches ``ratio``.
    """
    from ..adapters import get_adapter

    ad = get_adapter(model)
    keep_all = resolve_layers(protect, len(ad.layers))
    sizes = [attention_params(ad.num_heads(l), ad.num_kv_heads(l), ad.head_dim, ad.hidden_size)
             + ffn_params(ad.ffn_out(l).in_features, ad.hidden_size, ad.gated_ffn) for l in ad.layers]
    layer_ratio = protected_layer_ratio(sizes, sorted(keep_all), ratio) if keep_all else ratio
    hm, cm = {}, {}
    for i, layer in enumerate(ad.layers):
        ph = prev[0].get(i) if prev else None
        pc = prev[1].get(i) if prev else None
        if i in keep_all:  # untouched (a unit pruned earlier stays pruned: masks only grow)
            hm[i] = (ph.bool().clone() if ph is not None else torch.ones(ad.num_heads(layer), dtype=torch.bool))
            cm[i] = (pc.bool().clone() if pc is not None else torch.ones(ad.ffn_out(layer).in_features,
                                                                         dtype=torch.bool))
            continue
        hm[i], cm[i] = layer_keep_masks(head_scores[i], channel_scores[i], ad.num_kv_heads(layer), ad.head_dim,
                                        ad.hidden_size, layer_ratio, ad.gated_ffn, ph, pc)
    return hm, cm


def check_gqa_valid(head_mask: torch.Tensor, num_kv_heads: int) -> None:
    """Raise ``ValueError`` unless every KV group keeps 0 or the same ``j > 0`` query heads."""
    counts = head_mask.reshape(num_kv_heads, -1).sum(dim=1)
    nz = counts[counts > 0]
    if nz.numel() == 0 or bool((nz != nz[0]).any()):
        raise ValueError(f"head mask is not GQA-valid: kept heads per KV group = {counts.tolist()}")


class MaskHandle(SoftMasks):
    """Soft masks attached to a model (:class:`fedprune.adapters.SoftMasks`, through its adapter);
    edit ``head_masks`` / ``channel_masks`` in place to change them, ``remove()`` to detach."""

    def __init__(self, model: nn.Module, head_masks: Mapping[int, torch.Tensor],
                 channel_masks: Mapping[int, torch.Tensor]):
        from ..adapters import get_adapter

        super().__init__(get_adapter(model), head_masks, channel_masks)


def apply_masks(model: nn.Module, head_masks: Mapping[int, torch.Tensor],
                channel_masks: Mapping[int, torch.Tensor]) -> MaskHandle:
    """Attach soft keep-masks ``{layer: bool[num_heads]}``, ``{layer: bool[width]}`` (module doc)."""
    return MaskHandle(model, head_masks, channel_masks)


def prune_to_masks(model: nn.Module, head_masks: Mapping[int, torch.Tensor],
                   channel_masks: Mapping[int, torch.Tensor]) -> nn.Module:
    """Physically remove masked heads/channels with the adapter surgery (in place; returns ``model``).

    ``model`` must be a plain model (merge LoRA first, e.g. peft ``merge_and_unload``) with no
    soft masks attached; its logits then equal those of the soft-masked model.
    """
    from ..adapters import get_adapter

    ad = get_adapter(model)
    for i, layer in enumerate(ad.layers):
        if i in head_masks:
            check_gqa_valid(head_masks[i].bool(), ad.num_kv_heads(layer))
            ad.prune_heads(i, torch.nonzero(head_masks[i].bool()).flatten().tolist())
        if i in channel_masks:
            keep = torch.nonzero(channel_masks[i].bool()).flatten().tolist()
            ad.prune_ffn_channels(i, keep)
    return model
