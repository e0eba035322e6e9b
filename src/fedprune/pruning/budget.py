"""Parameter accounting: how many layers, heads and channels to remove for a target ratio.

The ratio is a fraction of the model's *total* parameters (embeddings and head counted
in the denominator, tied embeddings once), as LLM-Pruner and FLAP report it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..adapters import DecoderAdapter
from .width import block_scores, gqa_head_counts, head_multiple, round_channel_removals, round_heads


def check_ratio(ratio: float) -> float:
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"pruning ratio must be in (0, 1), got {ratio!r}")
    return float(ratio)


def module_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def channel_cost(adapter: DecoderAdapter, layer: nn.Module) -> int:
    """Parameters removed with one FFN channel: a row (+bias) of each input projection and a column of the output."""
    cost = sum(lin.in_features + (1 if lin.bias is not None else 0) for lin in adapter.ffn_in(layer))
    return cost + adapter.ffn_out(layer).out_features


def query_head_cost(adapter: DecoderAdapter, layer: nn.Module) -> int:
    q = adapter.qkv(layer)[0]
    hd = adapter.head_dim
    return hd * q.in_features + (hd if q.bias is not None else 0) + hd * adapter.o_proj(layer).out_features


def kv_head_cost(adapter: DecoderAdapter, layer: nn.Module) -> int:
    _, k, v = adapter.qkv(layer)
    hd = adapter.head_dim
    return sum(hd * lin.in_features + (hd if lin.bias is not None else 0) for lin in (k, v))


@dataclass
class LayerTarget:
    """How many units to remove from one layer."""

    heads_per_group: int  # query heads removed from every KV group
    groups: int  # whole KV groups removed (with their query heads)
    channels: int  # FFN channels removed


def head_params_removed(adapter: DecoderAdapter, layer: nn.Module, target: LayerTarget) -> int:
    """Parameters ``target``'s heads take from ``layer``: query heads with their ``o_proj`` columns, whole
    KV groups with their key and value heads too."""
    q = query_head_cost(adapter, layer)
    return (target.heads_per_group * adapter.num_kv_heads(layer) * q
            + target.groups * (q + kv_head_cost(adapter, layer)))


def importance_weights(importance: list[float], strength: float) -> list[float]:
    """Relative pruning weight of each layer from an importance score (higher = keep more).

    ``w_l = exp(-strength * z_l)`` with ``z_l`` the z-score of the importance over the
    layers, so a layer one standard deviation more important than average is pruned
    ``exp(strength)`` times less. ``strength = 0`` gives uniform weights.
    """
    if strength < 0:
        raise ValueError(f"allocation strength must be >= 0, got {strength}")
    n = len(importance)
    if n == 0:
        return []
    mean = sum(importance) / n
    std = (sum((v - mean) ** 2 for v in importance) / n) ** 0.5
    if strength == 0 or std == 0:
        return [1.0] * n
    return [math.exp(-strength * (v - mean) / std) for v in importance]


def allocate(total: float, sizes: list[float], weights: list[float], cap: float | list[float]) -> list[float]:
    """Split ``total`` removed parameters over layers of ``sizes`` prunable parameters.

    Layer ``l`` gets ``total * w_l s_l / sum(w s)`` (weighted in proportion to its size), but
    never more than ``cap_l * s_l`` (``cap``: one fraction, or one per layer); the excess is
    water-filled over the uncapped layers. The shares sum to ``total`` (raises if even the
    caps everywhere cannot absorb it).
    """
    caps = [float(cap)] * len(sizes) if isinstance(cap, (int, float)) else [float(c) for c in cap]
    room = sum(c * s for c, s in zip(caps, sizes))
    if total > room * (1 + 1e-9):
        raise ValueError(f"cannot remove {total:.0f} parameters: the layers' caps leave room for "
                         f"{room:.0f} of their {sum(sizes):.0f} prunable parameters; remove more whole layers instead")
    shares = [0.0] * len(sizes)
    free = set(range(len(sizes)))
    left = total
    while free and left > 1e-9:
        norm = sum(weights[i] * sizes[i] for i in free)
        capped = [i for i in free if left * weights[i] * sizes[i] / norm >= caps[i] * sizes[i]]
        if not capped:
            for i in free:
                shares[i] = left * weights[i] * sizes[i] / norm
            break
        for i in capped:
            shares[i] = caps[i] * sizes[i]
            left -= shares[i]
            free.discard(i)
    return shares


def _removable(adapter: DecoderAdapter, layer: nn.Module, head_sparsity: float | None, cap: float) -> int:
    """Most parameters one layer can give: all FFN channels but one, plus its heads at ``head_sparsity``
    (``None``: at ``cap``), at least one query head kept per KV group."""
    g, n_kv = adapter.group_size(layer), adapter.num_kv_heads(layer)
    hs = cap if head_sparsity is None else head_sparsity
    heads = 0
    if g > 1:
        heads = min(int(round(hs * g)), g - 1) * n_kv * query_head_cost(adapter, layer)
    else:
        heads = min(int(round(hs * n_kv)), n_kv - 1) * (query_head_cost(adapter, layer) + kv_head_cost(adapter, layer))
    return heads + (adapter.intermediate_size(layer) - 1) * channel_cost(adapter, layer)


def _head_units(adapter: DecoderAdapter, layer: nn.Module, hs: float, width_multiple: int) -> tuple[int, int]:
    """``(query heads removed per KV group, whole groups removed)`` at head sparsity ``hs``: heads go
    evenly from every KV group (at least one kept per group); under multi-head attention every head
    is a group. With ``width_multiple > 1`` the count is rounded so kept heads x head_dim is a
    multiple (``width.round_heads``; left as it is where no count can be)."""
    g, n_kv = adapter.group_size(layer), adapter.num_kv_heads(layer)
    k_h = min(int(round(hs * g)), g - 1) if g > 1 else 0
    k_groups = min(int(round(hs * n_kv)), n_kv - 1) if g == 1 else 0
    if width_multiple > 1:
        counts = gqa_head_counts(adapter.num_heads(layer), n_kv)
        m = head_multiple(width_multiple, adapter.head_dim)
        if g > 1:
            r = round_heads(counts, k_h, m)
            k_h = k_h if r is None else r
        else:
            r = round_heads(counts, k_groups, m)
            k_groups = k_groups if r is None else r
    return k_h, k_groups


def neuron_targets(adapter: DecoderAdapter, layer_ids: list[int], params_to_remove: int,
                   head_sparsity: float | None = None, importance: list[float] | None = None,
                   strength: float = 0.0, cap: float = 0.9, width_multiple: int = 1,
                   channel_scores: list | None = None) -> list[LayerTarget]:
    """Spread ``params_to_remove`` over ``layer_ids`` as heads and FFN channels.

    By default uniformly (the same fraction of every layer); with ``importance`` (one score
    per layer, higher = more important) and ``strength > 0``, less important layers give
    more (``importance_weights`` and ``allocate``; no layer loses more than ``cap`` of its
    prunable parameters). Attention is pruned at the same relative sparsity as the layer's
    share (rounded to whole query heads per KV group) unless ``head_sparsity`` fixes it
    (0 disables head pruning); FFN channels absorb the rest so the total is exact to one
    channel per layer.

    ``width_multiple = N > 1``: kept FFN widths and kept heads x head_dim are made multiples of
    ``N`` (:mod:`.width`); the channels are re-balanced over the layers so the total stays within
    half a block of ``N`` channels of ``params_to_remove``, lower-scored blocks going first when
    ``channel_scores`` (one score tensor per layer of ``layer_ids``, lower = less important) are given.
    """
    if params_to_remove <= 0 or not layer_ids:
        return [LayerTarget(0, 0, 0) for _ in layer_ids]
    layers = [adapter.layers[i] for i in layer_ids]
    sizes = [module_params(adapter.attention(l)) + sum(module_params(x) for x in adapter.ffn_in(l))
             + module_params(adapter.ffn_out(l)) for l in layers]
    if importance is not None and len(importance) != len(layers):
        raise ValueError(f"importance has {len(importance)} scores for {len(layers)} layers")
    weights = importance_weights(importance, strength) if importance is not None else [1.0] * len(layers)
    caps = [min(cap, _removable(adapter, l, head_sparsity, cap) / size) for l, size in zip(layers, sizes)]
    shares = allocate(float(params_to_remove), [float(s) for s in sizes], weights, caps)
    heads = [_head_units(adapter, layer, shares[n] / sizes[n] if head_sparsity is None else head_sparsity,
                         width_multiple) for n, layer in enumerate(layers)]
    head_params = [head_params_removed(adapter, layer, LayerTarget(k_h, k_g, 0)) for (k_h, k_g), layer in zip(heads, layers)]
    if width_multiple > 1:
        return _rounded_channel_targets(adapter, layer_ids, layers, params_to_remove, shares, heads, head_params,
                                        width_multiple, channel_scores)
    targets: list[LayerTarget] = []
    remaining = params_to_remove
    planned = sum(shares)
    for n, layer in enumerate(layers):
        k_h, k_groups = heads[n]
        # this layer's planned share, corrected by what earlier roundings left over
        share = shares[n] + (remaining - planned) / (len(layers) - n)
        planned -= shares[n]
        ch = int(round(max(share - head_params[n], 0) / channel_cost(adapter, layer)))
        width = adapter.intermediate_size(layer)
        if ch >= width:
            raise ValueError(f"ratio too high: layer {layer_ids[n]} would lose all {width} FFN channels; "
                             "remove more whole layers instead (raise the layer fraction)")
        targets.append(LayerTarget(k_h, k_groups, ch))
        remaining -= head_params[n] + ch * channel_cost(adapter, layer)
    return targets


def _rounded_channel_targets(adapter, layer_ids, layers, params_to_remove, shares, heads, head_params, n,
                             channel_scores) -> list[LayerTarget]:
    """``neuron_targets``' channels in whole blocks of ``n`` (``width.round_channel_removals``)."""
    costs = [channel_cost(adapter, l) for l in layers]
    widths = [adapter.intermediate_size(l) for l in layers]
    wanted = [max(s - h, 0) / c for s, h, c in zip(shares, head_params, costs)]
    total = max(params_to_remove - sum(head_params), 0)
    if channel_scores is not None and len(channel_scores) != len(layers):
        raise ValueError(f"channel_scores has {len(channel_scores)} entries for {len(layers)} layers")
    scores = [block_scores(cs, n) for cs in channel_scores] if channel_scores is not None else None
    chans = round_channel_removals(wanted, widths, n, costs, total=total, scores=scores)
    short = total - sum(c * k for c, k in zip(costs, chans))
    if short > n * max(costs) / 2:  # beyond the stated tolerance: say so rather than miss the ratio
        raise ValueError(f"ratio too high for width_multiple={n}: every layer is at its smallest width ({n} FFN "
                         f"channels) and {short:.0f} parameters are still to remove; remove more whole layers "
                         "instead (raise the layer fraction)")
    return [LayerTarget(k_h, k_g, c) for (k_h, k_g), c in zip(heads, chans)]


def layers_for_params(adapter: DecoderAdapter, params_to_remove: float) -> int:
    """Number of whole (average-size) layers closest to ``params_to_remove``."""
    per_layer = sum(module_params(l) for l in adapter.layers) / adapter.num_layers
    return int(round(params_to_remove / per_layer))
