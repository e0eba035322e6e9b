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
(keep ``m = 1``) when the damped system is not positive definite, the solution is not finite,
or any ``|m_i| > max_scale``.
The scales are folded into the output projection's columns: the architecture is unchanged.
The systems are solved in float64 (``A`` and ``c`` come from float64 accumulators,
``pruning.stats``), whatever the model's dtype; only the folded scales take the weights' dtype.

Variants (``fit_scales``; COMP's options choose, the benchmark compares them):

- *target*: ``global`` ``e_t = y_t - x_t - b`` (the dense model's layer output minus the pruned
  model's own residual input) carries the drift inherited from every earlier pruned layer,
  which per-unit scales of *this* layer can barely undo; ``local`` ``e_t`` = the dense
  (unpruned) module's output on the *same* pruned-model inputs, so only the error this layer's
  own pruning made is fitted (the *fixable* error: ``f(1)`` under the local target).
- *bias*: a per-output constant ``beta`` fitted jointly, ``min_{m, beta} sum_t ||U_t m + beta - e_t||^2``.
  Eliminating ``beta = ebar - Ubar^T m`` leaves the centred system ``A_c = A - n Ubar Ubar^T``,
  ``c_c = c - n Ubar ebar`` (``Ubar`` ``[k, d]``: each unit's mean contribution, ``ebar`` the
  target's mean); ``beta`` also takes the removed units' mean output (FLAP's compensation).
- *fallback*: ``reject`` keeps ``m = 1`` when a scale exceeds ``max_scale``; ``retry`` raises the
  damping tenfold (up to ``retries`` times; the ridge path shrinks ``m`` toward 1) first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MaskSystem:
    """One layer's mask-tuning system over ``n`` tokens: ``A = sum_t U_t^T U_t`` ``[k, k]``,
    ``c = sum_t U_t^T e_t`` ``[k]``, ``e2 = sum_t ||e_t||^2``; ``ubar`` ``[k, d]`` the mean contribution
    of each unit and ``ebar`` ``[d]`` the mean target (needed only for the bias term)."""

    A: torch.Tensor
    c: torch.Tensor
    e2: float
    n: int = 1
    ubar: torch.Tensor | None = None
    ebar: torch.Tensor | None = None


def system_error(s: MaskSystem, m: torch.Tensor, beta: torch.Tensor | None = None) -> float:
    """``f(m, beta) = sum_t ||U_t m + beta - e_t||^2`` from the system's moments:
    ``m^T A m - 2 c^T m + e2 + n (2 beta^T Ubar^T m - 2 beta^T ebar + ||beta||^2)``."""
    f = reconstruction_error(s.A, s.c, s.e2, m)
    if beta is not None:
        b, m = beta.double(), m.double()
        f += s.n * float(2 * b @ (s.ubar.double().T @ m) - 2 * b @ s.ebar.double() + b @ b)
    return f


@dataclass
class MaskFit:
    scales: torch.Tensor
    bias: torch.Tensor | None
    accepted: bool
    reason: str
    damp: float  # relative damping actually used
    error_before: float  # f(1), no bias
    error_after: float  # f(m, beta) on the fitted system (= error_before when rejected)


def fit_scales(s: MaskSystem, damp: float = 0.01, bias: bool = False, max_scale: float = 10.0,
               fallback: str = "reject", retries: int = 4) -> MaskFit:
    """Damped least squares for the scales (and optionally a bias), see module docstring."""
    if fallback not in ("reject", "retry"):
        raise ValueError(f"mask-tuning fallback must be 'reject' or 'retry', got {fallback!r}")
    A, c = s.A.double(), s.c.double()
    k = A.shape[0]
    ones = torch.ones(k, dtype=torch.float64, device=A.device)
    before = system_error(s, ones)
    if bias:
        if s.ubar is None or s.ebar is None:
            raise ValueError("a bias term needs the system's mean contributions (ubar) and mean target (ebar)")
        ub, eb = s.ubar.double(), s.ebar.double()
        A = A - s.n * ub @ ub.T
        c = c - s.n * ub @ eb
    scale = float(A.diagonal().mean().clamp_min(1e-12))
    d, reason = damp, ""
    for _ in range(retries + 1 if fallback == "retry" else 1):
        M = A + d * scale * torch.eye(k, dtype=A.dtype, device=A.device)
        chol, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0:
            reason = "not positive definite"
        else:
            m = ones + torch.cholesky_solve((c - A @ ones).unsqueeze(1), chol).squeeze(1)
            if not torch.isfinite(m).all():
                reason = "non-finite solution"
            elif m.abs().max() > max_scale:
                reason = f"scale {float(m.abs().max()):.3g} exceeds {max_scale}"
            else:
                beta = (s.ebar.double() - s.ubar.double().T @ m) if bias else None
                return MaskFit(m, beta, True, "ok", d, before, system_error(s, m, beta))
        d *= 10.0
    return MaskFit(ones, None, False, reason, d / 10.0, before, before)


def reconstruction_error(A: torch.Tensor, c: torch.Tensor, e2: float, m: torch.Tensor) -> float:
    """``f(m) = m^T A m - 2 c^T m + sum_t ||e_t||^2``."""
    A, c, m = A.double(), c.double(), m.double()
    return float(m @ A @ m - 2 * c @ m + e2)


@torch.no_grad()
def fold_column_scales(lin: nn.Linear, scales: torch.Tensor, group: int = 1) -> None:
    """Multiply input columns of ``lin`` by ``scales`` (each scale covers ``group`` columns)."""
    s = scales.to(lin.weight.dtype).to(lin.weight.device).repeat_interleave(group)
    lin.weight.mul_(s.unsqueeze(0))
