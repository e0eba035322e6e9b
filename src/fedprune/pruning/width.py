"""``width_multiple``: pruned widths that quantize in whole blocks.

llama.cpp quantizes each weight row in blocks along its input dimension: 32 values for
``q4_0``/``q8_0``, 256 for the k-quants (``q4_k``, ``q5_k``, ``q6_k``). A tensor whose input
width is not a multiple of the block falls back to another type, so a pruned model shrinks less
under quantization. Structured pruning sets two input widths per layer: the FFN output
projection's (``down_proj``: the kept FFN width) and the attention output projection's
(``o_proj``: kept query heads x ``head_dim``). With ``width_multiple = N`` (a method option of
COMP, magnitude, Wanda-sp, FLAP and LLM-Pruner; 1 = off):

* **FFN**: every layer's kept width is a multiple of ``N`` (at least ``N``; no method empties a
  layer's FFN), or the layer's full width when it is left unpruned. Channels leave a layer in
  *blocks* (:func:`removal_blocks`). The removed total is re-balanced over the layers so the
  requested ratio still holds (:func:`round_channel_removals`): each layer is first rounded
  to keep at least its planned width, then the layers take one more block each, lowest-scored
  marginal block first (nearest planned width first when a method's scores are not known in
  advance, as in COMP, whose layers are scored one after another), while that brings the total
  closer to the target. The achieved removed parameter count is within half of one block of
  ``N`` channels (``N`` x the parameters of one channel) of the target, unless every layer
  is already at its smallest width.
* **Heads**: kept heads x ``head_dim`` must be a multiple of ``N``, i.e. kept query heads a
  multiple of ``m = N / gcd(N, head_dim)`` (:func:`head_multiple`; 1 for ``N <= head_dim``
  when both are powers of two). Heads go in the unit the method removes them in: one query
  head from *every* KV group at a time under GQA (kept = KV groups x heads kept per group),
  single heads under multi-head attention. Where the method removes heads in a layer, its
  count is rounded to the nearest count in that unit whose kept heads are a multiple of ``m``
  (or to no head removal, the dense count; ties keep more heads) and FFN channels absorb the
  difference. Where no count in that unit is a multiple (SmolLM2-135M: 9 query heads in 3
  KV groups of 3, ``head_dim`` 64, kept heads 3, 6 or 9; ``N = 256`` needs a multiple of 4),
  heads are left as the method chose them; layers that keep all their heads (COMP's default
  ``head_sparsity=0``) are never given head pruning they did not ask for. Either way one
  warning says which layers' ``o_proj`` width is not a multiple, and the plan records every
  layer's widths.

For SmolLM2-135M (FFN 1536, ``o_proj`` 576 = 9 x 64 dense): ``N = 64`` gives FFN widths in
steps of 64 and any head count is fine (m = 1); ``N = 128``: FFN in steps of 128, heads
rounded to 6 kept (m = 2); ``N = 256``: FFN in steps of 256, heads unroundable (the dense
576 is not a multiple of 256 either, so llama.cpp already falls back on the dense model's
``attn_output``).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

log = logging.getLogger(__name__)

OPTION = "width_multiple"


def check_option(value: Any, preset: str = "project") -> int:
    """``value`` as a valid ``width_multiple`` (an integer >= 1), else a ValueError naming the option.
    The official presets reproduce their repositories' counts and are refused with ``N > 1``."""
    from ..options import require_int

    n = require_int(OPTION, value, 1)
    if n > 1 and preset == "official":
        raise ValueError(f"{OPTION}={n} applies to preset='project' only: preset='official' keeps the "
                         "official code's head and channel counts")
    return n


def check_width(n: int, ffn_width: int, where: str = "the model") -> None:
    """Refuse ``width_multiple`` larger than an FFN width (no pruned width could be a multiple of it)."""
    if n > ffn_width:
        raise ValueError(f"{OPTION}={n} is larger than the FFN width {ffn_width} of {where}: "
                         "no kept width can be a multiple of it")


def check_model(adapter, n: int) -> None:
    """:func:`check_width` for every layer of ``adapter``'s model."""
    for i, layer in enumerate(adapter.layers):
        check_width(n, adapter.intermediate_size(layer), f"layer {i}")


def head_multiple(n: int, head_dim: int) -> int:
    """Kept query heads must be a multiple of this for ``heads x head_dim`` to be a multiple of ``n``."""
    return n // math.gcd(n, head_dim)


