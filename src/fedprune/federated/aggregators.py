"""Aggregating LoRA updates from (heterogeneous) clients: pure functions on dicts of tensors.

Conventions (the same as PEFT's):
- a LoRA pair for module ``m`` is ``A = state[f"{m}.lora_A"]`` of shape ``(r, d_in)`` and
  ``B = state[f"{m}.lora_B"]`` of shape ``(d_out, r)``; the weight update it stands for is
  ``dW = (alpha / r) * B @ A`` of shape ``(d_out, d_in)``.
- ``weights`` are per-client, non-negative, and are normalised here (``p_k = w_k / sum w``).

Nothing in this module touches a model; the runtimes (in-process, Flower) only move data
between clients and these functions.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from ..registry import Registry

Tensor = torch.Tensor
State = Mapping[str, Tensor]

AGGREGATORS: Registry[Callable] = Registry("aggregator")

A_SUFFIX = ".lora_A"
B_SUFFIX = ".lora_B"


def lora_modules(state: State) -> list[str]:
    """Module names that have a LoRA pair in ``state`` (sorted)."""
    mods = {k[: -len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX)}
    missing = [m for m in mods if m + B_SUFFIX not in state]
    if missing:
        raise ValueError(f"LoRA state has lora_A without lora_B for: {sorted(missing)[:3]}")
    return sorted(mods)


def normalise(weights: Sequence[float]) -> list[float]:
    w = [float(x) for x in weights]
    if any(x < 0 for x in w):
        raise ValueError(f"aggregation weights must be non-negative, got {w}")
    s = sum(w)
    if s <= 0:
        raise ValueError("aggregation weights sum to zero: nothing to aggregate")
    return [x / s for x in w]


# ---- FedIT: FedAvg of A and B ------------------------------------------------------------
@AGGREGATORS.register("fedavg")
def fedavg(states: Sequence[State], weights: Sequence[float]) -> dict[str, Tensor]:
    """Weighted average of every tensor (FedIT: weights = client data sizes).

    All states must hold the same keys with the same shapes.
    """
    if not states:
        raise ValueError("fedavg needs at least one client state")
    p = normalise(weights)
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise ValueError(f"fedavg: clients hold different keys ({sorted(set(s) ^ keys)[:3]} ...)")
    out = {}
    for k in sorted(keys):
        shapes = {tuple(s[k].shape) for s in states}
        if len(shapes) != 1:
            raise ValueError(f"fedavg: {k} has different shapes across clients {sorted(shapes)}; use hetlora/flexlora")
        out[k] = sum(pk * s[k].double() for pk, s in zip(p, states)).to(states[0][k].dtype)
    return out


# ---- HetLoRA: zero-pad to r_max, weight by ||B_k A_k||_F ------------------------------------
def pad_rank(A: Tensor, B: Tensor, r_max: int) -> tuple[Tensor, Tensor]:
    """Zero-pad ``A`` (r x d_in) to (r_max x d_in) and ``B`` (d_out x r) to (d_out x r_max)."""
    r = A.shape[0]
    if r > r_max:
        raise ValueError(f"rank {r} exceeds r_max {r_max}")
    A_p = torch.zeros(r_max, A.shape[1], dtype=A.dtype)
    B_p = torch.zeros(B.shape[0], r_max, dtype=B.dtype)
    A_p[:r] = A
    B_p[:, :r] = B
    return A_p, B_p


@AGGREGATORS.register("hetlora")
def hetlora_aggregate(states: Sequence[State], r_max: int | None = None) -> dict[str, Tensor]:
    """HetLoRA: zero-pad every client's pair to ``r_max`` and average, per module, with weights
    ``||B_k A_k||_F`` (a client whose update is larger counts more). If every client's product
    is zero for a module, the clients are averaged uniformly.
    """
    if not states:
        raise ValueError("hetlora needs at least one client state")
    r_max = r_max or max(s[m + A_SUFFIX].shape[0] for s in states for m in lora_modules(s))
    out = {}
    for m in lora_modules(states[0]):
        pairs = [(s[m + A_SUFFIX], s[m + B_SUFFIX]) for s in states]
        norms = [float(torch.linalg.matrix_norm(B.double() @ A.double())) for A, B in pairs]
        p = normalise(norms) if sum(norms) > 0 else normalise([1.0] * len(pairs))
        padded = [pad_rank(A.double(), B.double(), r_max) for A, B in pairs]
        out[m + A_SUFFIX] = sum(pk * Ap for pk, (Ap, _) in zip(p, padded)).to(pairs[0][0].dtype)
        out[m + B_SUFFIX] = sum(pk * Bp for pk, (_, Bp) in zip(p, padded)).to(pairs[0][1].dtype)
    return out


def truncate_rank(state: State, rank: int) -> dict[str, Tensor]:
    """What a client of rank ``rank`` keeps of a padded global: ``A[:rank]``, ``B[:, :rank]``."""
    out = {}
    for m in lora_modules(state):
        A, B = state[m + A_SUFFIX], state[m + B_SUFFIX]
        if rank > A.shape[0]:
            raise ValueError(f"cannot truncate rank {A.shape[0]} to a larger rank {rank}")
        out[m + A_SUFFIX] = A[:rank].clone()
        out[m + B_SUFFIX] = B[:, :rank].clone()
    return out


# ---- FlexLoRA: average full-size updates, SVD back to each client's rank --------------------
@AGGREGATORS.register("flexlora")
def flexlora_aggregate(states: Sequence[State], weights: Sequence[float], alpha: float) -> dict[str, Tensor]:
    """``dW[m] = sum_k p_k (alpha / r_k) B_k A_k`` for every module ``m`` (full d_out x d_in)."""
    if not states:
        raise ValueError("flexlora needs at least one client state")
    p = normalise(weights)
    out = {}
    for m in lora_modules(states[0]):
        acc = None
        for pk, s in zip(p, states):
            A, B = s[m + A_SUFFIX].double(), s[m + B_SUFFIX].double()
            term = pk * (alpha / A.shape[0]) * (B @ A)
            acc = term if acc is None else acc + term
        out[m] = acc.to(states[0][m + A_SUFFIX].dtype)
    return out


def flexlora_robust(states: Sequence[State], alpha: float, method: str, trim_ratio: float = 0.0) -> dict[str, Tensor]:
    """FlexLoRA with a coordinate-wise median / trimmed mean of the clients' full-size updates
    ``(alpha / r_k) B_k A_k`` in place of their weighted average (ranks may differ)."""
    if not states:
        raise ValueError("flexlora needs at least one client state")
    out = {}
    for m in lora_modules(states[0]):
        per = torch.stack([(alpha / s[m + A_SUFFIX].shape[0]) * (s[m + B_SUFFIX].double() @ s[m + A_SUFFIX].double())
                           for s in states])
        out[m] = coordinate_reduce(per, None, method, trim_ratio).to(states[0][m + A_SUFFIX].dtype)
    return out


def flexlora_factor(dW: Tensor, rank: int, alpha: float) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` LoRA pair for ``dW`` under scaling ``alpha / rank`` (truncated SVD).

    ``dW = U S V^T``; ``B = U[:, :r] S[:r] / (alpha / r)``, ``A = V^T[:r]``, so that
    ``(alpha / r) B A`` is the rank-r truncation of ``dW``. Returns ``(A, B)``.
    """
    U, S, Vh = torch.linalg.svd(dW.double(), full_matrices=False)
    r = min(rank, S.shape[0])
    B = U[:, :r] * S[:r] / (alpha / rank)
    A = Vh[:r]
    if r < rank:  # dW has fewer singular values than the rank asked for: pad with zeros
        A, B = pad_rank(A, B, rank)
    return A.to(dW.dtype).contiguous(), B.to(dW.dtype).contiguous()


