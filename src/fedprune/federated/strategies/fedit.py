"""FedIT: one LoRA rank for every client, FedAvg of A and B weighted by data size."""
from __future__ import annotations

from .. import aggregators as agg
from .base import GlobalModel, LoraStrategy


class FedIT(LoraStrategy):
    """FedIT: one rank, FedAvg of A and B weighted by data size. Clients that hold only some
    layers/rows (masks, layer subsets) are averaged per entry over the holders (count-based)."""

    name = "fedit"
    supports_robust_aggregation = True

    def __init__(self, lora, ranks=None, options=None):
        super().__init__(lora, ranks, options)
        if len(set(self.ranks)) != 1:
            raise ValueError(f"fedit needs one rank for every client, got ranks={self.ranks}; use hetlora/flexlora/flora")

    def aggregate_train(self, round_idx, results, global_):
        w = [r.num_examples for r in results]
        partial = any(r.masks or set(r.lora) != set(global_.tensors) for r in results)
        if partial:
            new = agg.robust_count_average([r.lora for r in results], [r.masks for r in results], global_.tensors, w,
                                           self.aggregation, self.trim_ratio)
        else:
            new = agg.robust_average([r.lora for r in results], w, self.aggregation, self.trim_ratio)
        return GlobalModel(new, global_.base_delta, dict(global_.meta))
