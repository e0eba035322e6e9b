"""Parameter accounting: how many layers, heads and channels to remove for a target ratio.

The ratio is a fraction of the model's *total* parameters (embeddings and head counted
in the denominator, tied embeddings once), as LLM-Pruner and FLAP report it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..adapters import DecoderAdapter


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


def neuron_targets(adapter: DecoderAdapter, layer_ids: list[int], params_to_remove: int,
                   head_sparsity: float | None = None) -> list[LayerTarget]:
    """Spread ``params_to_remove`` uniformly over ``layer_ids`` as heads and FFN channels.

    Attention is pruned at the same relative sparsity as the whole layer (rounded to whole
    query heads per KV group) unless ``head_sparsity`` fixes it (0 disables head pruning);
    FFN channels absorb the rest so the total is exact to one channel per layer.
    """
    if params_to_remove <= 0 or not layer_ids:
        return [LayerTarget(0, 0, 0) for _ in layer_ids]
    layers = [adapter.layers[i] for i in layer_ids]
    prunable = sum(module_params(adapter.attention(l)) + sum(module_params(x) for x in adapter.ffn_in(l))
                   + module_params(adapter.ffn_out(l)) for l in layers)
    s = params_to_remove / prunable
    targets: list[LayerTarget] = []
    remaining = params_to_remove
    for n, layer in enumerate(layers):
        g = adapter.group_size(layer)
        n_kv = adapter.num_kv_heads(layer)
        hs = s if head_sparsity is None else head_sparsity
        # Heads are removed evenly from every KV group; keep at least one per group.
        k_h = min(int(round(hs * g)), g - 1) if g > 1 else 0
        k_groups = 0
        if g == 1:  # multi-head attention: every head is a group
            k_groups = min(int(round(hs * n_kv)), n_kv - 1)
        head_params = k_h * n_kv * query_head_cost(adapter, layer) + \
            k_groups * (query_head_cost(adapter, layer) + kv_head_cost(adapter, layer))
        share = remaining / (len(layers) - n)
        ch = int(round(max(share - head_params, 0) / channel_cost(adapter, layer)))
        width = adapter.intermediate_size(layer)
        if ch >= width:
            raise ValueError(f"ratio too high: layer {layer_ids[n]} would lose all {width} FFN channels; "
                             "remove more whole layers instead (raise the layer fraction)")
        targets.append(LayerTarget(k_h, k_groups, ch))
        remaining -= head_params + ch * channel_cost(adapter, layer)
    return targets


def layers_for_params(adapter: DecoderAdapter, params_to_remove: float) -> int:
    """Number of whole (average-size) layers closest to ``params_to_remove``."""
    per_layer = sum(module_params(l) for l in adapter.layers) / adapter.num_layers
    return int(round(params_to_remove / per_layer))
