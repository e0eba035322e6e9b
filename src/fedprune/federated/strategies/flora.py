"""FLoRA: stacked LoRA factors merged into the base every round."""
from __future__ import annotations

import torch

from .. import aggregators as agg
from ..cost import payload_bytes
from ..local import ClientTask
from ..lora import init_lora_state
from .base import GlobalModel, LoraStrategy


class FLoRA(LoraStrategy):
    """FLoRA: stack ``p_k (alpha/r_k) A_k`` and ``B_k`` along the rank axis (exactly the weighted sum
    of the updates), merge it into the base, and start every round from a fresh LoRA init."""

    name = "flora"

    def init_global(self, shapes, seed):
        self.shapes = dict(shapes)
        return GlobalModel(tensors={}, base_delta={}, meta={"stack_bytes": 0})

    def configure_train(self, round_idx, clients, global_, seed):
        tasks = []
        for c in clients:
            r = self.rank_of(c.cid)
            # fresh init from a seed both sides know; on the wire goes last round's stack
            init = init_lora_state(self.shapes, r, seed * 7919 + round_idx)
            tasks.append(ClientTask(c.cid, round_idx, r, init, wire_bytes=int(global_.meta.get("stack_bytes", 0))))
        return tasks

    def aggregate_train(self, round_idx, results, global_):
        stacked = agg.flora_stack([r.lora for r in results], [r.num_examples for r in results],
                                  scalings=[self.scaling(r.rank) for r in results])
        delta = agg.lora_delta(stacked)
        merged = {m: global_.base_delta.get(m, torch.zeros_like(d)) + d for m, d in delta.items()}
        return GlobalModel({}, merged, dict(global_.meta, stack_bytes=payload_bytes(stacked)))

    def eval_delta(self, global_):
        return {}
