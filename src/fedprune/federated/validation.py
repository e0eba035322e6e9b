"""Reject malformed client updates before they can reach the global model."""
from __future__ import annotations

import math

import torch

from .aggregators import compact
from .client import ClientResult, ClientTask


def update_problem(result: ClientResult, task: ClientTask, max_norm: float) -> str | None:
    """Why ``result`` must be rejected, or None when it is well-formed.

    Checks: the client answers the task it was given (id, round, rank); only keys it was sent;
    masks of the right length; each tensor's shape equals the task tensor compacted by the
    masks; all values finite; total Frobenius norm at most ``max_norm``; at least one tensor.
    """
    if (result.cid, result.round, result.rank) != (task.cid, task.round, task.rank):
        return (f"answers client/round/rank {(result.cid, result.round, result.rank)}, "
                f"was asked {(task.cid, task.round, task.rank)}")
    if not result.lora:
        return "empty update"
    unknown = sorted(set(result.lora) - set(task.lora))
    if unknown:
        return f"unexpected keys {unknown[:3]}"
    if result.num_examples <= 0:
        return f"num_examples={result.num_examples} (must be > 0)"
    sq = 0.0
    for k, t in result.lora.items():
        if not isinstance(t, torch.Tensor):
            return f"{k} is not a tensor"
        ref = task.lora[k]
        masks = result.masks.get(k) or {}
        for d, m in masks.items():
            if not 0 <= int(d) < ref.dim() or m.numel() != ref.shape[int(d)]:
                return f"{k}: mask for dim {d} has length {m.numel()}, tensor shape is {tuple(ref.shape)}"
        expect = tuple(compact(ref, masks).shape)
        if tuple(t.shape) != expect:
            return f"{k}: shape {tuple(t.shape)}, expected {expect}"
        if not torch.isfinite(t).all():
            return f"{k}: non-finite values (NaN/Inf)"
        sq += float(t.double().pow(2).sum())
    norm = math.sqrt(sq)
    if norm > max_norm:
        return f"update norm {norm:.3g} exceeds the limit {max_norm:.3g}"
    return None
