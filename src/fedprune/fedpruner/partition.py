"""Partition L layers into K contiguous groups of similar layers (FedPruner's macro step).

Given a symmetric similarity matrix ``S`` (e.g. linear CKA), a partition into segments
``[a_0 = 0, a_1), [a_1, a_2), ..., [a_{K-1}, a_K = L)`` maximises ``sum_g score(segment_g)``.
Objectives (``score`` of a segment G with ``m = |G|`` layers):

- ``"scatter"`` (default): ``-(1/m) sum_{i<j in G} (1 - S_ij)``, minus the within-group
  scatter, the k-means analogue with ``1 - S`` as dissimilarity. A singleton scores 0. It
  rewards tight groups and keeps sizes balanced (large groups pay for every pair).
- ``"mean"``: mean pairwise similarity ``(2 / (m (m - 1))) sum_{i<j in G} S_ij``; a
  singleton scores ``singleton_score`` (default 0: otherwise K-1 singletons plus one
  large group tends to win).
- ``"sum"``: ``sum_{i<j in G} S_ij``; favours one big group, kept for comparison.

Exact dynamic programming over segment ends: ``best[k][j] = max_i best[k-1][i] + score(i, j)``,
O(K L^2) with O(1) segment sums from 2-D prefix sums. Ties go to the earliest boundary.
"""
from __future__ import annotations

import math

import torch

OBJECTIVES = ("scatter", "mean", "sum")


class _SegmentSums:
    """``pair_sum(a, b) = sum_{a <= i < j < b} S_ij`` in O(1)."""

    def __init__(self, S: torch.Tensor):
        S = torch.as_tensor(S, dtype=torch.float64)
        upper = torch.triu(S, diagonal=1)
        L = S.shape[0]
        P = torch.zeros(L + 1, L + 1, dtype=torch.float64)
        P[1:, 1:] = upper.cumsum(0).cumsum(1)
        self.P = P.tolist()

    def pair_sum(self, a: int, b: int) -> float:
        P = self.P
        return P[b][b] - P[a][b] - P[b][a] + P[a][a]


def segment_score(S: torch.Tensor, start: int, end: int, objective: str = "scatter",
                  singleton_score: float = 0.0, _sums: _SegmentSums | None = None) -> float:
    """Score of the segment ``[start, end)`` under ``objective`` (module doc)."""
    m = end - start
    if m <= 0:
        raise ValueError(f"empty segment [{start}, {end})")
    ps = (_sums or _SegmentSums(S)).pair_sum(start, end)
    pairs = m * (m - 1) / 2
    if objective == "scatter":
        return -(pairs - ps) / m
    if objective == "mean":
        return singleton_score if m == 1 else ps / pairs
    if objective == "sum":
        return ps
    raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")


def partition_score(S: torch.Tensor, groups: list[list[int]], objective: str = "scatter",
                    singleton_score: float = 0.0) -> float:
    """Total score of a contiguous partition given as lists of layer indices."""
    sums = _SegmentSums(S)
    return sum(segment_score(S, g[0], g[-1] + 1, objective, singleton_score, sums) for g in groups)


def contiguous_partition(S: torch.Tensor, num_groups: int, objective: str = "scatter",
                         singleton_score: float = 0.0) -> list[list[int]]:
    """Best partition of ``range(L)`` into ``num_groups`` contiguous groups (exact DP, module doc)."""
    S = torch.as_tensor(S, dtype=torch.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"S must be square, got shape {tuple(S.shape)}")
    L, K = S.shape[0], int(num_groups)
    if not 1 <= K <= L:
        raise ValueError(f"num_groups must lie in [1, {L}], got {K}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    sums = _SegmentSums(S)
    score = [[-math.inf] * (L + 1) for _ in range(L + 1)]
    for a in range(L):
        for b in range(a + 1, L + 1):
            score[a][b] = segment_score(S, a, b, objective, singleton_score, sums)
    best = [[-math.inf] * (L + 1) for _ in range(K + 1)]
    arg = [[-1] * (L + 1) for _ in range(K + 1)]
    best[0][0] = 0.0
    for k in range(1, K + 1):
        for j in range(k, L - (K - k) + 1):
            for i in range(k - 1, j):
                v = best[k - 1][i] + score[i][j]
                if v > best[k][j] + 1e-12:
                    best[k][j], arg[k][j] = v, i
    bounds, j = [L], L
    for k in range(K, 0, -1):
        j = arg[k][j]
        bounds.append(j)
    bounds.reverse()
    return [list(range(bounds[g], bounds[g + 1])) for g in range(K)]
