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
                  Greedy: remove one unit, downdate ``G^-1`` (rank 1), re-score.
``rescale_obs``   C4 (was ``mask_lsq``), ``1 / (A^-1)_jj``: the OBS-style leave-one-out error left when
                  j is removed and the others may only be *re-scaled* (exactly what mask tuning can
                  recover), re-scored greedily one unit at a time. Not a condition number.
``top_eig_energy`` C1 (was ``cond_loo``), one ``eigh`` of ``A``: a unit's energy inside the span of the
                  ``k - n`` largest eigen-directions, ``sum_{top} lambda_i v_ij^2``; units that carry the
                  small-eigenvalue (ill-conditioned) directions score low. Not a condition number.
``cond_greedy``   a score *defined on* the condition number ``kappa(M) = lambda_max(M) / lambda_min(M)``
                  of the damped contribution Gram ``M = A_S + lambda I`` of the kept set ``S``:

                      score_j = energy_j * kappa(M_{S-j}) / kappa(M_S)

                  (low when dropping j makes the mask-tuning system better conditioned and j carries
                  little energy), greedy backward elimination in chunks, re-scored after each chunk.
                  ``kappa(M_{S-j})`` is exact (one ``eigvalsh`` per unit) for ``|S| <= 64``; above,
                  a lower bound from one ``eigh`` of ``M_S`` per chunk: deleting row/column j, the
                  truncated extreme eigenvectors ``u`` (top) and ``v`` (bottom) are feasible vectors of
                  ``M_{S-j}``, so by Courant-Fischer and Cauchy interlacing
                  ``lambda_max' >= max((lambda_max (1 - 2 u_j^2) + u_j^2 M_jj) / (1 - u_j^2), lambda_{2nd max})``
                  and ``lambda_min' <= min((lambda_min (1 - 2 v_j^2) + v_j^2 M_jj) / (1 - v_j^2), lambda_{2nd min})``;
                  their ratio never exceeds the true ``kappa(M_{S-j})`` and equals it when ``M`` is
                  diagonal. First-order, the estimate falls most for the units that carry the
                  smallest eigen-direction (``v_j^2`` large), which is what the exact score rewards.
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
                           chunks: int = 0) -> torch.Tensor:
    """Greedy backward elimination scoring ``numer_j / (M^-1)_jj``, re-scored after every removal.

    ``chunks=0`` (default): one unit at a time, each removal a rank-1 downdate of the inverse of the
    kept block, ``M_S^-1 <- M_S^-1 - c c^T / c_j`` with ``c`` the removed unit's column (kept as a
    list of columns, ``O(k t)`` for the t-th removal), so of two redundant units the second is
    re-scored after the first goes and kept.
    ``chunks=N``: N chunks, each a Schur-complement update (cheaper, can drop both of a pair).
    Returns a rank score per unit (higher = keep): removed units in removal order first.
    """
    k = M.shape[0]
    inv = _damped_inverse(M, damp)
    alive = torch.ones(k, dtype=torch.bool)
    rank = torch.empty(k, dtype=torch.float64)
    numer = numer.double()
    if chunks <= 0:
        # The downdates are applied lazily: the current inverse is inv - sum_i u_i u_i^T / p_i over the
        # columns u_i (pivots p_i) removed so far, so a step costs O(k t), not a k x k update.
        diag = inv.diagonal().clone()
        U = torch.empty(k, max(n_remove, 0), dtype=inv.dtype)
        piv = torch.empty(max(n_remove, 0), dtype=inv.dtype)
        for pos in range(n_remove):
            score = torch.where(alive, numer / diag.clamp_min(1e-30), torch.inf)
            j = int(torch.argmin(score))
            rank[j] = pos
            alive[j] = False
            col = inv[:, j] - U[:, :pos] @ (U[j, :pos] / piv[:pos])
            U[:, pos], piv[pos] = col, col[j].clamp_min(1e-30)
            diag -= col * col / piv[pos]
        final_diag = diag
    else:
        _chunked_elimination(inv, numer, n_remove, chunks, alive, rank)
        final_diag = inv.diagonal()
    idx = alive.nonzero().squeeze(1)
    if len(idx):
        final = numer[idx] / final_diag[idx].clamp_min(1e-30)
        order = torch.argsort(torch.argsort(final)).double()
        rank[idx] = n_remove + order
    return rank