def removal_blocks(width: int, n: int) -> list[int]:
    """Sizes of the successive channel blocks a layer of ``width`` channels can lose so that its kept
    width is always a multiple of ``n`` and at least ``n``: first ``width % n`` (when not 0), then
    ``n`` at a time. ``removal_blocks(100, 32) == [4, 32, 32]`` (kept 96, 64, 32)."""
    if n < 1:
        raise ValueError(f"{OPTION} must be >= 1, got {n}")
    if width < n:
        return []
    blocks = [width % n] if width % n else []
    return blocks + [n] * (width // n - 1)


def head_stops(counts: Sequence[int], m: int) -> list[int]:
    """Indices ``j >= 1`` of a removal sequence whose kept head count ``counts[j]`` is a multiple of ``m``
    (``counts[j]``: heads kept after ``j`` units removed; ``counts[0]`` the dense count)."""
    return [j for j in range(1, len(counts)) if counts[j] % m == 0]


def round_heads(counts: Sequence[int], target: int, m: int) -> int | None:
    """Units to remove instead of ``target`` so the kept heads are a multiple of ``m``.

    ``counts[j]``: heads kept after removing ``j`` units. ``target == 0`` (no head pruning)
    stays 0. Otherwise the nearest (by kept heads) of no removal and the stops
    (:func:`head_stops`), ties keeping more heads; ``None`` when no count after a removal is a
    multiple (the caller keeps ``target``).
    """
    if target == 0 or m == 1:
        return target
    stops = head_stops(counts, m)
    if not stops:
        return None
    want = counts[target]
    return min([0] + stops, key=lambda j: (abs(counts[j] - want), -counts[j]))


def gqa_head_counts(num_heads: int, num_kv: int) -> list[int]:
    """Kept query heads after removing 0, 1, ... units: one query head per KV group at a time (GQA,
    at least one per group kept) or single heads (multi-head attention, at least one kept)."""
    g = num_heads // num_kv
    if g > 1:
        return [num_kv * (g - k) for k in range(g)]
    return [num_heads - k for k in range(num_heads)]


def block_scores(channel_scores, n: int) -> list[float]:
    """Mean score of each removal block of a layer (:func:`removal_blocks`), the lowest channels first.

    Scores are z-scored over the layer first, so blocks of different layers compare on one scale.
    """
    s = [float(v) for v in channel_scores]
    k = len(s)
    mean = sum(s) / k
    std = (sum((v - mean) ** 2 for v in s) / max(k - 1, 1)) ** 0.5
    z = sorted((v - mean) / std if std > 0 else 0.0 for v in s)
    out, start = [], 0
    for b in removal_blocks(k, n):
        out.append(sum(z[start:start + b]) / b)
        start += b
    return out


def round_channel_removals(targets: Sequence[float], widths: Sequence[int], n: int, channel_costs: Sequence[int],
                           total: float | None = None,
                           scores: Sequence[Sequence[float]] | None = None) -> list[int]:
    """Channels to remove per layer so every kept width is a multiple of ``n`` (or the full width),
    the removed parameters as close to ``total`` as whole blocks allow.

    ``targets[l]``: channels layer ``l`` would lose without rounding (a float); ``channel_costs[l]``:
    parameters per channel; ``total``: parameters to remove (default ``sum(targets * costs)``);
    ``scores[l][j]``: score of layer ``l``'s ``j``-th removal block (:func:`block_scores`; lower goes
    first), or ``None``.

    Every layer starts at the largest removal not above its target (it keeps at least its planned
    width); then, while one more block somewhere brings the removed total closer to ``total``, the
    block with the lowest key goes: first the layers still above their planned width (one block
    each: rounding to nearest), then deeper blocks (only when layers clamped at width ``n`` left a
    shortfall); within a level, the lowest block score, or without scores the largest remaining
    shortfall. The result is within half a block's parameters of ``total`` unless no block is left.
    """
    L = len(targets)
    if not (len(widths) == len(channel_costs) == L) or (scores is not None and len(scores) != L):
        raise ValueError("targets, widths, channel_costs and scores need one entry per layer")
    cum = []
    for w in widths:
        c = [0]
        for b in removal_blocks(int(w), n):
            c.append(c[-1] + b)
        cum.append(c)
    raw = [max(float(x), 0.0) for x in targets]
    t = [min(x, c[-1]) for x, c in zip(raw, cum)]  # a layer cannot go below width n: the rest goes elsewhere
    state = [max(j for j in range(len(c)) if c[j] <= x + 1e-9) for x, c in zip(t, cum)]
    ceil = [s + 1 if s + 1 < len(c) and c[s] < x - 1e-9 else s for s, x, c in zip(state, t, cum)]
    goal = sum(x * cc for x, cc in zip(raw, channel_costs)) if total is None else float(total)
    left = goal - sum(c[s] * cc for c, s, cc in zip(cum, state, channel_costs))
    while True:
        best = None
        for l in range(L):
            s = state[l]
            if s + 1 >= len(cum[l]):
                continue
            cost = (cum[l][s + 1] - cum[l][s]) * channel_costs[l]
            if not cost < 2 * left:  # a block that overshoots by more than it fills does not help
                continue
            level = 0 if s < ceil[l] else 1 + s - ceil[l]
            prio = scores[l][s] if scores is not None else -(t[l] - cum[l][s]) / (cum[l][s + 1] - cum[l][s])
            key = (level, prio, l)
            if best is None or key < best[0]:
                best = (key, l, cost)
        if best is None:
            break
        state[best[1]] += 1
        left -= best[2]
    return [c[s] for c, s in zip(cum, state)]


def width_report(adapter, n: int) -> dict[str, Any]:
    """Every layer's kept FFN width and ``o_proj`` input width, and which are not multiples of ``n``
    (recorded in ``plan.json``)."""
    hd = adapter.head_dim
    ffn = [adapter.intermediate_size(l) for l in adapter.layers]
    attn = [adapter.num_heads(l) * hd for l in adapter.layers]
    return {"value": n, "ffn_widths": ffn, "o_proj_in_widths": attn,
            "ffn_not_multiple": [i for i, w in enumerate(ffn) if w % n],
            "o_proj_not_multiple": [i for i, w in enumerate(attn) if w % n]}


def warn_unmet(report: dict[str, Any], head_dim: int) -> None:
    """One warning naming the layers whose widths are not multiples of ``report['value']``."""
    n = report["value"]
    parts = []
    if report["ffn_not_multiple"]:
        parts.append(f"FFN width of layers {report['ffn_not_multiple']} (left at their full width)")
    if report["o_proj_not_multiple"]:
        parts.append(f"o_proj input width (heads x {head_dim}) of layers {report['o_proj_not_multiple']} "
                     f"(kept heads must be a multiple of {head_multiple(n, head_dim)}; no head count the method "
                     "can reach is one, or the method keeps all heads there)")
    if parts:
        log.warning("%s=%d not met for the %s: those tensors quantize with a fallback type",
                    OPTION, n, "; ".join(parts))
