"""HetLoRA: clients of different LoRA ranks, zero-padded and norm-weighted."""
from __future__ import annotations

from .. import aggregators as agg
from .base import GlobalModel, LoraStrategy


class HetLoRA(LoraStrategy):
    """HetLoRA: clients of different ranks; zero-pad to r_max, weight by ||B_k A_k||_F; clients truncate."""

    name = "hetlora"

    def client_lora(self, client, global_, round_idx, seed):
        return agg.truncate_rank(global_.tensors, self.rank_of(client.cid))

    def aggregate_train(self, round_idx, results, global_):
        new = agg.hetlora_aggregate([r.lora for r in results], self.r_max)
        return GlobalModel(new, global_.base_delta, dict(global_.meta))
