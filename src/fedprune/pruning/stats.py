"""Statistics gathered batch by batch while a layer runs on calibration data.

Nothing here keeps activations: each collector turns a batch into the small matrices the
criteria and mask tuning need (``k x k`` Grams, ``k`` vectors and ``k x d`` mean
contributions), then drops it.

Whatever the model's dtype (float32, bfloat16, float16) and device, every sum is formed in
float64 where the activations are (a CUDA model computes its products on the GPU) and kept on
the CPU: the criteria and the least-squares solves of mask tuning then run in float64 on
the CPU, identical for every dtype of the weights.

Mask tuning may fit one of several *targets* ``e_t`` (``mask_tuning``): the accumulator keeps
``c = sum_t U_t e_t``, ``sum_t ||e_t||^2`` and ``sum_t e_t`` for each named target, so the error
of one fitted solution can be reported against every target (e.g. the fitted one and the
fixable one) without a second pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .criteria.neuron import UnitStats
from .mask_tuning import MaskSystem


@dataclass
class GramAccumulator:
    """Second moments of unit activations and the least-squares systems of mask tuning."""

    k: int
    targets: tuple[str, ...] = ("global",)
    G: torch.Tensor = field(init=False)  # sum_t h h^T (channels) / contribution Gram (heads)
    A: torch.Tensor | None = None  # contribution Gram (heads: = G; channels: formed later)
    s: torch.Tensor = field(init=False)  # sum_t h_t (channels) / sum_t ||U_t,j|| (heads)
    su: torch.Tensor | None = None  # heads: sum_t U_t [k, d] (channels: derived from s and W)
    ubar: torch.Tensor | None = None  # mean contribution per unit [k, d], set by unit_stats_*
    c: dict[str, torch.Tensor] = field(init=False)
    e2: dict[str, float] = field(init=False)
    se: dict[str, torch.Tensor | None] = field(init=False)
    n: int = 0

    def __post_init__(self):
        self.G = torch.zeros(self.k, self.k, dtype=torch.float64)
        self.s = torch.zeros(self.k, dtype=torch.float64)
        self.c = {t: torch.zeros(self.k, dtype=torch.float64) for t in self.targets}
        self.e2 = {t: 0.0 for t in self.targets}
        self.se = {t: None for t in self.targets}

    def _targets(self, e) -> dict[str, torch.Tensor]:
        e = {self.targets[0]: e} if isinstance(e, torch.Tensor) else e
        if sorted(e) != sorted(self.targets):
            raise ValueError(f"targets {sorted(e)} given, accumulator expects {sorted(self.targets)}")
        return e

    def _add_target(self, name: str, e: torch.Tensor, ce: torch.Tensor) -> None:
        self.c[name] += ce.to(self.c[name].device)
        self.e2[name] += float((e * e).sum())
        se = e.sum(0).to(self.G.device)
        self.se[name] = se if self.se[name] is None else self.se[name] + se

    def add_channels(self, h: torch.Tensor, W: torch.Tensor, e) -> None:
        """FFN channels. ``h``: ``[T, k]`` activations; ``W``: ``[d, k]`` output weight; ``e``: ``[T, d]``
        target (or a dict of named targets)."""
        h, Wd = h.double(), W.detach().double()
        self.G += (h.T @ h).to(self.G.device)
        self.s += h.sum(0).to(self.s.device)
        for name, et in self._targets(e).items():
            et = et.double()
            self._add_target(name, et, ((et @ Wd) * h).sum(0))
        self.n += h.shape[0]

    def add_heads(self, a: torch.Tensor, W: torch.Tensor, e, head_dim: int, chunk: int = 1024) -> None:
        """Attention heads. ``a``: ``[T, H*hd]`` head outputs; ``W``: ``[d, H*hd]`` o_proj; ``e``: ``[T, d]``
        (or a dict of named targets)."""
        T = a.shape[0]
        H = a.shape[1] // head_dim
        Wh = W.detach().double().reshape(W.shape[0], H, head_dim)
        es = self._targets(e)
        if self.su is None:
            self.su = torch.zeros(H, W.shape[0], dtype=torch.float64)
        for t in range(0, T, chunk):  # U is T x H x d: bounded by chunking the tokens
            ac = a[t:t + chunk].double().reshape(-1, H, head_dim)
            U = torch.einsum("thk,dhk->thd", ac, Wh)  # each head's contribution to the output
            self.G += torch.einsum("thd,tgd->hg", U, U).to(self.G.device)
            self.s += U.norm(dim=-1).sum(0).to(self.s.device)
            self.su += U.sum(0).to(self.su.device)
            for name, et in es.items():
                ec = et[t:t + chunk].double()
                self._add_target(name, ec, torch.einsum("thd,td->h", U, ec))
        self.n += T

    def merged(self, other: "GramAccumulator") -> "GramAccumulator":
        """The accumulator of both token sets (sums add)."""
        out = GramAccumulator(self.k, self.targets)
        out.G, out.s, out.n = self.G + other.G, self.s + other.s, self.n + other.n
        out.su = self.su if other.su is None else (other.su if self.su is None else self.su + other.su)
        for t in self.targets:
            out.c[t] = self.c[t] + other.c[t]
            out.e2[t] = self.e2[t] + other.e2[t]
            a, b = self.se[t], other.se[t]
            out.se[t] = a if b is None else (b if a is None else a + b)
        return out

    def unit_stats_channels(self, W: torch.Tensor) -> UnitStats:
        W = W.detach().double().to(self.G.device)
        wtw = W.T @ W
        A = wtw * self.G
        self.A = A
        mean = self.s / max(self.n, 1)
        self.ubar = W.T * mean.unsqueeze(1)  # [k, d]: mean of h_j w_j
        return UnitStats(G=self.G, w_norm2=wtw.diagonal().clone(), A=A, mean=mean, n=self.n)

    def unit_stats_heads(self) -> UnitStats:
        self.A = self.G
        self.ubar = self.su / max(self.n, 1) if self.su is not None else None
        return UnitStats(G=self.G, w_norm2=torch.ones(self.k, dtype=torch.float64), A=self.G, mean=None, n=self.n)

    def system(self, target: str, keep: list[int]) -> MaskSystem:
        """The mask-tuning system of the kept units ``keep`` for ``target`` (after ``unit_stats_*``)."""
        if self.A is None:
            raise RuntimeError("call unit_stats_channels / unit_stats_heads before system()")
        idx = torch.as_tensor(keep, dtype=torch.long)
        n = max(self.n, 1)
        se = self.se[target]
        return MaskSystem(A=self.A[idx][:, idx], c=self.c[target][idx], e2=self.e2[target], n=self.n,
                          ubar=self.ubar[idx] if self.ubar is not None else None,
                          ebar=se / n if se is not None else None)


def flat_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def linear_bias(lin: nn.Linear) -> torch.Tensor | float:
    return lin.bias.detach() if lin.bias is not None else 0.0
