"""Layer importance: Block Influence (ShortGPT) and SLEB's calibration-loss removal order.

Block Influence is written once here; COMP, ShortGPT and FedPruner's layer and sub-block
importances all call :func:`block_influence`.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ...adapters import DecoderAdapter
from ..activations import HiddenStream, release_free_memory
from ..layerwise import capture_layer0_stream, final_logits_nll, run_layer
from ..streamed import digest, layer_weights, saved_state


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Block Influence (ShortGPT): ``BI = 1 - mean_t cos(x_in_t, x_out_t)`` over tokens.

    ``x_in``, ``x_out``: hidden states entering and leaving a block, ``[..., d]``; returns a
    0-dim float64 tensor. A block that barely rotates its input (BI near 0) can be removed cheaply.
    """
    a = x_in.reshape(-1, x_in.shape[-1]).double()
    b = x_out.reshape(-1, x_out.shape[-1]).double()
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).mean()


@torch.no_grad()
def block_influence_scores(adapter: DecoderAdapter, ids: torch.Tensor, batch_size: int = 8,
                           offload: str = "auto", scratch_dir=None) -> list[float]:
    """BI of every decoder layer on calibration ``ids`` ``[N, L]``, one layer at a time.

    Batch by batch: ``BI = 1 - mean_t cos`` is accumulated as a token-weighted mean, and each
    batch's output overwrites its input in the stream (one ``N x L x d`` buffer in all). A streamed
    model (``weight_offload``) has one layer materialised at a time, and the scores are saved with
    its partial output (a resumed prune loads them).
    """
    return saved_state(adapter, f"block_influence-{digest(ids)}-{batch_size}",
                       lambda: _block_influence_scores(adapter, ids, batch_size, offload, scratch_dir))


def _block_influence_scores(adapter, ids, batch_size, offload, scratch_dir) -> list[float]:
    x, kw = capture_layer0_stream(adapter, ids, batch_size, offload, scratch_dir)
    scores = []
    with x:
        for layer in tqdm(list(adapter.layers), desc="block influence", leave=False):
            total, count = 0.0, 0
            with layer_weights(adapter, layer):
                for b, xb in x.batches():
                    yb = run_layer(layer, xb, kw, batch_size)
                    tokens = xb.shape[0] * xb.shape[1]
                    total += float(block_influence(xb, yb)) * tokens
                    count += tokens
                    x.write(b, yb)
            scores.append(total / count)
    release_free_memory()
    return scores


def lowest(scores: list[float], n: int) -> list[int]:
    """Indices of the ``n`` lowest scores, ascending by index (the layers to remove)."""
    return sorted(int(i) for i in torch.argsort(torch.tensor(scores))[:n])


@torch.no_grad()
def calibration_nll(adapter: DecoderAdapter, ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token NLL of the model on calibration ``ids`` ``[N, L]``, ``batch_size`` rows at a time."""
    out = adapter.model(input_ids=ids, labels=ids, use_cache=False) if ids.shape[0] <= batch_size else None
    if out is not None:
        return float(out.loss)
    tot = 0.0
    for i in range(0, ids.shape[0], batch_size):
        b = ids[i:i + batch_size]
        tot += float(adapter.model(input_ids=b, labels=b, use_cache=False).loss) * b.shape[0]
    return tot / ids.shape[0]


@torch.no_grad()
def removal_nlls(adapter: DecoderAdapter, x0: HiddenStream, kwargs: dict, ids: torch.Tensor, alive: list[int],
                 candidates: list[int]) -> dict[int, float]:
    """Calibration NLL of the model that runs layers ``alive`` (in order) without one of them, for
    each of ``candidates``: ``{candidate: mean next-token NLL}``.

    The same numbers as running the model once per candidate (:func:`calibration_nll` inside
    :meth:`~fedprune.adapters.DecoderAdapter.only_layers`), computed layer by layer from the
    layer-0 inputs ``x0`` so that every candidate shares the prefix before it: batch by batch,
    the hidden state ``x`` walks through ``alive``; on reaching a candidate at position ``k``, a
    branch runs ``alive[k+1:]`` from ``x`` and scores it. With ``n`` alive layers that is
    ``sum_k (n - k - 1) + n ~ n^2 / 2`` layer passes per batch instead of ``n (n - 1)``; memory
    holds two batches of hidden states beyond ``x0``.
    """
    cand = set(candidates)
    if not cand <= set(alive):
        raise ValueError(f"candidates {sorted(cand - set(alive))} are not among the alive layers")
    layers = adapter.layers

    def step(i: int, h: torch.Tensor) -> torch.Tensor:
        with layer_weights(adapter, layers[i]) as layer:
            return run_layer(layer, h, kwargs, x0.batch_size)

    total = {c: 0.0 for c in candidates}
    count = 0
    for b, x in x0.batches():
        rows = ids[b * x0.batch_size:b * x0.batch_size + x.shape[0]]
        for k, i in enumerate(alive):
            if i in cand:
                y = x
                for j in alive[k + 1:]:
                    y = step(j, y)
                total[i] += final_logits_nll(adapter, y, rows, x0.batch_size) * rows[:, 1:].numel()
            if k < len(alive) - 1:
                x = step(i, x)
        count += rows[:, 1:].numel()
    return {c: t / count for c, t in total.items()}


@torch.no_grad()
def sleb_removal(adapter: DecoderAdapter, ids: torch.Tensor, n_remove: int, batch_size: int = 8,
                 keep_first: int = 0, keep_last: int = 0, offload: str = "auto", scratch_dir=None) -> list[int]:
    """SLEB: repeatedly remove the block whose removal raises calibration NLL least. Returns original indices.

    ``keep_first`` / ``keep_last``: that many of the first / last *remaining* blocks are never
    candidates (the SLEB repository's ``early_barrier`` / ``latter_barrier``, 1 and 1). Each step
    scores every candidate with :func:`removal_nlls` (shared prefixes: about half the layer passes
    of one full forward per candidate); ties go to the earlier block."""
    alive = list(range(adapter.num_layers))
    if n_remove > len(alive) - keep_first - keep_last:
        raise ValueError(f"SLEB cannot remove {n_remove} of {len(alive)} blocks while keeping the first "
                         f"{keep_first} and last {keep_last}")
    removed: list[int] = []
    if n_remove <= 0:
        return removed
    x0, kw = capture_layer0_stream(adapter, ids, batch_size, offload, scratch_dir)
    with x0:
        for _ in tqdm(range(n_remove), desc="SLEB block removal", leave=False):
            candidates = alive[keep_first:len(alive) - keep_last]
            nll = removal_nlls(adapter, x0, kw, ids, alive, candidates)
            best = min(candidates, key=lambda c: nll[c])  # the first of equal minima, as before
            alive.remove(best)
            removed.append(best)
    release_free_memory()
    return sorted(removed)
