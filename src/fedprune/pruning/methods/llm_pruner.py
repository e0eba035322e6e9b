"""LLM-Pruner without recovery training (Ma et al., 2023): first-order Taylor importance of
coupled groups ``I(G) = sum_{w in G} |w * dL/dw|`` from calibration-loss gradients (a full
backward pass: the memory overhead COMP avoids); only layers ``first_layer .. L - last_layer_offset - 1``
are pruned.

Presets (``-o preset=``, :mod:`.presets`): ``project`` prunes those layers at the sparsity that
meets the requested share of *all* parameters (query heads per KV group and channels);
``official`` follows the LLM-Pruner repository's block-wise ``param_first`` Taylor run without
recovery: the ratio ``r`` is each pruned layer's own (local) ratio, every pruned layer losing
``(kv_width - int(kv_width * (1 - r))) // head_dim`` whole KV groups (lowest summed Taylor
score) and ``width - int(width * (1 - r))`` FFN channels (its ``MetaPruner.prune_local``
count: ``r * width`` rounded *up*, e.g. 308 of SmolLM2's 1536 at r = 0.2, not 307), on 10
windows of 64 tokens. The layer range is
the same in both (the defaults ``first_layer=4``, ``last_layer_offset=2`` are the official
``--block_*_layer_start 4 --block_*_layer_end L-2``); since the first, last and embedding
parameters are never pruned, the official preset's achieved ratio is below ``r`` and is
reported as measured, never rebalanced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...adapters import DecoderAdapter
from ...options import require_int
from ..budget import check_ratio, neuron_targets
from ..criteria.units import taylor_scores
from ..selection import apply_scores
from ..width import check_option as check_width_option
from .presets import check_preset
from .wanda_sp import BatchOptions, lowest_channels_kept, lowest_groups


@dataclass
class LlmPrunerOptions(BatchOptions):
    """LLM-Pruner's options: only layers ``first_layer .. L - last_layer_offset - 1`` are pruned."""

    batch_size: int = 4
    """calibration samples per forward/backward pass"""
    first_layer: int = 4
    """first layer pruned (the paper keeps the first four)"""
    last_layer_offset: int = 2
    """layers left unpruned at the end"""
    preset: str = "project"
    """'project' (meet the requested share of all parameters) or 'official' (LLM-Pruner repository: r as each pruned
    layer's own ratio, whole KV groups, 10 x 64 calibration)"""
    width_multiple: int = 1
    """kept FFN widths and kept heads x head_dim multiples of this (32: q4_0/q8_0 blocks, 256: k-quants); 1 = off;
    preset 'project' only"""

    OFFICIAL_CALIBRATION: ClassVar[dict[str, int]] = {"nsamples": 10, "seq_len": 64}

    def __post_init__(self):
        super().__post_init__()
        check_preset(self.preset)
        self.width_multiple = check_width_option(self.width_multiple, self.preset)
        require_int("first_layer", self.first_layer, 0)
        require_int("last_layer_offset", self.last_layer_offset, 0)


def prune_llm_pruner(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, opts: LlmPrunerOptions) -> dict[str, Any]:
    check_ratio(ratio)
    scores = taylor_scores(adapter, ids, opts.batch_size)
    n = adapter.num_layers
    first = min(opts.first_layer, n - 1)
    layer_ids = list(range(first, max(n - opts.last_layer_offset, first + 1)))
    if opts.preset == "official":
        return _prune_official(adapter, scores, layer_ids, ratio)
    targets = neuron_targets(adapter, layer_ids, int(ratio * adapter.num_parameters()),
                             width_multiple=opts.width_multiple,
                             channel_scores=[scores[i][1] for i in layer_ids] if opts.width_multiple > 1 else None)
    report = []
    for i, tgt in zip(layer_ids, targets):
        info = apply_scores(adapter, i, tgt, scores[i][0], scores[i][1])
        report.append({"layer": i, "heads_kept": adapter.num_heads(adapter.layers[i]),
                       "channels_kept": info.get("channels_kept", adapter.intermediate_size(adapter.layers[i]))})
    return {"layers": report, "pruned_layers": layer_ids}


def official_layer_cut(adapter: DecoderAdapter, layer, ratio: float) -> tuple[int, int]:
    """``(KV groups, FFN channels)`` the official code removes from one layer at local ratio ``ratio``
    (at least one group and one channel kept)."""
    hd, n_kv, width = adapter.head_dim, adapter.num_kv_heads(layer), adapter.intermediate_size(layer)
    kv_width = n_kv * hd
    groups = (kv_width - int(kv_width * (1 - ratio))) // hd
    return min(groups, n_kv - 1), min(width - int(width * (1 - ratio)), width - 1)


def _prune_official(adapter: DecoderAdapter, scores, layer_ids: list[int], ratio: float) -> dict[str, Any]:
    report = []
    for i in layer_ids:
        layer = adapter.layers[i]
        groups, channels = official_layer_cut(adapter, layer, ratio)
        if groups:
            adapter.prune_heads(i, lowest_groups(scores[i][0], adapter.num_kv_heads(layer), groups))
        if channels:
            adapter.prune_ffn_channels(i, lowest_channels_kept(scores[i][1], channels))
        report.append({"layer": i, "kv_groups_removed": groups, "heads_kept": adapter.num_heads(layer),
                       "channels_kept": adapter.intermediate_size(layer)})
    return {"layers": report, "pruned_layers": layer_ids, "preset": "official"}
