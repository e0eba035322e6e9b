"""Mask tuning: recover a pruned layer's output with one real scale per kept unit.

After Kwon et al. (2022), without gradients: for the kept units ``S`` of a layer find
scales ``m`` minimising

    f(m) = sum_t || sum_{i in S} m_i u_{t,i} - e_t ||^2

where ``u_{t,i}`` is unit i's contribution to the layer output on token t (computed from the
pruned model's own inputs) and ``e_t`` the part of the *dense* layer's output the units must
reproduce. With ``A = sum_t U_t U_t^T`` and ``c = sum_t U_t e_t`` the normal equations are
``A m = c``. We solve the damped problem ``min f(m) + lam ||m - 1||^2``:

    m = 1 + (A + lam I)^-1 (c - A 1)

which never increases ``f`` over ``m = 1`` (the unpruned scales), and reject the solution
(keep ``m = 1``) when the damped system is ill conditioned or any ``|m_i| > max_scale``.
The scales are folded into the output projection's columns: the architecture is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MaskSolution:
    scales: torch.Tensor
    accepted: bool
    reason: str
    error_before: float
    error_after: float
    cond: float


def reconstruction_error(A: torch.Tensor, c: torch.Tensor, e2: float, m: torch.Tensor) -> float:
    """``f(m) = m^T A m - 2 c^T m + sum_t ||e_t||^2``."""
    A, c, m = A.double(), c.double(), m.double()
    return float(m @ A @ m - 2 * c @ m + e2)


def condition_estimate(M: torch.Tensor, chol: torch.Tensor, iters: int = 30) -> float:
    """2-norm condition number of SPD ``M`` from power / inverse-power iteration.

    ``O(iters n^2)`` with the Cholesky factor ``chol`` instead of an ``O(n^3)`` eigensolve;
    both iterations approach their extreme eigenvalue from inside, so this slightly
    *under*-estimates the condition number.
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(M.shape[0], 1, dtype=M.dtype, generator=g).to(M.device)
    u = v.clone()
    lam_max = lam_min_inv = 0.0
    for _ in range(iters):
        v = M @ v
        lam_max = float(v.norm())
        v = v / lam_max
        u = torch.cholesky_solve(u, chol)
        lam_min_inv = float(u.norm())
        u = u / lam_min_inv
    return lam_max * lam_min_inv


def solve_mask(A: torch.Tensor, c: torch.Tensor, e2: float, damp: float = 0.01, max_scale: float = 10.0,
               max_cond: float = 1e8) -> MaskSolution:
    """Closed-form damped least squares for the scales (see module docstring)."""
    A, c = A.double(), c.double()
    k = A.shape[0]
    ones = torch.ones(k, dtype=torch.float64, device=A.device)
    before = reconstruction_error(A, c, e2, ones)
    lam = damp * float(A.diagonal().mean().clamp_min(1e-12))
    M = A + lam * torch.eye(k, dtype=A.dtype, device=A.device)
    chol, info = torch.linalg.cholesky_ex(M)
    cond = float("inf") if int(info) != 0 else condition_estimate(M, chol)
    if not cond < max_cond:
        return MaskSolution(ones, False, f"ill conditioned (cond {cond:.3g} > {max_cond:.3g})", before, before, cond)
    m = ones + torch.cholesky_solve((c - A @ ones).unsqueeze(1), chol).squeeze(1)
    if not torch.isfinite(m).all():
        return MaskSolution(ones, False, "non-finite solution", before, before, cond)
    if m.abs().max() > max_scale:
        return MaskSolution(ones, False, f"scale {float(m.abs().max()):.3g} exceeds {max_scale}", before, before, cond)
    after = reconstruction_error(A, c, e2, m)
    return MaskSolution(m, True, "ok", before, after, cond)


@torch.no_grad()
def fold_column_scales(lin: nn.Linear, scales: torch.Tensor, group: int = 1) -> None:
    """Multiply input columns of ``lin`` by ``scales`` (each scale covers ``group`` columns)."""
    s = scales.to(lin.weight.dtype).to(lin.weight.device).repeat_interleave(group)
    lin.weight.mul_(s.unsqueeze(0))