def flexlora_distribute(dW: Mapping[str, Tensor], rank: int, alpha: float) -> dict[str, Tensor]:
    """Factor every module's full update for a client of rank ``rank``."""
    out = {}
    for m, d in dW.items():
        out[m + A_SUFFIX], out[m + B_SUFFIX] = flexlora_factor(d, rank, alpha)
    return out


# ---- FLoRA: stack along the rank axis --------------------------------------------------------
@AGGREGATORS.register("flora")
def flora_stack(states: Sequence[State], weights: Sequence[float],
                scalings: Sequence[float] | None = None) -> dict[str, Tensor]:
    """FLoRA stacking: ``A = cat_k(p_k s_k A_k)`` (rows), ``B = cat_k(B_k)`` (columns), so that
    ``B @ A == sum_k p_k s_k B_k A_k`` exactly (``s_k`` = per-client LoRA scaling, default 1).
    Ranks may differ between clients.
    """
    if not states:
        raise ValueError("flora needs at least one client state")
    p = normalise(weights)
    s = list(scalings) if scalings is not None else [1.0] * len(states)
    out = {}
    for m in lora_modules(states[0]):
        out[m + A_SUFFIX] = torch.cat([pk * sk * st[m + A_SUFFIX] for pk, sk, st in zip(p, s, states)], dim=0)
        out[m + B_SUFFIX] = torch.cat([st[m + B_SUFFIX] for st in states], dim=1)
    return out


def lora_delta(state: State, scaling: float = 1.0) -> dict[str, Tensor]:
    """``{m: scaling * B @ A}`` for every pair in ``state`` (the dense update to merge)."""
    return {m: scaling * (state[m + B_SUFFIX] @ state[m + A_SUFFIX]) for m in lora_modules(state)}


