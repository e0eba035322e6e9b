"""Steps shared by several pruning methods: uniform per-layer unit removal, layer counts."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ...adapters import DecoderAdapter
from ..budget import layers_for_params, neuron_targets
from ..selection import apply_scores
from ..streamed import finish_layer, load_layer, per_layer, resumed_layer, saved_state


def prune_units_uniformly(adapter: DecoderAdapter, ratio: float,
                          score_fn: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                          width_multiple: int = 1) -> dict[str, Any]:
    """Remove the same share of heads and FFN channels in every layer, lowest ``score_fn(i)``
    (``(head scores, channel scores)`` of layer ``i``) first, to meet ``ratio`` of all parameters.
    ``width_multiple > 1``: kept widths in multiples of it, each layer rounded up or down by the
    score of its marginal block of channels (``budget.neuron_targets``, ``pruning.width``)."""
    total = adapter.num_parameters()
    layer_ids = list(range(adapter.num_layers))
    scores = saved_state(adapter, "unit_scores", lambda: per_layer(adapter, lambda i, _layer: score_fn(i))) \
        if width_multiple > 1 else None
    targets = neuron_targets(adapter, layer_ids, int(ratio * total), width_multiple=width_multiple,
                             channel_scores=[cs for _, cs in scores] if scores is not None else None)
    report = []
    for i, tgt in enumerate(targets):
        layer = adapter.layers[i]
        entry = resumed_layer(adapter, layer)  # streamed and resumed: written before the interruption
        if entry is None:
            load_layer(adapter, layer)  # streamed: materialised until finish_layer
            hs, cs = score_fn(i) if scores is None else scores[i]
            entry = {"layer": i, **{k: (len(v) if isinstance(v, list) else v)
                                    for k, v in apply_scores(adapter, i, tgt, hs, cs).items()}}
            finish_layer(adapter, layer, entry)
        report.append(entry)
    return {"layers": report}


def layers_for_ratio(adapter: DecoderAdapter, ratio: float) -> int:
    """Whole layers to remove for ``ratio`` of all parameters (at least one, fewer than all)."""
    n = max(1, layers_for_params(adapter, ratio * adapter.num_parameters()))
    if n >= adapter.num_layers:
        raise ValueError(f"ratio {ratio} asks for {n} of {adapter.num_layers} layers: more layers than exist")
    return n


def zscore(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` (zeros for a single element): puts scores of different units on one scale."""
    return (x - x.mean()) / x.std().clamp_min(1e-12) if x.numel() > 1 else x * 0
