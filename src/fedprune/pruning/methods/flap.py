"""FLAP (An et al., 2024): fluctuation-scored heads and channels, removed globally, then bias
compensation.

Scores ``S_j = Var(X_j) * ||W[:, j]||^2`` on the output projections' input columns (heads summed
over their columns) are standardised per layer and unit type (z-score) and removed *globally*
(adaptive structure) until the parameter budget is met; then the removed columns' mean
contribution ``B = W[:, removed] mean(X_removed)`` is added to the output bias (this adds
biases to LLaMA's ``o_proj``/``down_proj``, an architecture change the plan records so the
checkpoint reloads).

Presets (``-o preset=``, :mod:`.presets`): ``project`` standardises each head's summed score and
each channel's score per layer and unit type. ``official`` follows the FLAP repository's AL-AM
structure: the attention metric is the *squared* WIFV of each ``o_proj`` input column, z-scored
over the layer's columns and averaged per head; the channels' WIFV is z-scored over the layer's
channels; then one threshold over all layers and both unit types (parameter-weighted), so the
structure adapts across layers; 1024 windows of 128 tokens. Both standardise *per layer* (the
official ``standarlization`` works along each layer's row of the stacked metrics) and use bias
compensation; heads go in the GQA slots below (the official code, written for multi-head LLaMA,
removes single heads; with group size 1 the two coincide), costs are exact parameter counts (the
official 512/3 is LLaMA-7B's head-to-channel cost ratio), and a layer keeps at least one head
and one channel (the official threshold may empty a layer). The official code calibrates on
WikiText-2's training split; the preset takes the calibration the caller gives (C4 in the
benchmarks, so WikiText-2 stays held out).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...adapters import DecoderAdapter, head_rows
from ..bias_compensation import removed_mean_contribution
from ..budget import LayerTarget, channel_cost, check_ratio, kv_head_cost, query_head_cost
from ..criteria.units import activation_moments, fluctuation_columns, per_head
from ..selection import choose_heads
from ..width import check_option as check_width_option, gqa_head_counts, head_multiple, head_stops, removal_blocks
from ..streamed import finish_layer, load_layer, per_layer, resumed_layer, saved_state
from .common import zscore
from .presets import check_preset
from .wanda_sp import BatchOptions


@dataclass
class FlapOptions(BatchOptions):
    """FLAP's options."""

    bias_compensation: bool = True
    """add the removed columns' mean contribution to the output bias"""
    preset: str = "project"
    """'project' (head sums and channels z-scored per layer) or 'official' (FLAP repository's AL-AM: squared
    attention columns z-scored per layer and averaged per head, 1024 x 128 calibration); both: one global
    threshold"""
    width_multiple: int = 1
    """kept FFN widths and kept heads x head_dim multiples of this (32: q4_0/q8_0 blocks, 256: k-quants); 1 = off;
    preset 'project' only (the global walk then takes channels and heads in blocks scored by their mean)"""

    OFFICIAL_CALIBRATION: ClassVar[dict[str, int]] = {"nsamples": 1024, "seq_len": 128}

    def __post_init__(self):
        super().__post_init__()
        check_preset(self.preset)
        self.width_multiple = check_width_option(self.width_multiple, self.preset)


