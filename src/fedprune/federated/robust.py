"""Robust aggregation: what the server does to the accepted client results of a round before the
strategy averages them. Shared by both runtimes (simulator ``run_round``, Flower ``run_server``)
through :func:`aggregate_round`, so a defence never exists in one and not the other.

Three defences, each a pure function with hand-computed tests:

1. **Weight capping** (:func:`cap_weights`). FedAvg weighs a client by the ``num_examples`` it
   declares, so one client declaring 10^12 examples takes the whole average. A client's weight is
   first capped by the size the server registered for it (the simulator knows the partition
   size; over Flower it is what the node declared when it joined, so a client cannot change its
   story between rounds), then by ``max_weight_ratio`` times the round's *lower median* weight.
   The lower median cannot be moved by fewer than half of the clients (with two clients it is
   the smaller one), so a liar's share is at most ``k / (k + n - 1)`` with ``n`` clients near
   the median (k = 3, n = 10: 25 %).
2. **Norm clipping** (:func:`clip_scales`, :func:`clip_update`). A client's *update* is the
   deviation of the LoRA factors it returns from the factors it was sent (the global at its
   rank/mask: for FedIT the aggregated quantity is the factors, and ``mean(g + d_k) = g +
   mean(d_k)``, so clipping the deviation bounds the client's effect on the global). The relative
   bound compares root-mean-square deviations per entry sent (clients holding fewer layers or a
   lower rank are then comparable) to ``clip_norm_ratio`` times the round's lower median; the
   absolute bound ``clip_norm`` caps the Frobenius norm of the deviation. A clipped client keeps
   its direction: ``sent + s * (received - sent)``.
3. **Coordinate-wise median / trimmed mean** (``aggregators.coordinate_reduce``), for the
   strategies that average same-indexed entries (``supports_robust_aggregation``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import torch

from .aggregators import ROBUST_METHODS, compact
from .local import ClientResult, ClientTask

Tensor = torch.Tensor


def lower_median(xs: Sequence[float]) -> float:
    """The lower median: element ``(n - 1) // 2`` of the sorted values (robust to < n/2 outliers)."""
    if not xs:
        raise ValueError("median of no values")
    return sorted(float(x) for x in xs)[(len(xs) - 1) // 2]


def cap_weights(declared: Sequence[float], max_ratio: float,
                registered: Sequence[float | None] | None = None) -> list[int]:
    """Aggregation weights from the declared sizes: ``w_k = min(declared_k, registered_k)`` (where
    the server registered a size), then ``min(w_k, floor(max_ratio * lower_median(w)))``, at least 1.
    ``max_ratio = 0`` trusts the declared sizes (no capping at all)."""
    w = [float(x) for x in declared]
    if max_ratio == 0:
        return [int(x) for x in w]
    if max_ratio < 1:
        raise ValueError(f"max_weight_ratio must be 0 (off) or >= 1, got {max_ratio}")
    if registered is not None:
        if len(registered) != len(w):
            raise ValueError(f"{len(registered)} registered sizes for {len(w)} clients")
        w = [x if r is None else min(x, float(r)) for x, r in zip(w, registered)]
    cap = max(1.0, math.floor(max_ratio * lower_median(w)))
    return [max(1, int(min(x, cap))) for x in w]


def deviation(sent: Mapping[str, Tensor], received: Mapping[str, Tensor],
              masks: Mapping[str, Mapping[int, Tensor]] | None = None) -> dict[str, Tensor]:
    """``received[k] - compact(sent[k], masks[k])`` per key the client returned (float64)."""
    masks = masks or {}
    return {k: v.double() - compact(sent[k], masks.get(k)).double() for k, v in received.items()}


def update_norms(dev: Mapping[str, Tensor]) -> tuple[float, float]:
    """(Frobenius norm, root mean square per entry) of a deviation dict."""
    sq = sum(float(d.pow(2).sum()) for d in dev.values())
    n = sum(d.numel() for d in dev.values())
    return math.sqrt(sq), math.sqrt(sq / max(n, 1))


def clip_scales(norms: Sequence[float], rms: Sequence[float], clip_norm_ratio: float,
                clip_norm: float) -> list[float]:
    """Per-client factor ``s_k = min(1, clip_norm_ratio * lower_median(rms) / rms_k,
    clip_norm / norm_k)`` (a bound set to 0 is off; a zero update is never scaled)."""
    bound_rms = clip_norm_ratio * lower_median(rms) if clip_norm_ratio > 0 else math.inf
    out = []
    for n, r in zip(norms, rms):
        s = 1.0
        if r > 0 and r > bound_rms:
            s = min(s, bound_rms / r)
        if clip_norm > 0 and n > clip_norm:
            s = min(s, clip_norm / n)
        out.append(s)
    return out


def clip_update(sent: Mapping[str, Tensor], received: Mapping[str, Tensor], scale: float,
                masks: Mapping[str, Mapping[int, Tensor]] | None = None) -> dict[str, Tensor]:
    """``sent + scale * (received - sent)`` per key (the received tensors themselves when scale is 1)."""
    if scale >= 1.0:
        return dict(received)
    masks = masks or {}
    out = {}
    for k, v in received.items():
        base = compact(sent[k], masks.get(k)).double()
        out[k] = (base + scale * (v.double() - base)).to(v.dtype)
    return out


def robust_results(results: Sequence[ClientResult], tasks: Mapping[int, ClientTask], fed: Any,
                   registered: Mapping[int, int] | None = None) -> tuple[list[ClientResult], list[dict]]:
    """Capped weights and clipped updates for the accepted ``results`` (new objects, the inputs are
    untouched), and one diagnostic dict per client (declared size, weight, norms, clip factor).

    ``fed`` carries ``max_weight_ratio``, ``clip_norm_ratio``, ``clip_norm`` (FederationSettings).
    """
    if not results:
        return [], []
    regs = None if registered is None else [registered.get(r.cid) for r in results]
    weights = cap_weights([r.num_examples for r in results], fed.max_weight_ratio, regs)
    devs = [deviation(tasks[r.cid].lora, r.lora, r.masks) for r in results]
    norms = [update_norms(d) for d in devs]
    scales = clip_scales([n for n, _ in norms], [q for _, q in norms], fed.clip_norm_ratio, fed.clip_norm)
    out, diag = [], []
    for r, w, (n, q), s in zip(results, weights, norms, scales):
        lora = clip_update(tasks[r.cid].lora, r.lora, s, r.masks)
        out.append(dataclasses.replace(r, lora=lora, num_examples=w))
        diag.append({"cid": r.cid, "declared": r.num_examples, "weight": w, "update_norm": n, "update_rms": q,
                     "clip_scale": s})
    total = sum(weights)
    for d in diag:
        d["weight_share"] = d["weight"] / total
    return out, diag


def use_aggregation(strategy: Any, fed: Any) -> None:
    """Tell ``strategy`` how to average (``fed.aggregation``, ``fed.trim_ratio``); refuses a strategy
    that cannot replace its average by a median / trimmed mean."""
    if fed.aggregation not in ROBUST_METHODS:
        raise ValueError(f"federation.aggregation must be one of {', '.join(ROBUST_METHODS)}, got {fed.aggregation!r}")
    if fed.aggregation != "mean" and not getattr(strategy, "supports_robust_aggregation", False):
        raise ValueError(f"federation.aggregation={fed.aggregation} is not supported by strategy "
                         f"{getattr(strategy, 'name', strategy)!r}; use aggregation=mean with clipping")
    strategy.aggregation = fed.aggregation
    strategy.trim_ratio = fed.trim_ratio


def aggregate_round(strategy: Any, round_idx: int, results: Sequence[ClientResult],
                    tasks: Mapping[int, ClientTask], global_: Any, fed: Any,
                    registered: Mapping[int, int] | None = None) -> tuple[Any, list[dict]]:
    """The one aggregation step both runtimes run: cap weights, clip updates, then the strategy's
    ``aggregate_train`` (averaging with ``fed.aggregation``). Returns (new global, diagnostics)."""
    use_aggregation(strategy, fed)
    prepared, diag = robust_results(results, tasks, fed, registered)
    return strategy.aggregate_train(round_idx, prepared, global_), diag


def poisoning_client(cid: int, sent: Callable[[ClientResult], Mapping[str, Tensor]], scale: float = 50.0,
                     num_examples: int = 10**12) -> Callable[[ClientResult], ClientResult]:
    """A Byzantine client for studies and tests (the simulator's ``tamper`` hook): client ``cid``
    declares ``num_examples`` and sends ``sent + scale * (its update)``; ``sent(result)`` returns the
    tensors it was sent (e.g. ``lambda r: sim.global_.tensors`` for FedIT)."""
    def tamper(res: ClientResult) -> ClientResult:
        if res.cid != cid:
            return res
        base = {k: compact(t, res.masks.get(k)).double() for k, t in sent(res).items() if k in res.lora}
        lora = {k: (base[k] + scale * (v.double() - base[k])).to(v.dtype) for k, v in res.lora.items()}
        return dataclasses.replace(res, lora=lora, num_examples=num_examples)
    return tamper
