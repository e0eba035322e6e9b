"""Per-device configuration choosers for FedSpine: which (pruning ratio p, LoRA rank r).

One chooser per device. All share a small interface (``ConfigChooser``):

- ``select(pending=()) -> Arm``: the next configuration; an ``Arm`` unpacks as ``p, r = arm``.
  ``pending`` are arms handed out whose rewards have not come back yet (a shared bandit
  choosing for several devices of one round): each counts as a pull without a reward, so
  its exploration bonus shrinks and a batch spreads over the promising cells instead of
  sending every device to the same one (the mean is left alone, a "believer" batch UCB);
- ``update(arm, reward)``: feed back the reward observed for that arm (rewards in [0, 1],
  see ``fedspine.reward``); feedback may arrive late or out of order; ``t`` counts them;
- ``state_dict()`` / ``load_state_dict()``: JSON-serialisable checkpoints, RNG included.

Choosers:

- ``SmoothUCB`` ("s-ucb", *reconstruction* of FedSpine's S-UCB): the normalised space
  ``[0, 1]^2`` (p axis, r axis) is partitioned adaptively into rectangular cells. With
  ``t`` the number of rewards seen so far plus one, each cell C gets the index

      U(C) = mean(C) + c * sqrt(ln t / n(C)) + L * diam(C)

  (``U = +inf`` while ``n(C) = 0``). The cell with the largest index is chosen and a point
  drawn uniformly inside it. ``L * diam(C)`` is the Lipschitz slack: a big cell may hold a
  better point than its mean says. A cell at depth ``d`` splits into 2 halves along its
  longest side (or 4 quarters) once it holds ``k_d = ceil(k0 * growth^d)`` real rewards;
  the children take over the parent's observations that fall inside them, and a child
  that receives none inherits the parent's mean as one pseudo-observation (the
  smoothness assumption says it is within ``L * diam(parent)`` of the truth).
- ``UCB1Grid`` ("ucb1-grid"): UCB1 over a fixed grid of (p, r) arms.
- ``RandomChooser`` ("random"): uniform over the space (a baseline).

Rank handling: with ``ranks`` given (e.g. ``(4, 8, 16, 32)``) the r axis is cut into
``len(ranks)`` equal bins, one per allowed rank; otherwise every integer in
``[r_min, r_max]`` gets a bin. A sampled coordinate maps to its bin, so every allowed
rank is equally likely under uniform sampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from ..registry import Registry


@dataclass(frozen=True)
class Arm:
    """A configuration: pruning ratio ``p`` and LoRA rank ``r``.

    ``point`` is the chooser's internal position in ``[0, 1]^2`` (kept so the reward
    lands in the cell the sample came from); ``p, r = arm`` works like a tuple.
    """

    p: float
    r: int
    point: tuple[float, float] | None = None

    def __iter__(self) -> Iterator[float | int]:
        return iter((self.p, self.r))

    def to_dict(self) -> dict[str, Any]:
        return {"p": self.p, "r": self.r, "point": list(self.point) if self.point is not None else None}


@runtime_checkable
class ConfigChooser(Protocol):
    t: int  # rewards received so far

    def select(self, pending: Sequence[Arm] = ()) -> Arm: ...

    def update(self, arm: Arm | tuple[float, int], reward: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


CHOOSERS: Registry[type] = Registry("configuration chooser")


class _Space:
    """Maps between (p, r) and the unit square."""

    def __init__(self, p_range: tuple[float, float], r_range: tuple[int, int] | None,
                 ranks: Sequence[int] | None):
        p_min, p_max = float(p_range[0]), float(p_range[1])
        if not 0.0 <= p_min <= p_max < 1.0:
            raise ValueError(f"need 0 <= p_min <= p_max < 1, got p_range={p_range}")
        if ranks is not None:
            rk = sorted({int(r) for r in ranks})
            if not rk or rk[0] < 1:
                raise ValueError(f"ranks must be positive integers, got {ranks}")
        else:
            if r_range is None:
                raise ValueError("give r_range=(r_min, r_max) or ranks=[...]")
            r_min, r_max = int(r_range[0]), int(r_range[1])
            if not 1 <= r_min <= r_max:
                raise ValueError(f"need 1 <= r_min <= r_max, got r_range={r_range}")
            rk = list(range(r_min, r_max + 1))
        self.p_min, self.p_max, self.ranks = p_min, p_max, rk

    def to_arm(self, u: float, v: float) -> Arm:
        p = self.p_min + u * (self.p_max - self.p_min)
        i = min(int(v * len(self.ranks)), len(self.ranks) - 1)
        return Arm(float(p), int(self.ranks[i]), (float(u), float(v)))

    def to_point(self, arm: Arm | tuple[float, int]) -> tuple[float, float]:
        if isinstance(arm, Arm) and arm.point is not None:
            return arm.point
        p, r = tuple(arm)[:2]
        span = self.p_max - self.p_min
        u = 0.5 if span == 0 else (float(p) - self.p_min) / span
        i = int(np.argmin([abs(x - r) for x in self.ranks]))
        v = (i + 0.5) / len(self.ranks)
        return (min(max(u, 0.0), 1.0), min(max(v, 0.0), 1.0))

    def r_bins(self) -> int:
        return len(self.ranks)


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return rng.bit_generator.state


def _set_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state


@dataclass
class _Cell:
    lo: list[float]
    hi: list[float]
    depth: int
    obs: list[tuple[float, float, float]]  # (u, v, reward) real observations in this cell
    pseudo_n: int = 0
    pseudo_sum: float = 0.0

    @property
    def n(self) -> int:
        return len(self.obs) + self.pseudo_n

    @property
    def mean(self) -> float:
        n = self.n
        return (sum(o[2] for o in self.obs) + self.pseudo_sum) / n if n else 0.0

    def diam(self) -> float:
        return max(self.hi[0] - self.lo[0], self.hi[1] - self.lo[1])

    def contains(self, u: float, v: float) -> bool:
        def inside(x: float, a: float, b: float) -> bool:
            return a <= x < b or (b >= 1.0 and x == 1.0)

        return inside(u, self.lo[0], self.hi[0]) and inside(v, self.lo[1], self.hi[1])

    def to_dict(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, "depth": self.depth, "obs": [list(o) for o in self.obs],
                "pseudo_n": self.pseudo_n, "pseudo_sum": self.pseudo_sum}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "_Cell":
        return cls(list(d["lo"]), list(d["hi"]), int(d["depth"]), [tuple(o) for o in d["obs"]],
                   int(d["pseudo_n"]), float(d["pseudo_sum"]))


@CHOOSERS.register("s-ucb")
class SmoothUCB:
    """S-UCB over the continuous (p, r) space with adaptive cell splitting (see module doc).

    Args:
        p_range: ``(p_min, p_max)`` pruning ratios.
        r_range: ``(r_min, r_max)`` integer ranks, or ``ranks``: the allowed rank set.
        c: exploration weight of ``sqrt(ln t / n)``.
        lipschitz: ``L``, weight of a cell's diameter (max side in unit coordinates).
        init_grid: ``(cells along p, cells along r)`` to start from.
        split_k0, split_growth: a depth-``d`` cell splits after ``ceil(k0 * growth^d)`` rewards.
        split_into: 2 (halve the longest side) or 4 (quarter).
        max_depth: cells never split deeper than this.
        seed: RNG seed.
    """

    def __init__(self, p_range: tuple[float, float] = (0.1, 0.6), r_range: tuple[int, int] | None = (2, 32),
                 ranks: Sequence[int] | None = None, c: float = 0.5, lipschitz: float = 0.3,
                 init_grid: tuple[int, int] = (2, 2), split_k0: float = 3.0, split_growth: float = 1.5,
                 split_into: int = 2, max_depth: int = 12, seed: int = 0):
        if split_into not in (2, 4):
            raise ValueError(f"split_into must be 2 or 4, got {split_into}")
        if c < 0 or lipschitz < 0:
            raise ValueError(f"c and lipschitz must be >= 0, got c={c}, lipschitz={lipschitz}")
        if split_k0 <= 0 or split_growth < 1:
            raise ValueError("need split_k0 > 0 and split_growth >= 1")
        self.space = _Space(p_range, r_range, ranks)
        self.c, self.lipschitz = float(c), float(lipschitz)
        self.split_k0, self.split_growth = float(split_k0), float(split_growth)
        self.split_into, self.max_depth = int(split_into), int(max_depth)
        self.rng = np.random.default_rng(seed)
        self.t = 0  # rewards received
        gp, gr = int(init_grid[0]), max(1, min(int(init_grid[1]), self.space.r_bins()))
        self.cells: list[_Cell] = []
        for i in range(gp):
            for j in range(gr):
                self.cells.append(_Cell([i / gp, j / gr], [(i + 1) / gp, (j + 1) / gr], 0, []))

    # ---- index and choice -------------------------------------------------------
    def index(self, cell: _Cell, pending: int = 0, n_pending: int = 0) -> float:
        """``U(C) = mean + c sqrt(ln t / n) + L diam``; ``+inf`` for an unvisited cell.

        ``pending``: pulls of this cell awaiting their reward (they count in ``n``; an unvisited
        cell with pending pulls takes the mean of all rewards so far); ``n_pending``: all of them.
        """
        n = cell.n + pending
        if n == 0:
            return math.inf
        t = self.t + n_pending + 1
        mean = cell.mean if cell.n else self._overall_mean()
        return mean + self.c * math.sqrt(math.log(t) / n) + self.lipschitz * cell.diam()

    def _overall_mean(self) -> float:
        rewards = [o[2] for cell in self.cells for o in cell.obs]
        return sum(rewards) / len(rewards) if rewards else 0.5

    def select(self, pending: Sequence[Arm] = ()) -> Arm:
        counts = [0] * len(self.cells)
        for arm in pending:
            counts[self._find(*self.space.to_point(arm))] += 1
        idx = np.array([self.index(cell, counts[i], len(pending)) for i, cell in enumerate(self.cells)])
        best = np.flatnonzero(idx == idx.max())
        cell = self.cells[int(self.rng.choice(best))]
        u = self.rng.uniform(cell.lo[0], cell.hi[0])
        v = self.rng.uniform(cell.lo[1], cell.hi[1])
        return self.space.to_arm(u, v)

    # ---- feedback ---------------------------------------------------------------
    def _find(self, u: float, v: float) -> int:
        for i, cell in enumerate(self.cells):
            if cell.contains(u, v):
                return i
        raise AssertionError(f"point ({u}, {v}) lies in no cell")  # cells tile the square

    def split_threshold(self, depth: int) -> int:
        return math.ceil(self.split_k0 * self.split_growth ** depth)

    def update(self, arm: Arm | tuple[float, int], reward: float) -> None:
        u, v = self.space.to_point(arm)
        i = self._find(u, v)
        cell = self.cells[i]
        cell.obs.append((u, v, float(reward)))
        self.t += 1
        if len(cell.obs) >= self.split_threshold(cell.depth) and cell.depth < self.max_depth:
            children = self._split(cell)
            if children:
                self.cells[i:i + 1] = children

    def _can_split_r(self, cell: _Cell) -> bool:
        # the r axis is quantised into bins; a cell inside one bin cannot be told apart by r
        nb = self.space.r_bins()
        return math.floor(cell.lo[1] * nb + 1e-9) < math.ceil(cell.hi[1] * nb - 1e-9) - 1

    def _split(self, cell: _Cell) -> list[_Cell]:
        can_r = self._can_split_r(cell)
        wp, wr = cell.hi[0] - cell.lo[0], cell.hi[1] - cell.lo[1]
        mid_p = (cell.lo[0] + cell.hi[0]) / 2
        if can_r:
            # split the r side on a bin edge so no rank straddles two children
            nb = self.space.r_bins()
            a, b = math.floor(cell.lo[1] * nb + 1e-9), math.ceil(cell.hi[1] * nb - 1e-9)
            mid_r = ((a + b) // 2) / nb
        if self.split_into == 4 and can_r:
            boxes = [([cell.lo[0], cell.lo[1]], [mid_p, mid_r]), ([mid_p, cell.lo[1]], [cell.hi[0], mid_r]),
                     ([cell.lo[0], mid_r], [mid_p, cell.hi[1]]), ([mid_p, mid_r], [cell.hi[0], cell.hi[1]])]
        elif can_r and wr >= wp:
            boxes = [([cell.lo[0], cell.lo[1]], [cell.hi[0], mid_r]), ([cell.lo[0], mid_r], [cell.hi[0], cell.hi[1]])]
        else:
            boxes = [([cell.lo[0], cell.lo[1]], [mid_p, cell.hi[1]]), ([mid_p, cell.lo[1]], [cell.hi[0], cell.hi[1]])]
        parent_mean = cell.mean
        children = []
        for lo, hi in boxes:
            child = _Cell(lo, hi, cell.depth + 1, [])
            child.obs = [o for o in cell.obs if child.contains(o[0], o[1])]
            if not child.obs:
                child.pseudo_n, child.pseudo_sum = 1, parent_mean
            children.append(child)
        return children

    # ---- introspection and checkpoints ---------------------------------------------
    def best_cell(self) -> tuple[tuple[float, float], tuple[float, float], float]:
        """Bounds (in (p, r) units) and mean of the most-pulled leaf: the current belief."""
        cell = max(self.cells, key=lambda c: (len(c.obs), c.mean))
        sp = self.space
        to_p = lambda x: sp.p_min + x * (sp.p_max - sp.p_min)  # noqa: E731
        to_r = lambda x: sp.ranks[0] + x * (sp.ranks[-1] - sp.ranks[0])  # noqa: E731
        return (to_p(cell.lo[0]), to_p(cell.hi[0])), (to_r(cell.lo[1]), to_r(cell.hi[1])), cell.mean

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "s-ucb", "t": self.t, "cells": [c.to_dict() for c in self.cells],
                "rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "s-ucb":
            raise ValueError(f"not an s-ucb state (kind={state.get('kind')!r})")
        self.t = int(state["t"])
        self.cells = [_Cell.from_dict(d) for d in state["cells"]]
        _set_rng_state(self.rng, state["rng"])


@CHOOSERS.register("ucb1-grid")
class UCB1Grid:
    """UCB1 over a fixed grid ``p_values x r_values``: ``mean + c sqrt(ln t / n)``, untried arms first."""

    def __init__(self, p_values: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
                 r_values: Sequence[int] = (4, 8, 16, 32), c: float = 0.5, seed: int = 0):
        if not p_values or not r_values:
            raise ValueError("p_values and r_values must be non-empty")
        if any(not 0.0 <= p < 1.0 for p in p_values) or any(int(r) < 1 for r in r_values):
            raise ValueError("need 0 <= p < 1 and r >= 1 for every grid value")
        self.arms = [(float(p), int(r)) for p in p_values for r in r_values]
        self.c = float(c)
        self.rng = np.random.default_rng(seed)
        self.n = [0] * len(self.arms)
        self.sums = [0.0] * len(self.arms)
        self.t = 0

    def index(self, i: int, pending: int = 0, n_pending: int = 0) -> float:
        n = self.n[i] + pending
        if n == 0:
            return math.inf
        mean = self.sums[i] / self.n[i] if self.n[i] else sum(self.sums) / max(sum(self.n), 1)
        return mean + self.c * math.sqrt(math.log(self.t + n_pending + 1) / n)

    def _nearest(self, arm: Arm | tuple[float, int]) -> int:
        p, r = tuple(arm)[:2]
        return min(range(len(self.arms)), key=lambda j: (abs(self.arms[j][0] - p), abs(self.arms[j][1] - r)))

    def select(self, pending: Sequence[Arm] = ()) -> Arm:
        counts = [0] * len(self.arms)
        for arm in pending:
            counts[self._nearest(arm)] += 1
        idx = np.array([self.index(i, counts[i], len(pending)) for i in range(len(self.arms))])
        i = int(self.rng.choice(np.flatnonzero(idx == idx.max())))
        return Arm(*self.arms[i])

    def update(self, arm: Arm | tuple[float, int], reward: float) -> None:
        i = self._nearest(arm)
        self.n[i] += 1
        self.sums[i] += float(reward)
        self.t += 1

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "ucb1-grid", "arms": [list(a) for a in self.arms], "n": list(self.n),
                "sums": list(self.sums), "t": self.t, "rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "ucb1-grid":
            raise ValueError(f"not a ucb1-grid state (kind={state.get('kind')!r})")
        if [tuple(a) for a in state["arms"]] != self.arms:
            raise ValueError("checkpoint grid differs from this chooser's grid")
        self.n, self.sums, self.t = list(state["n"]), list(state["sums"]), int(state["t"])
        _set_rng_state(self.rng, state["rng"])


@CHOOSERS.register("random")
class RandomChooser:
    """Uniform over ``[p_min, p_max]`` and the allowed ranks; ignores rewards."""

    def __init__(self, p_range: tuple[float, float] = (0.1, 0.6), r_range: tuple[int, int] | None = (2, 32),
                 ranks: Sequence[int] | None = None, seed: int = 0):
        self.space = _Space(p_range, r_range, ranks)
        self.rng = np.random.default_rng(seed)
        self.t = 0

    def select(self, pending: Sequence[Arm] = ()) -> Arm:
        return self.space.to_arm(self.rng.uniform(), self.rng.uniform())

    def update(self, arm: Arm | tuple[float, int], reward: float) -> None:
        self.t += 1

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "random", "t": self.t, "rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "random":
            raise ValueError(f"not a random-chooser state (kind={state.get('kind')!r})")
        self.t = int(state["t"])
        _set_rng_state(self.rng, state["rng"])


def make_chooser(name: str, **kwargs: Any) -> ConfigChooser:
    """Build a registered chooser by name (``s-ucb``, ``ucb1-grid``, ``random``)."""
    return CHOOSERS.get(name)(**kwargs)
