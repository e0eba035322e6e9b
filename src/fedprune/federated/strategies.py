"""Federated strategies, in the Flower spirit: ``configure_train`` gives each selected client its
own task (rank, LoRA state, layer subset, masks...), ``aggregate_train`` turns the accepted
results into the next global. The maths lives in :mod:`.aggregators`; strategies only route.

A strategy never sees device profiles: only client ids, self-reported facts (number of
examples, memory) and the results (metrics include the observed round time ``time_s``).

Registered: ``fedit``, ``hetlora``, ``flexlora``, ``flora``. A new method (FedSpine, FedPruner)
is one subclass of :class:`LoraStrategy` plus one registration.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from ..registry import Registry
from . import aggregators as agg
from .local import ClientResult, ClientTask
from .cost import payload_bytes
from .lora import LoraSettings, init_lora_state


@dataclass
class ClientInfo:
    """What the server knows about a client without being told its profile."""

    cid: int
    num_examples: int
    memory_bytes: int | None = None
    """self-reported memory budget (what a device would report about itself)"""


@dataclass
class GlobalModel:
    """Server state that strategies read and write (checkpointed every round)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """the global LoRA state (or, for FlexLoRA, the full-space update per module)"""
    base_delta: dict[str, torch.Tensor] = field(default_factory=dict)
    """updates merged into the frozen base (FLoRA); the runtime applies ``W = W0 + delta``"""
    meta: dict[str, Any] = field(default_factory=dict)
    """small JSON-able strategy state"""


class Strategy(Protocol):
    name: str

    def init_global(self, shapes: dict[str, tuple[int, int]], seed: int) -> GlobalModel: ...

    def select_clients(self, round_idx: int, clients: Sequence[ClientInfo], k: int, seed: int) -> list[ClientInfo]: ...

    def configure_train(self, round_idx: int, clients: Sequence[ClientInfo], global_: GlobalModel,
                        seed: int) -> list[ClientTask]: ...

    def aggregate_train(self, round_idx: int, results: Sequence[ClientResult], global_: GlobalModel) -> GlobalModel: ...

    def eval_delta(self, global_: GlobalModel) -> dict[str, torch.Tensor]: ...


STRATEGIES: Registry[type] = Registry("strategy")


class LoraStrategy:
    """Shared plumbing: rank per client, seeded client sampling, eval as a dense delta."""

    name = "base"
    supports_robust_aggregation = False
    """True when ``aggregate_train`` averages same-indexed entries and can use a median or trimmed
    mean instead (``federation.aggregation``); the runtime sets the two attributes below"""
    aggregation = "mean"
    trim_ratio = 0.0

    def __init__(self, lora: LoraSettings, ranks: Sequence[int] | None = None):
        self.lora = lora
        self.ranks = [int(r) for r in (ranks or [lora.rank])]
        if any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be >= 1, got {self.ranks}")
        self.shapes: dict[str, tuple[int, int]] = {}

    # ranks are assigned by client id (cycled), never from the device profile
    def rank_of(self, cid: int) -> int:
        return self.ranks[cid % len(self.ranks)]

    @property
    def r_max(self) -> int:
        return max(self.ranks)

    def scaling(self, rank: int) -> float:
        return self.lora.alpha / rank

    def init_global(self, shapes, seed):
        self.shapes = dict(shapes)
        return GlobalModel(tensors=init_lora_state(shapes, self.r_max, seed))

    def select_clients(self, round_idx, clients, k, seed):
        rng = random.Random(f"{seed}|select|{round_idx}")
        k = min(k, len(clients))
        return sorted(rng.sample(list(clients), k), key=lambda c: c.cid)

    def configure_train(self, round_idx, clients, global_, seed):
        return [ClientTask(c.cid, round_idx, self.rank_of(c.cid), self.client_lora(c, global_, round_idx, seed))
                for c in clients]

    def client_lora(self, client: ClientInfo, global_: GlobalModel, round_idx: int, seed: int):
        return {k: v.clone() for k, v in global_.tensors.items()}

    def eval_delta(self, global_):
        return agg.lora_delta(global_.tensors, self.scaling(self.r_max))


@STRATEGIES.register("fedit")
class FedIT(LoraStrategy):
    """FedIT: one rank, FedAvg of A and B weighted by data size. Clients that hold only some
    layers/rows (masks, layer subsets) are averaged per entry over the holders (count-based)."""

    name = "fedit"
    supports_robust_aggregation = True

    def __init__(self, lora, ranks=None):
        super().__init__(lora, ranks)
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


@STRATEGIES.register("hetlora")
class HetLoRA(LoraStrategy):
    """HetLoRA: clients of different ranks; zero-pad to r_max, weight by ||B_k A_k||_F; clients truncate."""

    name = "hetlora"

    def client_lora(self, client, global_, round_idx, seed):
        return agg.truncate_rank(global_.tensors, self.rank_of(client.cid))

    def aggregate_train(self, round_idx, results, global_):
        new = agg.hetlora_aggregate([r.lora for r in results], self.r_max)
        return GlobalModel(new, global_.base_delta, dict(global_.meta))


@STRATEGIES.register("flexlora")
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


@STRATEGIES.register("flora")
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


def make_strategy(name: str, lora: LoraSettings, ranks: Sequence[int] | None = None,
                  options: dict[str, Any] | None = None) -> LoraStrategy:
    """Build a registered strategy; ``options`` (federation.options) go to its constructor."""
    cls = STRATEGIES.get(name)
    if not options:
        return cls(lora, ranks)
    try:
        return cls(lora, ranks, **options)
    except TypeError as exc:
        raise ValueError(f"federation.options {sorted(options)} not accepted by strategy {name!r}: {exc}") from None


# methods that live in their own modules register themselves on import
from . import strategies_fedspine  # noqa: E402,F401
from . import strategies_fedpruner  # noqa: E402,F401
