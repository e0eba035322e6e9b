"""Wanda-sp (structured Wanda, as the FLAP paper runs it): heads + FFN channels, uniform per
layer, scored by ``sum_i |W_ij| * ||X_j||_2`` on the output projections' input columns.

Presets (``-o preset=``, :mod:`.presets`):

``project``   heads (a query-head share of every KV group) and channels removed so that the
              requested share of *all* parameters goes, the same share in every layer.
``official``  the FLAP repository's ``prune_wanda_sp``: in every layer the ``int(r * width)``
              lowest FFN channels and the ``int(r * n_kv_groups)`` lowest whole KV groups (a
              group's score: the sum of its query heads'); 128 windows of 128 tokens. Nothing
              rebalances the budget, so the achieved ratio is *below* the request (embeddings
              are never pruned, and attention is pruned in whole groups rounded down: with 3
              KV groups at r = 0.33 no attention is pruned at all); it is reported as measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...adapters import DecoderAdapter
from ...options import require_int
from ..budget import check_ratio
from ..criteria.units import activation_moments, wanda_sp_scores
from ..width import check_option as check_width_option
from ..streamed import finish_layer, load_layer, resumed_layer
from .common import prune_units_uniformly
from .presets import check_preset


@dataclass
class BatchOptions:
    """Options of the methods whose only knob is the calibration batch."""

    batch_size: int = 8
    """calibration samples per forward pass"""

    def __post_init__(self):
        require_int("batch_size", self.batch_size, 1)


@dataclass
class WandaSpOptions(BatchOptions):
    """Wanda-sp's options."""

    preset: str = "project"
    """'project' (requested share of all parameters, heads per KV group) or 'official' (FLAP repository's
    prune_wanda_sp: int(r * width) channels and int(r * KV groups) whole groups per layer, 128 x 128 calibration)"""
    width_multiple: int = 1
    """kept FFN widths and kept heads x head_dim multiples of this (32: q4_0/q8_0 blocks, 256: k-quants); 1 = off;
    preset 'project' only"""

    OFFICIAL_CALIBRATION: ClassVar[dict[str, int]] = {"nsamples": 128, "seq_len": 128}

    def __post_init__(self):
        super().__post_init__()
        check_preset(self.preset)
        self.width_multiple = check_width_option(self.width_multiple, self.preset)


def lowest_groups(head_scores: torch.Tensor, n_kv: int, n_drop: int) -> list[int]:
    """Query heads to keep when the ``n_drop`` KV groups with the lowest summed head score go."""
    g = len(head_scores) // n_kv
    drop = set(torch.argsort(head_scores.reshape(n_kv, g).sum(1))[:n_drop].tolist())
    return [h for h in range(len(head_scores)) if h // g not in drop]


def lowest_channels_kept(channel_scores: torch.Tensor, n_drop: int) -> list[int]:
    """Channel indices kept when the ``n_drop`` lowest-scoring ones go."""
    drop = set(torch.argsort(channel_scores)[:n_drop].tolist())
    return [c for c in range(len(channel_scores)) if c not in drop]


def _prune_official(adapter: DecoderAdapter, ratio: float, mom) -> dict[str, Any]:
    report = []
    for i, layer in enumerate(list(adapter.layers)):
        entry = resumed_layer(adapter, layer)  # streamed and resumed: written before the interruption
        if entry is not None:
            report.append(entry)
            continue
        load_layer(adapter, layer)  # streamed: materialised until finish_layer
        hs, cs = wanda_sp_scores(adapter, layer, mom[i])
        n_kv, width = adapter.num_kv_heads(layer), adapter.intermediate_size(layer)
        groups = min(int(ratio * n_kv), n_kv - 1)
        channels = min(int(ratio * width), width - 1)
        if groups:
            adapter.prune_heads(i, lowest_groups(hs, n_kv, groups))
        if channels:
            adapter.prune_ffn_channels(i, lowest_channels_kept(cs, channels))
        entry = {"layer": i, "kv_groups_removed": groups, "heads_kept": adapter.num_heads(layer),
                 "channels_kept": adapter.intermediate_size(layer)}
        finish_layer(adapter, layer, entry)
        report.append(entry)
    return {"layers": report, "preset": "official"}


def prune_wanda_sp(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, opts: BatchOptions) -> dict[str, Any]:
    check_ratio(ratio)
    mom = activation_moments(adapter, ids, opts.batch_size)
    if getattr(opts, "preset", "project") == "official":
        return _prune_official(adapter, ratio, mom)
    return prune_units_uniformly(adapter, ratio, lambda i: wanda_sp_scores(adapter, adapter.layers[i], mom[i]),
                                 getattr(opts, "width_multiple", 1))
