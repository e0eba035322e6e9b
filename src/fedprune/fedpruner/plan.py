"""A device's FedPruner plan for one round: K from its memory budget, the layer (or sub-block)
statistics of the current global model on a local batch, and the chosen layers / sub-blocks.

Everything here is a composition of the tested cores (``memory``, ``cka``, ``partition``,
``selection``); the federated strategies (``federated.strategies.fedpruner``) only route.

Memory budget -> K: ``memory.training_memory`` predicts live tensor bytes. With glibc as shipped
the peak RSS is higher (freed activation blocks fragment the heap: about +0.75x the
activation bytes at K=30, and with the chunked loss a further ~190 MiB at any K for
SmolLM2-135M, see ``benchmarks/fedpruner/results/memory_model.md``).
``activation_slack`` budgets that: every activation byte is counted ``1 + slack`` times. The
benchmark pins ``MALLOC_MMAP_THRESHOLD_=65536`` instead and uses slack 0.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from .cka import cka_matrix
from .memory import ModelShape, TrainSetup, block_costs, training_memory
from .partition import contiguous_partition
from .selection import block_units, blocks_to_skip, select_blocks, select_layers

# ---- memory budget -> what fits ---------------------------------------------------------------


def predicted_peak(shape: ModelShape, setup: TrainSetup, num_layers: int, activation_slack: float = 0.0) -> float:
    """Predicted peak bytes of training ``num_layers`` layers, activations counted ``1 + slack`` times."""
    mb = training_memory(shape, setup, num_layers)
    return mb.total + activation_slack * mb.activations


def layers_for_budget(budget_bytes: float | None, shape: ModelShape, setup: TrainSetup,
                      activation_slack: float = 0.0) -> int:
    """Largest K in ``[0, L]`` whose predicted peak fits ``budget_bytes`` (None = unlimited -> L).

    Monotone in the budget by construction (the predicted peak grows with K).
    """
    if budget_bytes is None:
        return shape.num_layers
    k = 0
    while k < shape.num_layers and predicted_peak(shape, setup, k + 1, activation_slack) <= budget_bytes:
        k += 1
    return k


def unit_budget(budget_bytes: float, shape: ModelShape, setup: TrainSetup) -> float:
    """Bytes left for FedPruner+ sub-blocks once embeddings, LM head, transient and fixed are paid."""
    mb = training_memory(shape, setup, 1)
    fixed = mb.embed_head + mb.transient + mb.fixed
    return float(budget_bytes) - fixed


def unit_costs(shape: ModelShape, setup: TrainSetup, activation_slack: float = 0.0) -> dict[str, float]:
    """Per-sub-block bytes (``memory.block_costs``), the activation share inflated by the slack.

    ``attn + mlp`` equals one whole layer's cost, so K whole layers and their 2K sub-blocks
    cost the same.
    """
    c = block_costs(shape, setup)
    if activation_slack:
        act = training_memory(shape, setup, 1).per_layer["activations"]
        tot = c["attn"] + c["mlp"]
        c = {k: v + activation_slack * act * v / tot for k, v in c.items()}
    return {k: float(v) for k, v in c.items()}


def setup_for(seq_len: int, batch_size: int, rank: int, targets: Sequence[str], dtype: str = "float32",
              fixed_overhead_bytes: int = 0, lora_dropout: float = 0.0, chunked_loss: bool = True,
              loss_chunk_tokens: int = 64) -> TrainSetup:
    """A :class:`TrainSetup` from federated settings (LoRA targets outside LLaMA's seven are ignored)."""
    from .memory import LLAMA_TARGETS

    t = tuple(x for x in targets if x in LLAMA_TARGETS) or ("q_proj",)
    return TrainSetup(seq_len=seq_len, batch_size=batch_size, lora_rank=rank, lora_targets=t, dtype=dtype,
                      fixed_overhead_bytes=int(fixed_overhead_bytes), lora_dropout=float(lora_dropout),
                      chunked_loss=bool(chunked_loss), loss_chunk_tokens=int(loss_chunk_tokens))


def with_rank(setup: TrainSetup, rank: int) -> TrainSetup:
    return replace(setup, lora_rank=int(rank))


# ---- statistics of the current model on a local batch --------------------------------------------


@dataclass
class LayerStats:
    """One forward pass worth of FedPruner statistics (all ``[L]`` or ``[L, L]``, float64)."""

    similarity: torch.Tensor
    """linear CKA between layer outputs"""
    layer_importance: torch.Tensor
    """1 - cos(layer input, layer output) per token, averaged"""
    attn_importance: torch.Tensor
    """1 - cos(h, h + attn(h)) (the attention sub-block's turn of the residual)"""
    mlp_importance: torch.Tensor
    """1 - cos(h', h' + mlp(h')) (the FFN sub-block's)"""

    def to_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("similarity", "layer_importance", "attn_importance",
                                                          "mlp_importance")}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerStats":
        return cls(**{k: torch.tensor(v, dtype=torch.float64) for k, v in d.items()})


def _one_minus_cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from ..pruning.criteria.layer import block_influence  # Block Influence, written once

    return block_influence(x, y)