def standardised(columns: list[tuple[torch.Tensor, torch.Tensor]], head_dim: int, preset: str = "project"
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(heads, channels)`` scores on one scale, from :func:`fluctuation_columns`'s
    ``(attention columns, channels)``; every z-score ``(x - mean) / std`` is over one layer's units:

    - ``project``: ``z(sum of a head's columns)`` and ``z(channel)``;
    - ``official`` (FLAP's AL-AM): ``mean over a head's columns of z(column^2)`` and ``z(channel)``.
    """
    check_preset(preset)
    if preset == "project":
        return [(zscore(per_head(a, head_dim)), zscore(c)) for a, c in columns]
    return [(zscore(a * a).reshape(-1, head_dim).mean(1), zscore(c)) for a, c in columns]


def _candidate_units(adapter: DecoderAdapter, zscores: list[tuple[torch.Tensor, torch.Tensor]],
                     width_multiple: int = 1) -> list[tuple]:
    """``(standardised score, cost, layer, kind, index)`` of every removable unit, weakest first
    (``zscores``: per layer ``(heads, channels)`` from :func:`standardised`).

    Heads go in GQA "slots": the k-th weakest head of every KV group, removed together and in order.
    ``width_multiple > 1``: :func:`_block_units` instead.
    """
    if width_multiple > 1:
        return _block_units(adapter, zscores, width_multiple)
    units = []
    for i, layer in enumerate(adapter.layers):
        zh, zc = zscores[i]
        ccost = channel_cost(adapter, layer)
        for j in range(len(zc)):
            units.append((float(zc[j]), ccost, i, "chan", j))
        g, n_kv = adapter.group_size(layer), adapter.num_kv_heads(layer)
        if g > 1:
            slot_scores = zh.reshape(n_kv, g).sort(dim=1).values  # [n_kv, g] ascending within a group
            for k in range(g - 1):
                units.append((float(slot_scores[:, k].mean()), n_kv * query_head_cost(adapter, layer), i, "slot", k))
        else:
            hcost = query_head_cost(adapter, layer) + kv_head_cost(adapter, layer)
            for h in torch.argsort(zh)[:-1].tolist():
                units.append((float(zh[h]), hcost, i, "mha", h))
    units.sort(key=lambda u: u[0])
    return units


def _block_units(adapter: DecoderAdapter, zscores, n: int) -> list[tuple]:
    """FLAP's units for ``width_multiple = n`` (:mod:`fedprune.pruning.width`): a layer's channels, weakest
    first, in the blocks that keep its width a multiple of ``n`` (``index``: ``(k, channels)``, the
    layer's k-th block), and its head units (slots, or heads under multi-head attention) merged
    into runs that end where the kept heads x head_dim is a multiple of ``n`` (``index``:
    ``(k, units)``; single units where no count can be). Each scores the mean of its units and
    must be taken in order."""
    units = []
    m = head_multiple(n, adapter.head_dim)
    for i, layer in enumerate(adapter.layers):
        zh, zc = zscores[i]
        ccost = channel_cost(adapter, layer)
        order = torch.argsort(zc)
        start = 0
        for k, b in enumerate(removal_blocks(len(zc), n)):
            idx = order[start:start + b]
            units.append((float(zc[idx].mean()), b * ccost, i, "cblock", (k, idx.tolist())))
            start += b
        g, n_kv = adapter.group_size(layer), adapter.num_kv_heads(layer)
        if g > 1:
            seq = zh.reshape(n_kv, g).sort(dim=1).values.mean(0)[: g - 1]  # slot k: k-th weakest of every group
            ucost = n_kv * query_head_cost(adapter, layer)
            kind = "sblock"
        else:
            seq = zh.sort().values[:-1]
            ucost = query_head_cost(adapter, layer) + kv_head_cost(adapter, layer)
            kind = "hblock"
        stops = head_stops(gqa_head_counts(adapter.num_heads(layer), n_kv), m) or list(range(1, len(seq) + 1))
        prev = 0
        for k, stop in enumerate(stops):
            units.append((float(seq[prev:stop].mean()), (stop - prev) * ucost, i, kind, (k, stop - prev)))
            prev = stop
    units.sort(key=lambda u: u[0])
    return units


def _global_targets(adapter: DecoderAdapter, units: list[tuple], budget: float) -> tuple[list[LayerTarget], list[list[int]]]:
    """Walk the units weakest first until ``budget`` parameters are removed."""
    removed_params = 0
    targets = [LayerTarget(0, 0, 0) for _ in adapter.layers]
    drop_chans: list[list[int]] = [[] for _ in adapter.layers]
    slots_taken = [0] * adapter.num_layers
    blocks_taken = {kind: [0] * adapter.num_layers for kind in ("cblock", "sblock", "hblock")}
    for score, cost, i, kind, j in units:
        if removed_params + cost / 2 > budget:
            continue
        layer = adapter.layers[i]
        if kind == "chan":
            if len(drop_chans[i]) + 1 >= adapter.intermediate_size(layer):
                continue
            drop_chans[i].append(j)
            targets[i].channels += 1
        elif kind == "slot":
            if j != slots_taken[i]:
                continue  # slots must go weakest-first
            slots_taken[i] += 1
            targets[i].heads_per_group += 1
        elif kind in blocks_taken:  # width_multiple: blocks go in order too
            k, what = j
            if k != blocks_taken[kind][i]:
                continue
            blocks_taken[kind][i] += 1
            if kind == "cblock":
                drop_chans[i] += what
                targets[i].channels += len(what)
            elif kind == "sblock":
                targets[i].heads_per_group += what
            else:
                targets[i].groups += what
        else:
            targets[i].groups += 1
        removed_params += cost
        if removed_params >= budget:
            break
    return targets, drop_chans


def prune_flap(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, opts: FlapOptions) -> dict[str, Any]:
    check_ratio(ratio)
    mom = activation_moments(adapter, ids, opts.batch_size)
    hd = adapter.head_dim
    columns = saved_state(adapter, "flap_columns",
                          lambda: per_layer(adapter, lambda i, layer: fluctuation_columns(adapter, layer, mom[i])))
    zscores = standardised(columns, hd, opts.preset)
    targets, drop_chans = _global_targets(adapter, _candidate_units(adapter, zscores, opts.width_multiple),
                                          ratio * adapter.num_parameters())
    report = []
    for i in range(adapter.num_layers):
        layer = adapter.layers[i]
        entry = resumed_layer(adapter, layer)  # streamed and resumed: written before the interruption
        if entry is not None:
            report.append(entry)
            continue
        load_layer(adapter, layer)  # streamed: materialised until finish_layer
        hs, cs = zscores[i]  # within a layer, the order of the raw scores
        dropped_c = set(drop_chans[i])
        keep_c = [c for c in range(len(cs)) if c not in dropped_c]
        keep_h = choose_heads(adapter, layer, hs, targets[i])
        deltas = []
        if opts.bias_compensation:  # computed on the unpruned weights, before surgery
            deltas.append(("ffn_out", removed_mean_contribution(adapter.ffn_out(layer), drop_chans[i],
                                                                mom[i]["ffn_mean"])))
            if keep_h is not None:
                dropped = [h for h in range(len(hs)) if h not in keep_h]
                deltas.append(("o_proj", removed_mean_contribution(adapter.o_proj(layer),
                                                                   head_rows(dropped, hd).tolist(), mom[i]["attn_mean"])))
        if keep_h is not None:
            adapter.prune_heads(i, keep_h)
        if targets[i].channels:
            adapter.prune_ffn_channels(i, keep_c)
        for site, delta in deltas:
            if delta is not None:
                adapter.add_output_bias(i, site, delta)
        entry = {"layer": i, "heads_kept": adapter.num_heads(layer), "channels_kept": len(keep_c)}
        finish_layer(adapter, layer, entry)
        report.append(entry)
    return {"layers": report, "bias_compensation": opts.bias_compensation, "preset": opts.preset}
