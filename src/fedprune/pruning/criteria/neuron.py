"""Neuron (FFN channel / attention head) importance, condition-number based and peers.

All criteria are pure functions of :class:`UnitStats`, second-moment statistics gathered
batch by batch on calibration tokens (no activation is kept):

- ``G``   ``[k, k]``: ``sum_t h_t h_t^T`` of the unit activations (for FFN channels, the
  input of ``down_proj``/``fc2``; for heads, ``G`` is the contribution Gram below);
- ``mean`` ``[k]``: mean activation (for the centred covariance), ``n`` tokens;
- ``w_norm2`` ``[k]``: squared norm of each unit's output column;
- ``A``   ``[k, k]``: the *contribution* Gram ``sum_t u_t u_t^T`` with ``u_{t,j}`` the unit's
  contribution to the layer output (``h_{t,j} w_j`` for a channel, ``W_o[:, head] a_{t,head}``
  for a head). For channels ``A = (W^T W) * G`` (element-wise). ``A`` is exactly the matrix of
  the mask-tuning least-squares problem.

Damping: ``lambda = damp * mean(diag M)`` added to the diagonal before inversion.

Candidates (``comp.md`` C1..C4), all ranking *high = keep*:

``energy``        ``||w_j||^2 G_jj`` (not condition based; the reference point).
``vif``           C2, ``energy_j / VIF_j`` with ``VIF_j = (R^-1)_jj``, ``R`` the correlation
                  matrix of the centred activations: collinear units score low.
``compensated``   C3, ``||w_j||^2 / (G^-1)_jj``: the output error left when unit j is removed
                  and the remaining units' weights are re-fitted optimally (OBS, structured).
                  Greedy: remove a chunk, downdate ``G^-1`` by a Schur complement, re-score.
``mask_lsq``      C4, ``1 / (A^-1)_jj``: the error left when j is removed and the others may
                  only be *re-scaled* (exactly what mask tuning can recover), re-scored greedily,
                  which keeps the mask-tuning system well conditioned.
``cond_loo``      C1, one ``eigh`` of ``A``: a unit's energy inside the span of the ``k - n``
                  largest eigen-directions, ``sum_{top} lambda_i v_ij^2``; units that carry the
                  small-eigenvalue (ill-conditioned) directions score low.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...registry import Registry


@dataclass
class UnitStats:
    G: torch.Tensor
    w_norm2: torch.Tensor
    A: torch.Tensor
    mean: torch.Tensor | None = None
    n: int = 1

    @property
    def k(self) -> int:
        return self.G.shape[0]


def _damped_inverse(M: torch.Tensor, damp: float) -> torch.Tensor:
    M = M.double()
    lam = damp * M.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.inv(M + lam * torch.eye(M.shape[0], dtype=M.dtype, device=M.device))


def _greedy_inverse_scores(M: torch.Tensor, numer: torch.Tensor, n_remove: int, damp: float,
                           chunks: int = 8) -> torch.Tensor:
    """Greedy backward elimination scoring ``numer_j / (M^-1)_jj``, re-scored after each chunk.

    Returns a rank score per unit (higher = keep): removed units in removal order first.
    """
    k = M.shape[0]
    inv = _damped_inverse(M, damp)
    alive = torch.ones(k, dtype=torch.bool)
    rank = torch.empty(k, dtype=torch.float64)
    pos = 0
    step = max(1, -(-n_remove // chunks)) if n_remove > 0 else k
    numer = numer.double()
    while pos < n_remove:
        idx = alive.nonzero().squeeze(1)
        sub = inv[idx][:, idx]
        score = numer[idx] / sub.diagonal().clamp_min(1e-30)
        take = min(step, n_remove - pos)
        drop_local = torch.argsort(score)[:take]
        drop = idx[drop_local]
        rank[drop] = torch.arange(pos, pos + take, dtype=torch.float64)
        pos += take
        alive[drop] = False
        keep_local = torch.ones(len(idx), dtype=torch.bool)
        keep_local[drop_local] = False
        # Schur complement: inverse of the kept block of M from the inverse of the full block.
        S = sub[keep_local][:, keep_local]
        B = sub[keep_local][:, ~keep_local]
        C = sub[~keep_local][:, ~keep_local]
        new_sub = S - B @ torch.linalg.solve(C, B.T)
        kept = idx[keep_local]
        inv[kept.unsqueeze(1), kept.unsqueeze(0)] = new_sub
    idx = alive.nonzero().squeeze(1)
    if len(idx):
        final = numer[idx] / inv[idx][:, idx].diagonal().clamp_min(1e-30)
        order = torch.argsort(torch.argsort(final)).double()
        rank[idx] = n_remove + order
    return rank


def energy(s: UnitStats, n_remove: int, damp: float = 0.01) -> torch.Tensor:
    return (s.w_norm2.double() * s.G.double().diagonal())


def vif(s: UnitStats, n_remove: int, damp: float = 0.01) -> torch.Tensor:
    G = s.G.double()
    if s.mean is not None:
        m = s.mean.double()
        C = G / max(s.n, 1) - torch.outer(m, m)
    else:
        C = G / max(s.n, 1)
    d = C.diagonal().clamp_min(1e-12).sqrt()
    R = C / torch.outer(d, d)
    vif_j = _damped_inverse(R, damp).diagonal().clamp_min(1.0)
    return energy(s, n_remove) / vif_j


def compensated(s: UnitStats, n_remove: int, damp: float = 0.01) -> torch.Tensor:
    return _greedy_inverse_scores(s.G, s.w_norm2, n_remove, damp)


def mask_lsq(s: UnitStats, n_remove: int, damp: float = 0.01) -> torch.Tensor:
    return _greedy_inverse_scores(s.A, torch.ones(s.k, dtype=torch.float64), n_remove, damp)


def cond_loo(s: UnitStats, n_remove: int, damp: float = 0.01) -> torch.Tensor:
    A = s.A.double()
    evals, evecs = torch.linalg.eigh(A)  # ascending
    top = max(s.k - max(n_remove, 1), 1)
    return (evecs[:, -top:] ** 2 * evals[-top:].clamp_min(0)).sum(1)


NEURON_CRITERIA: Registry[Callable[..., torch.Tensor]] = Registry("neuron criterion")
for _name, _fn in (("energy", energy), ("vif", vif), ("compensated", compensated), ("mask_lsq", mask_lsq),
                   ("cond_loo", cond_loo)):
    NEURON_CRITERIA.register(_name, _fn)


def removal_order(criterion: str, stats: UnitStats, n_remove: int, damp: float = 0.01) -> list[int]:
    """The ``n_remove`` least important units under ``criterion`` (indices, ascending importance)."""
    scores = NEURON_CRITERIA.get(criterion)(stats, n_remove, damp)
    return torch.argsort(scores)[:n_remove].tolist()