@torch.no_grad()
def layer_stats(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                max_tokens: int | None = 128, seed: int = 0) -> LayerStats:
    """CKA matrix and cosine importances of layers and sub-blocks from one forward pass
    (on at most ``max_tokens`` non-padding tokens, a seeded subset).

    Hooks (through the architecture adapter) record each layer's input and output and its
    attention sub-block's output; the FFN's input is ``x + attn`` and its output ``y - (x + attn)``
    (pre-norm residual layers), so one pass gives both sub-block criteria.
    """
    from ..adapters import get_adapter

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ad = get_adapter(base)
    L = ad.num_layers
    xs: list = [None] * L
    ys: list = [None] * L
    att: list = [None] * L

    def layer_hook(i):
        def hook(module, args, kwargs, output):
            xs[i] = (args[0] if args else kwargs["hidden_states"]).detach()
            ys[i] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    def attn_hook(i):
        def hook(module, args, output):
            att[i] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    hooks = []
    try:
        for i, layer in enumerate(ad.layers):
            hooks.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
            a = ad.attention(layer)
            if a is not layer:
                hooks.append(a.register_forward_hook(attn_hook(i)))
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in hooks:
            h.remove()
    keep = attention_mask.bool() if attention_mask is not None else None
    flat = (lambda t: t[keep]) if keep is not None else (lambda t: t.reshape(-1, t.shape[-1]))  # noqa: E731
    X, Y = [flat(x) for x in xs], [flat(y) for y in ys]
    A = [flat(a) if a is not None else None for a in att]
    n = X[0].shape[0]
    if max_tokens and n > max_tokens:  # a seeded subset of tokens: CKA costs O(L n^2 d)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_tokens]
        X, Y = [x[idx] for x in X], [y[idx] for y in Y]
        A = [a[idx] if a is not None else None for a in A]
    lay = torch.stack([_one_minus_cos(x, y) for x, y in zip(X, Y)])
    att_imp, mlp_imp = [], []
    for x, y, a in zip(X, Y, A):
        if a is None:  # no separable attention module: split the layer's importance evenly
            att_imp.append(_one_minus_cos(x, y) / 2)
            mlp_imp.append(_one_minus_cos(x, y) / 2)
            continue
        mid = x + a
        att_imp.append(_one_minus_cos(x, mid))
        mlp_imp.append(_one_minus_cos(mid, y))
    return LayerStats(cka_matrix(Y), lay, torch.stack(att_imp), torch.stack(mlp_imp))


# ---- plans ---------------------------------------------------------------------------------------


@dataclass
class DevicePlan:
    """What one device trains this round."""

    layers: list[int]
    """decoder layers in its forward pass (original indices)"""
    skip_attn: list[int]
    """kept layers whose attention sub-block is bypassed (FedPruner+)"""
    skip_mlp: list[int]
    """kept layers whose FFN sub-block is bypassed (FedPruner+)"""
    groups: list[list[int]]
    """the contiguous layer groups it was drawn from (empty for baselines without groups)"""

    def to_dict(self) -> dict:
        return {"layers": self.layers, "skip_attn": self.skip_attn, "skip_mlp": self.skip_mlp, "groups": self.groups}


def fedpruner_plan(stats: LayerStats, k: int, temperature: float, rng: np.random.Generator,
                   objective: str = "scatter") -> DevicePlan:
    """Macro (CKA partition into K contiguous groups) + micro (one layer per group by importance)."""
    groups = contiguous_partition(stats.similarity, k, objective)
    layers = select_layers(groups, stats.layer_importance, temperature, rng)
    return DevicePlan(layers, [], [], groups)


def fedpruner_plus_plan(stats: LayerStats, budget_bytes: float, costs: dict[str, float], temperature: float,
                        rng: np.random.Generator, objective: str = "scatter") -> DevicePlan:
    """FedPruner+: sub-blocks under ``budget_bytes`` (what is left for units, ``unit_budget``).

    Groups: the CKA partition into ``K = floor(budget / layer cost)`` groups (at least 1), each
    group's units = the attention and FFN blocks of its layers; one unit per group first, then
    the rest of the budget by importance (``selection.select_blocks``).
    """
    L = stats.similarity.shape[0]
    units = block_units(L)
    cost = [costs[kind] for _, kind in units]
    imp = []
    for i, kind in units:
        imp.append(float(stats.attn_importance[i] if kind == "attn" else stats.mlp_importance[i]))
    k = max(1, min(L, int(budget_bytes // (costs["attn"] + costs["mlp"]))))
    groups = contiguous_partition(stats.similarity, k, objective)
    unit_groups = [[2 * i + j for i in g for j in (0, 1)] for g in groups]
    chosen = select_blocks(units, imp, cost, budget_bytes, unit_groups, temperature, rng)
    if not chosen:
        return DevicePlan([], [], [], groups)
    keep, attn, mlp = blocks_to_skip(chosen, L)
    return DevicePlan(keep, attn, mlp, groups)


def truncation_plan(num_layers: int, k: int) -> DevicePlan:
    """Depth truncation: the first ``k`` layers."""
    return DevicePlan(list(range(k)), [], [], [])


def random_plan(num_layers: int, k: int, rng: np.random.Generator) -> DevicePlan:
    """FedRA: ``k`` layers drawn uniformly without replacement."""
    return DevicePlan(sorted(int(i) for i in rng.choice(num_layers, size=k, replace=False)), [], [], [])
