"""FlexLoRA: the global is the full-space update per module; each client gets its truncated SVD."""
from __future__ import annotations

import torch

from .. import aggregators as agg
from ..lora import init_lora_state
from .base import GlobalModel, LoraStrategy


class FlexLoRA(LoraStrategy):
    """FlexLoRA: average the full-size updates ``(alpha/r_k) B_k A_k`` weighted by data size; each
    client gets the truncated SVD at its own rank. The global is the full-space update per module."""

    name = "flexlora"
    supports_robust_aggregation = True  # median / trimmed mean of the same-shaped full-size updates

    def init_global(self, shapes, seed):
        self.shapes = dict(shapes)
        # Round 1 starts from PEFT's init (B = 0, so dW = 0); the seed makes it reproducible.
        return GlobalModel(tensors={m: torch.zeros(s) for m, s in shapes.items()}, meta={"init_seed": seed})

    def client_lora(self, client, global_, round_idx, seed):
        r = self.rank_of(client.cid)
        if not global_.meta.get("aggregated"):
            return init_lora_state(self.shapes, r, global_.meta.get("init_seed", seed))
        return agg.flexlora_distribute(global_.tensors, r, self.lora.alpha)

    def aggregate_train(self, round_idx, results, global_):
        if self.aggregation == "mean":
            dW = agg.flexlora_aggregate([r.lora for r in results], [r.num_examples for r in results], self.lora.alpha)
        else:
            dW = agg.flexlora_robust([r.lora for r in results], self.lora.alpha, self.aggregation, self.trim_ratio)
        return GlobalModel(dW, global_.base_delta, dict(global_.meta, aggregated=True))

    def eval_delta(self, global_):
        return {m: d.clone() for m, d in global_.tensors.items()} if global_.meta.get("aggregated") else {}