def _chunked_elimination(inv: torch.Tensor, numer: torch.Tensor, n_remove: int, chunks: int,
                         alive: torch.Tensor, rank: torch.Tensor) -> None:
    """``chunks`` removals of about ``n_remove / chunks`` units each (in place on ``inv``, ``alive``, ``rank``)."""
    pos = 0
    step = max(1, -(-n_remove // chunks)) if n_remove > 0 else 1
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


def rescale_obs(s: UnitStats, n_remove: int, damp: float = 0.01) -> torch.Tensor:
    return _greedy_inverse_scores(s.A, torch.ones(s.k, dtype=torch.float64), n_remove, damp)


def top_eig_energy(s: UnitStats, n_remove: int, damp: float = 0.01) -> torch.Tensor:
    A = s.A.double()
    evals, evecs = torch.linalg.eigh(A)  # ascending
    top = max(s.k - max(n_remove, 1), 1)
    return (evecs[:, -top:] ** 2 * evals[-top:].clamp_min(0)).sum(1)


def _damped(M: torch.Tensor, damp: float) -> torch.Tensor:
    M = M.double()
    lam = damp * M.diagonal().mean().clamp_min(1e-12)
    return M + lam * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)


def condition_number(M: torch.Tensor) -> float:
    """``lambda_max / lambda_min`` of a symmetric positive definite matrix (``inf`` when singular)."""
    ev = torch.linalg.eigvalsh(M.double())
    return float(ev[-1] / ev[0]) if ev[0] > 0 else float("inf")


EXACT_LOO_COND_MAX = 64
"""Up to this many kept units ``cond_greedy`` computes every leave-one-out condition number exactly."""


def loo_condition_numbers(M: torch.Tensor, exact: bool | None = None) -> torch.Tensor:
    """``kappa(M_{-j})`` for every j (``M`` SPD ``[k, k]``, ``M_{-j}`` without row and column j): exact,
    or the lower bound of the module docstring (default: exact up to :data:`EXACT_LOO_COND_MAX` units)."""
    M = M.double()
    k = M.shape[0]
    if k < 2:
        return torch.ones(k, dtype=torch.float64)
    if exact if exact is not None else k <= EXACT_LOO_COND_MAX:
        out = torch.empty(k, dtype=torch.float64)
        for j in range(k):
            keep = torch.cat([torch.arange(j), torch.arange(j + 1, k)])
            out[j] = condition_number(M[keep][:, keep])
        return out
    evals, evecs = torch.linalg.eigh(M)
    d = M.diagonal()
    u2, v2 = evecs[:, -1] ** 2, evecs[:, 0] ** 2
    rq_top = (evals[-1] * (1 - 2 * u2) + u2 * d) / (1 - u2).clamp_min(1e-12)
    rq_bot = (evals[0] * (1 - 2 * v2) + v2 * d) / (1 - v2).clamp_min(1e-12)
    lam_max = torch.maximum(torch.where(u2 < 1 - 1e-9, rq_top, evals[-2]), evals[-2])
    lam_min = torch.minimum(torch.where(v2 < 1 - 1e-9, rq_bot, evals[1]), evals[1])
    return lam_max / lam_min.clamp_min(1e-300)


def cond_greedy(s: UnitStats, n_remove: int, damp: float = 0.01, chunks: int = 8) -> torch.Tensor:
    M = _damped(s.A, damp)
    e = energy(s, n_remove)
    k = M.shape[0]
    alive = torch.ones(k, dtype=torch.bool)
    rank = torch.empty(k, dtype=torch.float64)
    pos = 0
    step = max(1, -(-n_remove // chunks)) if n_remove > 0 else k
    while True:
        idx = alive.nonzero().squeeze(1)
        sub = M[idx][:, idx]
        score = e[idx] * loo_condition_numbers(sub) / condition_number(sub)
        if pos >= n_remove or len(idx) <= 1:
            rank[idx] = n_remove + torch.argsort(torch.argsort(score)).double()
            return rank
        take = min(step, n_remove - pos)
        drop = idx[torch.argsort(score)[:take]]
        rank[drop] = torch.arange(pos, pos + take, dtype=torch.float64)
        pos += take
        alive[drop] = False


NEURON_CRITERIA: Registry[Callable[..., torch.Tensor]] = Registry("neuron criterion")
for _name, _fn in (("energy", energy), ("vif", vif), ("compensated", compensated), ("rescale_obs", rescale_obs),
                   ("top_eig_energy", top_eig_energy), ("cond_greedy", cond_greedy)):
    NEURON_CRITERIA.register(_name, _fn)

RENAMED_CRITERIA = {"mask_lsq": "rescale_obs", "cond_loo": "top_eig_energy"}
"""Old names refused with the new one: neither computes a condition number."""


def check_neuron_metric(name: str) -> None:
    """Raise for an unknown criterion, naming the new name of a renamed one."""
    if name in RENAMED_CRITERIA:
        raise ValueError(f"neuron_metric {name!r} was renamed {RENAMED_CRITERIA[name]!r} (it is not a condition "
                         f"number); the condition-number criterion is 'cond_greedy'")
    NEURON_CRITERIA.get(name)


def removal_order(criterion: str, stats: UnitStats, n_remove: int, damp: float = 0.01) -> list[int]:
    """The ``n_remove`` least important units under ``criterion`` (indices, ascending importance)."""
    check_neuron_metric(criterion)
    scores = NEURON_CRITERIA.get(criterion)(stats, n_remove, damp)
    return torch.argsort(scores)[:n_remove].tolist()
