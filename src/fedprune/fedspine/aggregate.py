"""Heterogeneity-aware aggregation for FedSpine: pure functions on dicts of tensors.

Every client holds only the rows/columns of its LoRA tensors that belong to the heads and
channels it kept (``masks[key] = {dim: bool}``, see ``federated.submodel.lora_masks``) and
trains at its own rank. Its update is scattered back to the full index space and each entry
is averaged over the clients that hold it (count-based, HeteroFL/FedRA style); entries
nobody holds keep the previous global. Ranks are reconciled in one of three ways:

- ``flexlora``: average the full-space products ``(alpha / r_k) B_k A_k`` per entry (an
  entry ``(i, j)`` of module ``m`` is held when row ``i`` of ``B`` and column ``j`` of ``A``
  are); clients later get the truncated SVD at their rank;
- ``hetlora``: zero-pad ``A_k`` / ``B_k`` to ``r_max`` (padding counts as held, as in
  HetLoRA) and average ``A`` and ``B`` separately per entry; clients truncate;
- ``fedavg``: one rank for everyone, ``A`` and ``B`` averaged per entry (FedIT).

Weights are the clients' data sizes (HetLoRA's ``||B A||`` weighting is not used here: with
masks the norm of a partial update is not comparable across clients).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..federated import aggregators as agg
from ..federated.aggregators import A_SUFFIX, B_SUFFIX

Tensor = torch.Tensor
Masks = Mapping[str, Mapping[int, Tensor]]

RECONCILE = ("flexlora", "hetlora", "fedavg")


def _pair_masks(masks: Masks, m: str, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(rows of B held, columns of A held) for module ``m`` of full shape ``(d_out, d_in)``."""
    d_out, d_in = shape
    rows = (masks.get(m + B_SUFFIX) or {}).get(0)
    cols = (masks.get(m + A_SUFFIX) or {}).get(1)
    rows = torch.ones(d_out, dtype=torch.bool) if rows is None else rows.bool()
    cols = torch.ones(d_in, dtype=torch.bool) if cols is None else cols.bool()
    return rows, cols


def masked_flexlora_aggregate(states: Sequence[Mapping[str, Tensor]], masks: Sequence[Masks],
                              weights: Sequence[float], previous: Mapping[str, Tensor],
                              alpha: float) -> dict[str, Tensor]:
    """Count-based FlexLoRA: ``dW[m]`` averaged per entry over the clients holding it.

    ``states[k]`` holds client k's compact ``A`` (r_k x kept d_in) and ``B`` (kept d_out x r_k);
    ``previous[m]`` is the current full-space global ``(d_out, d_in)``.
    """
    if not states or len(states) != len(masks) or len(states) != len(weights):
        raise ValueError("masked_flexlora_aggregate: need one masks dict and one weight per client state")
    w = agg.normalise(weights)
    out = {}
    for m, prev in previous.items():
        num = torch.zeros(prev.shape, dtype=torch.float64)
        den = torch.zeros(prev.shape, dtype=torch.float64)
        for wk, st, mk in zip(w, states, masks):
            if m + A_SUFFIX not in st:
                continue
            A, B = st[m + A_SUFFIX].double(), st[m + B_SUFFIX].double()
            rows, cols = _pair_masks(mk, m, prev.shape)
            v, h = agg.scatter_to_full((alpha / A.shape[0]) * (B @ A), {0: rows, 1: cols}, prev.shape)
            num += wk * v
            den += wk * h
        out[m] = torch.where(den > 0, num / den.clamp_min(1e-300), prev.double()).to(prev.dtype)
    return out


def pad_compact_rank(state: Mapping[str, Tensor], r_max: int) -> dict[str, Tensor]:
    """Zero-pad every compact ``A`` (r x n) to ``(r_max, n)`` and ``B`` (n x r) to ``(n, r_max)``."""
    out = {}
    for m in agg.lora_modules(state):
        out[m + A_SUFFIX], out[m + B_SUFFIX] = agg.pad_rank(state[m + A_SUFFIX], state[m + B_SUFFIX], r_max)
    return out


def masked_lora_aggregate(states: Sequence[Mapping[str, Tensor]], masks: Sequence[Masks],
                          weights: Sequence[float], previous: Mapping[str, Tensor],
                          r_max: int | None = None) -> dict[str, Tensor]:
    """Count-based average of ``A`` and ``B`` (``fedavg``; with ``r_max``: HetLoRA zero-padding first)."""
    if r_max is not None:
        states = [pad_compact_rank(s, r_max) for s in states]
    return agg.count_average(states, masks, previous, weights)


def masked_fraction_held(masks: Masks, shapes: Mapping[str, Sequence[int]]) -> float:
    """Fraction of full-space LoRA entries (of ``A`` columns and ``B`` rows) a client holds."""
    held = total = 0
    for m, (d_out, d_in) in shapes.items():
        rows, cols = _pair_masks(masks, m, (d_out, d_in))
        held += int(rows.sum()) + int(cols.sum())
        total += d_out + d_in
    return held / max(total, 1)


def svd_cache(dW: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Thin SVD ``(U, S, Vh)`` of every module's full-space update, once per round (float32:
    the factors only seed the next round's LoRA; every client of any rank reuses them)."""
    return {m: torch.linalg.svd(d.float(), full_matrices=False) for m, d in dW.items()}


def factor_from_svd(svd: tuple[Tensor, Tensor, Tensor], rank: int, alpha: float) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``(alpha / rank) B A`` = the rank-``rank`` truncation (as ``flexlora_factor``)."""
    U, S, Vh = svd
    r = min(rank, S.shape[0])
    B = U[:, :r] * S[:r] / (alpha / rank)
    A = Vh[:r]
    if r < rank:
        A, B = agg.pad_rank(A, B, rank)
    return A.contiguous(), B.contiguous()


def distribute_from_svd(cache: Mapping[str, tuple[Tensor, Tensor, Tensor]], rank: int, alpha: float) -> dict[str, Tensor]:
    out = {}
    for m, svd in cache.items():
        out[m + A_SUFFIX], out[m + B_SUFFIX] = factor_from_svd(svd, rank, alpha)
    return out
