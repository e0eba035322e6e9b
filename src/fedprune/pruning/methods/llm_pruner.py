"""LLM-Pruner without recovery training (Ma et al., 2023): first-order Taylor importance of
coupled groups ``I(G) = sum_{w in G} |w * dL/dw|`` from calibration-loss gradients (a full
backward pass: the memory overhead COMP avoids); only layers ``first_layer .. L - last_layer_offset - 1``
are pruned, at the sparsity that meets the overall ratio."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...adapters import DecoderAdapter
from ...options import require_int
from ..budget import check_ratio, neuron_targets
from ..criteria.units import taylor_scores
from ..selection import apply_scores
from .wanda_sp import BatchOptions


@dataclass
class LlmPrunerOptions(BatchOptions):
    """LLM-Pruner's options: only layers ``first_layer .. L - last_layer_offset - 1`` are pruned."""

    batch_size: int = 4
    """calibration samples per forward/backward pass"""
    first_layer: int = 4
    """first layer pruned (the paper keeps the first four)"""
    last_layer_offset: int = 2
    """layers left unpruned at the end"""

    def __post_init__(self):
        super().__post_init__()
        require_int("first_layer", self.first_layer, 0)
        require_int("last_layer_offset", self.last_layer_offset, 0)


def prune_llm_pruner(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, opts: LlmPrunerOptions) -> dict[str, Any]:
    check_ratio(ratio)
    scores = taylor_scores(adapter, ids, opts.batch_size)
    n = adapter.num_layers
    first = min(opts.first_layer, n - 1)
    layer_ids = list(range(first, max(n - opts.last_layer_offset, first + 1)))
    targets = neuron_targets(adapter, layer_ids, int(ratio * adapter.num_parameters()))
    report = []
    for i, tgt in zip(layer_ids, targets):
        info = apply_scores(adapter, i, tgt, scores[i][0], scores[i][1])
        report.append({"layer": i, "heads_kept": adapter.num_heads(adapter.layers[i]),
                       "channels_kept": info.get("channels_kept", adapter.intermediate_size(adapter.layers[i]))})
    return {"layers": report, "pruned_layers": layer_ids}