# ---- count-based averaging of partially held tensors (HeteroFL / FedRA) -----------------------
def scatter_to_full(t: Tensor, masks: Mapping[int, Tensor] | None, full_shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Place compact ``t`` into a zero tensor of ``full_shape``.

    ``masks[dim]`` is a boolean vector of length ``full_shape[dim]`` saying which indices the
    client kept along ``dim``; ``t.shape[dim] == masks[dim].sum()``. Returns ``(values, held)``
    where ``held`` is 1.0 on entries the client holds and 0.0 elsewhere.
    """
    masks = dict(masks or {})
    index = []
    for d, n in enumerate(full_shape):
        if d in masks:
            mk = masks[d].bool()
            if mk.numel() != n:
                raise ValueError(f"mask for dim {d} has length {mk.numel()}, full size is {n}")
            index.append(mk.nonzero().flatten())
        else:
            index.append(torch.arange(n))
    expect = tuple(len(i) for i in index)
    if tuple(t.shape) != expect:
        raise ValueError(f"compact tensor has shape {tuple(t.shape)}, masks say {expect}")
    values = torch.zeros(tuple(full_shape), dtype=torch.float64)
    held = torch.zeros(tuple(full_shape), dtype=torch.float64)
    grid = torch.meshgrid(*index, indexing="ij") if index else ()
    values[grid] = t.double()
    held[grid] = 1.0
    return values, held


def compact(t: Tensor, masks: Mapping[int, Tensor] | None) -> Tensor:
    """The inverse of :func:`scatter_to_full`: keep only the masked indices along each dim."""
    for d, mk in sorted((masks or {}).items()):
        t = t.index_select(d, mk.bool().nonzero().flatten())
    return t.contiguous()


@AGGREGATORS.register("count_average")
def count_average(states: Sequence[State], masks: Sequence[Mapping[str, Mapping[int, Tensor]]],
                  previous: State, weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Average each entry only over the clients that hold it.

    ``states[k][key]`` is client k's compact tensor (absent key = client k did not hold that
    tensor, e.g. a layer it skipped); ``masks[k][key]`` maps dim -> boolean keep-vector (absent
    = whole dim held). ``previous`` is the current global in full shape and gives the shapes;
    entries no client holds keep their previous value. With ``weights`` (e.g. data sizes) the
    average is weighted among the holders.
    """
    if len(states) != len(masks):
        raise ValueError("count_average: one masks dict per client state")
    w = [1.0] * len(states) if weights is None else [float(x) for x in weights]
    out = {}
    for key, prev in previous.items():
        num = torch.zeros(prev.shape, dtype=torch.float64)
        den = torch.zeros(prev.shape, dtype=torch.float64)
        for wk, st, mk in zip(w, states, masks):
            if key not in st:
                continue
            v, h = scatter_to_full(st[key], mk.get(key), prev.shape)
            num += wk * v
            den += wk * h
        avg = torch.where(den > 0, num / den.clamp_min(1e-300), prev.double())
        out[key] = avg.to(prev.dtype)
    unknown = {k for st in states for k in st} - set(previous)
    if unknown:
        raise ValueError(f"count_average: clients sent keys the global does not have: {sorted(unknown)[:3]}")
    return out


# ---- robust coordinate-wise reductions (median, trimmed mean) ---------------------------------
ROBUST_METHODS = ("mean", "median", "trimmed_mean")


def coordinate_reduce(values: Tensor, held: Tensor | None, method: str, trim_ratio: float = 0.0,
                      weights: Sequence[float] | None = None) -> Tensor:
    """Reduce ``values`` (n_clients x ...) over the client axis, entry by entry, over the clients
    that hold each entry (``held``: same shape, bool; None = everyone holds everything).

    - ``mean``: weighted by ``weights`` (default uniform) among the holders;
    - ``median``: the median of the holders' values (the mean of the two middle ones when their
      number is even); unweighted, so a client cannot buy influence by declaring a large size;
    - ``trimmed_mean``: drop ``floor(trim_ratio * h)`` of the largest and as many of the smallest
      of the ``h`` holders' values, average the rest (unweighted). ``trim_ratio`` in [0, 0.5).

    Entries nobody holds come out as 0 (callers keep their previous value). Returns float64.
    """
    v = values.double()
    h = torch.ones_like(v, dtype=torch.bool) if held is None else held.bool()
    if h.shape != v.shape:
        raise ValueError(f"held mask has shape {tuple(h.shape)}, values {tuple(v.shape)}")
    n_held = h.sum(0)
    if method == "mean":
        w = torch.ones(v.shape[0], dtype=torch.float64) if weights is None else torch.tensor(
            [float(x) for x in weights], dtype=torch.float64)
        if w.shape[0] != v.shape[0] or (w < 0).any():
            raise ValueError(f"need one non-negative weight per client, got {w.tolist()}")
        w = w.view(-1, *([1] * (v.dim() - 1))) * h
        den = w.sum(0)
        return torch.where(den > 0, (w * torch.where(h, v, 0.0)).sum(0) / den.clamp_min(1e-300), 0.0)
    if method not in ("median", "trimmed_mean"):
        raise ValueError(f"unknown robust aggregation {method!r}; known: {', '.join(ROBUST_METHODS)}")
    if not 0.0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    # non-held entries sort last; the holders' values are then positions 0 .. h-1
    srt = torch.sort(torch.where(h, v, torch.inf), dim=0).values
    pos = torch.arange(v.shape[0]).view(-1, *([1] * (v.dim() - 1)))
    if method == "median":
        lo = ((n_held - 1).clamp_min(0) // 2).unsqueeze(0)
        hi = (n_held // 2).clamp_max(v.shape[0] - 1).unsqueeze(0)
        med = 0.5 * (srt.gather(0, lo) + srt.gather(0, hi)).squeeze(0)
        return torch.where(n_held > 0, med, 0.0)
    t = torch.floor(trim_ratio * n_held.double()).long()
    keep = (pos >= t) & (pos < n_held - t)
    cnt = keep.sum(0)
    total = torch.where(keep, srt, 0.0).sum(0)
    return torch.where(cnt > 0, total / cnt.clamp_min(1), 0.0)


def _check_same(states: Sequence[State], what: str) -> list[str]:
    if not states:
        raise ValueError(f"{what} needs at least one client state")
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise ValueError(f"{what}: clients hold different keys ({sorted(set(s) ^ keys)[:3]} ...)")
    for k in keys:
        shapes = {tuple(s[k].shape) for s in states}
        if len(shapes) != 1:
            raise ValueError(f"{what}: {k} has different shapes across clients {sorted(shapes)}")
    return sorted(keys)


@AGGREGATORS.register("median")
def coordinate_median(states: Sequence[State]) -> dict[str, Tensor]:
    """Coordinate-wise median of same-shaped client states (robust to fewer than half outliers)."""
    keys = _check_same(states, "median")
    return {k: coordinate_reduce(torch.stack([s[k] for s in states]), None, "median").to(states[0][k].dtype)
            for k in keys}


@AGGREGATORS.register("trimmed_mean")
def trimmed_mean(states: Sequence[State], trim_ratio: float) -> dict[str, Tensor]:
    """Coordinate-wise trimmed mean of same-shaped client states: per entry, the ``floor(trim_ratio * n)``
    largest and smallest values are dropped and the rest averaged."""
    keys = _check_same(states, "trimmed_mean")
    return {k: coordinate_reduce(torch.stack([s[k] for s in states]), None, "trimmed_mean", trim_ratio)
            .to(states[0][k].dtype) for k in keys}


def robust_average(states: Sequence[State], weights: Sequence[float], method: str = "mean",
                   trim_ratio: float = 0.0) -> dict[str, Tensor]:
    """FedAvg (``mean``, weighted, exactly :func:`fedavg`) or its robust replacements (unweighted)."""
    if method == "mean":
        return fedavg(states, weights)
    if method == "median":
        return coordinate_median(states)
    return trimmed_mean(states, trim_ratio)


def robust_count_average(states: Sequence[State], masks: Sequence[Mapping[str, Mapping[int, Tensor]]],
                         previous: State, weights: Sequence[float] | None = None, method: str = "mean",
                         trim_ratio: float = 0.0) -> dict[str, Tensor]:
    """:func:`count_average` (``mean``) or, per entry, the median / trimmed mean over the clients
    that hold it; entries nobody holds keep their previous value."""
    if method == "mean":
        return count_average(states, masks, previous, weights)
    if len(states) != len(masks):
        raise ValueError("robust_count_average: one masks dict per client state")
    unknown = {k for st in states for k in st} - set(previous)
    if unknown:
        raise ValueError(f"robust_count_average: clients sent keys the global does not have: {sorted(unknown)[:3]}")
    out = {}
    for key, prev in previous.items():
        vals, helds = [], []
        for st, mk in zip(states, masks):
            if key in st:
                v, h = scatter_to_full(st[key], mk.get(key), prev.shape)
            else:
                v, h = torch.zeros(prev.shape, dtype=torch.float64), torch.zeros(prev.shape, dtype=torch.float64)
            vals.append(v)
            helds.append(h > 0)
        held = torch.stack(helds)
        red = coordinate_reduce(torch.stack(vals), held, method, trim_ratio)
        out[key] = torch.where(held.any(0), red, prev.double()).to(prev.dtype)
    return out
