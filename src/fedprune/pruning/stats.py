"""Statistics gathered batch by batch while a layer runs on calibration data.

Nothing here keeps activations: each collector turns a batch into the small matrices the
criteria and mask tuning need (``k x k`` Grams and ``k`` vectors), then drops it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .criteria.neuron import UnitStats


@dataclass
class GramAccumulator:
    """Second moments of unit activations and their least-squares system for mask tuning."""

    k: int
    G: torch.Tensor = field(init=False)  # sum_t h h^T (channels) / contribution Gram (heads)
    A: torch.Tensor | None = None  # contribution Gram (heads: = G; channels: formed later)
    c: torch.Tensor = field(init=False)  # sum_t U_t e_t
    s: torch.Tensor = field(init=False)  # sum_t h_t
    e2: float = 0.0
    n: int = 0

    def __post_init__(self):
        self.G = torch.zeros(self.k, self.k, dtype=torch.float64)
        self.c = torch.zeros(self.k, dtype=torch.float64)
        self.s = torch.zeros(self.k, dtype=torch.float64)

    def add_channels(self, h: torch.Tensor, W: torch.Tensor, e: torch.Tensor) -> None:
        """FFN channels. ``h``: ``[T, k]`` activations; ``W``: ``[d, k]`` output weight; ``e``: ``[T, d]`` target."""
        h, e = h.double(), e.double()
        self.G += h.T @ h
        self.s += h.sum(0)
        self.c += ((e @ W.double()) * h).sum(0)
        self.e2 += float((e * e).sum())
        self.n += h.shape[0]

    def add_heads(self, a: torch.Tensor, W: torch.Tensor, e: torch.Tensor, head_dim: int, chunk: int = 1024) -> None:
        """Attention heads. ``a``: ``[T, H*hd]`` head outputs; ``W``: ``[d, H*hd]`` o_proj; ``e``: ``[T, d]``."""
        T = a.shape[0]
        H = a.shape[1] // head_dim
        Wh = W.detach().double().reshape(W.shape[0], H, head_dim)
        for t in range(0, T, chunk):  # U is T x H x d: bounded by chunking the tokens
            ac = a[t:t + chunk].double().reshape(-1, H, head_dim)
            ec = e[t:t + chunk].double()
            U = torch.einsum("thk,dhk->thd", ac, Wh)  # each head's contribution to the output
            self.G += torch.einsum("thd,tgd->hg", U, U)
            self.s += U.norm(dim=-1).sum(0)
            self.c += torch.einsum("thd,td->h", U, ec)
            self.e2 += float((ec * ec).sum())
        self.n += T

    def unit_stats_channels(self, W: torch.Tensor) -> UnitStats:
        W = W.double()
        wtw = W.T @ W
        A = wtw * self.G
        self.A = A
        return UnitStats(G=self.G, w_norm2=wtw.diagonal().clone(), A=A, mean=self.s / max(self.n, 1), n=self.n)

    def unit_stats_heads(self) -> UnitStats:
        self.A = self.G
        return UnitStats(G=self.G, w_norm2=torch.ones(self.k, dtype=torch.float64), A=self.G, mean=None, n=self.n)


def flat_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def linear_bias(lin: nn.Linear) -> torch.Tensor | float:
    return lin.bias.detach() if lin.bias is not None else 0.0
