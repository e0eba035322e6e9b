"""Reject malformed client updates before they can reach the global model."""
from __future__ import annotations

import math

import torch

from ..aggregators import compact
from ..local import ClientResult, ClientTask


def mask_problem(m) -> str | None:
    """Why ``m`` is not a keep-mask (a 1-D bool tensor, or integers that are all 0 or 1), or None.
    Anything else (2, -1, 0.5, a float 1.0) means the client and server disagree on what it holds."""
    if not isinstance(m, torch.Tensor):
        return "is not a tensor"
    if m.dim() != 1:
        return f"has {m.dim()} dimensions (must be a 1-D vector)"
    if m.dtype == torch.bool:
        return None
    if m.is_floating_point() or m.is_complex():
        return f"has dtype {m.dtype} (must be bool or 0/1 integers)"
    bad = m[(m != 0) & (m != 1)]
    if bad.numel():
        return f"has values other than 0/1 (e.g. {int(bad[0])})"
    return None


def update_problem(result: ClientResult, task: ClientTask, max_norm: float) -> str | None:
    """Why ``result`` must be rejected, or None when it is well-formed.

    Checks: the client answers the task it was given (id, round, rank); only keys it was sent;
    an integer num_examples > 0 (how much it counts is capped later, by ``robust.cap_weights``);
    floating-point tensors; masks that are 1-D bool (or 0/1 integer) vectors of the right length;
    each tensor's shape equals the task tensor compacted by the masks; all values finite; total
    Frobenius norm at most ``max_norm``; at least one tensor.
    """
    if (result.cid, result.round, result.rank) != (task.cid, task.round, task.rank):
        return (f"answers client/round/rank {(result.cid, result.round, result.rank)}, "
                f"was asked {(task.cid, task.round, task.rank)}")
    if not result.lora:
        return "empty update"
    unknown = sorted(set(result.lora) - set(task.lora))
    if unknown:
        return f"unexpected keys {unknown[:3]}"
    n = result.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        return f"num_examples={n!r} (must be an integer > 0)"
    sq = 0.0
    for k, t in result.lora.items():
        if not isinstance(t, torch.Tensor):
            return f"{k} is not a tensor"
        if not t.is_floating_point():
            return f"{k}: dtype {t.dtype} is not floating point (LoRA factors are float tensors)"
        ref = task.lora[k]
        masks = result.masks.get(k) or {}
        for d, m in masks.items():
            problem = mask_problem(m)
            if problem:
                return f"{k}: mask for dim {d} {problem}"
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
