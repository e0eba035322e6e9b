"""Peer methods, in the same framework (same adapters, budget, calibration), registered by name.

magnitude   Heads + FFN channels, uniform per layer, no calibration. A unit's score is the
            squared L2 norm of its coupled weights: channel j: ``||W_gate[j]||^2 +
            ||W_up[j]||^2 + ||W_down[:, j]||^2``; query head h: ``||W_q[h]||^2 + ||W_o[:, h]||^2``.
wanda_sp    Wanda-sp (structured Wanda, as the FLAP paper runs it): uniform per layer, score
            of input column group j of the output projection ``S_j = sum_i |W_ij| * ||X_j||_2``
            (``X_j`` the column's calibration activations); heads sum over their columns.
flap        FLAP (An et al., 2024): fluctuation metric ``S_j = Var(X_j) * ||W[:, j]||^2`` on the
            output projections' input columns (heads summed over their columns), standardised
            per layer and unit type (z-score), removed *globally* (adaptive structure) until the
            parameter budget is met; then bias compensation: the removed columns' mean
            contribution ``B = W[:, removed] mean(X_removed)`` is added to the output bias
            (this adds biases to LLaMA's ``o_proj``/``down_proj``, an architecture change).
llm_pruner  LLM-Pruner without recovery training (Ma et al., 2023): first-order Taylor importance
            of coupled groups ``I(G) = sum_{w in G} |w * dL/dw|`` from calibration-loss gradients
            (a full backward pass: the memory overhead COMP avoids); only layers 4..L-2 are
            pruned, at the sparsity that meets the overall ratio.
shortgpt    ShortGPT (Men et al., 2024): remove whole layers with the lowest Block Influence
            ``BI_i = 1 - E_t cos(x_i,t, x_{i+1},t)``; granularity is one layer.
sleb        SLEB (Song et al., 2024): remove blocks one at a time, each time the block whose
            removal raises calibration NLL least; granularity is one layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ...adapters import DecoderAdapter
from ...adapters.base import head_rows
from ...options import build_options, require_int
from .. import PRUNER_OPTIONS, PRUNERS
from ..budget import LayerTarget, check_ratio, layers_for_params, module_params, neuron_targets, \
    query_head_cost, channel_cost, kv_head_cost
from ..layerwise import capture_layer0_inputs, hooks, run_layer
from ..selection import apply_scores, choose_heads
from ..stats import flat_tokens
from .comp import block_influence_scores, sleb_removal


# ---- options: one dataclass per method; an unknown key is refused by name ----------------
@dataclass
class MagnitudeOptions:
    """magnitude takes no options (no calibration pass)."""


@dataclass
class BatchOptions:
    """Options of the methods whose only knob is the calibration batch."""

    batch_size: int = 8
    """calibration samples per forward pass"""

    def __post_init__(self):
        require_int("batch_size", self.batch_size, 1)


@dataclass
class FlapOptions(BatchOptions):
    """FLAP's options."""

    bias_compensation: bool = True
    """add the removed columns' mean contribution to the output bias"""


@dataclass
class LlmPrunerOptions(BatchOptions):
    """LLM-Pruner's options: only layers ``first_layer .. L - last_layer_offset - 1`` are pruned."""

    batch_size: int = 4
    first_layer: int = 4
    last_layer_offset: int = 2

    def __post_init__(self):
        super().__post_init__()
        require_int("first_layer", self.first_layer, 0)
        require_int("last_layer_offset", self.last_layer_offset, 0)


def _options(name: str, options: dict[str, Any]):
    return build_options(PRUNER_OPTIONS.get(name), options, f"pruning method {name!r}")


for _name, _cls in (("magnitude", MagnitudeOptions), ("wanda_sp", BatchOptions), ("flap", FlapOptions),
                    ("llm_pruner", LlmPrunerOptions), ("shortgpt", BatchOptions), ("sleb", BatchOptions)):
    PRUNER_OPTIONS.register(_name, _cls)


# ---- activation statistics (one dense pass, one layer at a time) -------------------
@torch.no_grad()
def activation_moments(adapter: DecoderAdapter, ids: torch.Tensor, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Per layer: mean and second moment of every input column of ``o_proj`` and ``down_proj``."""
    inp = capture_layer0_inputs(adapter, ids, batch_size)
    x, out = inp.hidden, []
    for layer in tqdm(adapter.layers, desc="activation statistics", leave=False):
        acc: dict[str, Any] = {}

        def add(name):
            def fn(m, i, o):
                h = flat_tokens(i[0]).double()
                acc.setdefault(name + "_s", torch.zeros(h.shape[1], dtype=torch.float64))
                acc.setdefault(name + "_s2", torch.zeros(h.shape[1], dtype=torch.float64))
                acc[name + "_s"] += h.sum(0)
                acc[name + "_s2"] += (h * h).sum(0)
                acc[name + "_n"] = acc.get(name + "_n", 0) + h.shape[0]
            return fn

        with hooks([(adapter.o_proj(layer), add("attn")), (adapter.ffn_out(layer), add("ffn"))]):
            x = run_layer(layer, x, inp.kwargs, batch_size)
        moments = {}
        for name in ("attn", "ffn"):
            n = acc[name + "_n"]
            mean = acc[name + "_s"] / n
            moments[name + "_mean"] = mean
            moments[name + "_sq"] = acc[name + "_s2"] / n  # E[x^2]
            moments[name + "_var"] = (acc[name + "_s2"] / n - mean * mean).clamp_min(0)
        out.append(moments)
    return out


def _per_head(col_scores: torch.Tensor, head_dim: int) -> torch.Tensor:
    return col_scores.reshape(-1, head_dim).sum(1)


# ---- magnitude ------------------------------------------------------------------------
def magnitude_scores(adapter: DecoderAdapter, layer) -> tuple[torch.Tensor, torch.Tensor]:
    hd = adapter.head_dim
    q = adapter.qkv(layer)[0].weight.detach().double()
    o = adapter.o_proj(layer).weight.detach().double()
    heads = (q * q).sum(1).reshape(-1, hd).sum(1) + _per_head((o * o).sum(0), hd)
    chans = sum((lin.weight.detach().double() ** 2).sum(1) for lin in adapter.ffn_in(layer))
    chans = chans + (adapter.ffn_out(layer).weight.detach().double() ** 2).sum(0)
    return heads, chans


def _uniform(adapter: DecoderAdapter, ratio: float, score_fn) -> dict[str, Any]:
    total = adapter.num_parameters()
    targets = neuron_targets(adapter, list(range(adapter.num_layers)), int(ratio * total))
    report = []
    for i, tgt in enumerate(targets):
        hs, cs = score_fn(i)
        report.append({"layer": i, **{k: (len(v) if isinstance(v, list) else v)
                                       for k, v in apply_scores(adapter, i, tgt, hs, cs).items()}})
    return {"layers": report}


@PRUNERS.register("magnitude")
def magnitude(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, **options: Any) -> dict[str, Any]:
    _options("magnitude", options)
    check_ratio(ratio)
    return _uniform(adapter, ratio, lambda i: magnitude_scores(adapter, adapter.layers[i]))


# ---- Wanda-sp ---------------------------------------------------------------------------
@PRUNERS.register("wanda_sp")
def wanda_sp(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, **options: Any) -> dict[str, Any]:
    opts = _options("wanda_sp", options)
    check_ratio(ratio)
    mom = activation_moments(adapter, ids, opts.batch_size)
    hd = adapter.head_dim

    def score(i):
        layer = adapter.layers[i]
        o = adapter.o_proj(layer).weight.detach().double().abs()
        d = adapter.ffn_out(layer).weight.detach().double().abs()
        heads = _per_head(o.sum(0) * mom[i]["attn_sq"].sqrt(), hd)
        chans = d.sum(0) * mom[i]["ffn_sq"].sqrt()
        return heads, chans

    return _uniform(adapter, ratio, score)


# ---- FLAP ---------------------------------------------------------------------------------
def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-12) if x.numel() > 1 else x * 0


@PRUNERS.register("flap")
def flap(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, **options: Any) -> dict[str, Any]:
    opts = _options("flap", options)
    bias_compensation = opts.bias_compensation
    check_ratio(ratio)
    mom = activation_moments(adapter, ids, opts.batch_size)
    hd = adapter.head_dim
    budget = ratio * adapter.num_parameters()
    # Candidate units: (std score, cost, layer, kind, index-list). Heads go in GQA "slots":
    # the k-th weakest head of every KV group, removed together and in order.
    units = []
    per_layer: list[dict[str, torch.Tensor]] = []
    for i, layer in enumerate(adapter.layers):
        o = adapter.o_proj(layer).weight.detach().double()
        d = adapter.ffn_out(layer).weight.detach().double()
        hs = _per_head(mom[i]["attn_var"] * (o * o).sum(0), hd)
        cs = mom[i]["ffn_var"] * (d * d).sum(0)
        per_layer.append({"heads": hs, "chans": cs})
        zc = _zscore(cs)
        ccost = channel_cost(adapter, layer)
        for j in range(len(cs)):
            units.append((float(zc[j]), ccost, i, "chan", j))
        g, n_kv = adapter.group_size(layer), adapter.num_kv_heads(layer)
        zh = _zscore(hs)
        if g > 1:
            groups = zh.reshape(n_kv, g)
            slot_scores = groups.sort(dim=1).values  # [n_kv, g] ascending within a group
            for k in range(g - 1):
                units.append((float(slot_scores[:, k].mean()), n_kv * query_head_cost(adapter, layer), i, "slot", k))
        else:
            hcost = query_head_cost(adapter, layer) + kv_head_cost(adapter, layer)
            order = torch.argsort(zh)
            for rank, h in enumerate(order[:-1].tolist()):
                units.append((float(zh[h]), hcost, i, "mha", h))
    units.sort(key=lambda u: u[0])
    removed_params = 0
    targets = [LayerTarget(0, 0, 0) for _ in adapter.layers]
    drop_chans: list[list[int]] = [[] for _ in adapter.layers]
    slots_taken = [0] * adapter.num_layers
    for score, cost, i, kind, j in units:
        if removed_params + cost / 2 > budget:
            continue
        layer = adapter.layers[i]
        if kind == "chan":
            if len(drop_chans[i]) + 1 >= adapter.intermediate_size(layer):
                continue
            drop_chans[i].append(j)
            targets[i].channels += 1
        elif kind == "slot":
            if j != slots_taken[i]:
                continue  # slots must go weakest-first
            slots_taken[i] += 1
            targets[i].heads_per_group += 1
        else:
            targets[i].groups += 1
        removed_params += cost
        if removed_params >= budget:
            break
    report = []
    for i in range(adapter.num_layers):
        layer = adapter.layers[i]
        hs, cs = per_layer[i]["heads"], per_layer[i]["chans"]
        keep_c = [c for c in range(len(cs)) if c not in set(drop_chans[i])]
        keep_h = choose_heads(adapter, layer, hs, targets[i])
        deltas = []
        if bias_compensation:  # computed on the unpruned weights, before surgery
            deltas.append((adapter.ffn_out, _bias_delta(adapter.ffn_out(layer), drop_chans[i], mom[i]["ffn_mean"])))
            if keep_h is not None:
                dropped = [h for h in range(len(hs)) if h not in keep_h]
                deltas.append((adapter.o_proj, _bias_delta(adapter.o_proj(layer), head_rows(dropped, hd).tolist(),
                                                           mom[i]["attn_mean"])))
        if keep_h is not None:
            adapter.prune_heads(i, keep_h)
        if targets[i].channels:
            adapter.prune_ffn_channels(i, keep_c)
        for where, delta in deltas:
            if delta is not None:
                _add_bias(where(adapter.layers[i]), delta)
        report.append({"layer": i, "heads_kept": adapter.num_heads(layer), "channels_kept": len(keep_c)})
    return {"layers": report, "bias_compensation": bias_compensation}


def _bias_delta(lin: torch.nn.Linear, cols: list[int], mean: torch.Tensor, weight=None) -> torch.Tensor | None:
    """``W[:, cols] @ mean[cols]``: the removed columns' mean contribution to the output."""
    if not cols:
        return None
    W = (weight if weight is not None else lin.weight).detach().double()
    idx = torch.as_tensor(cols)
    return W[:, idx] @ mean[idx]


def _add_bias(lin: torch.nn.Linear, delta: torch.Tensor) -> None:
    delta = delta.to(lin.weight.dtype)
    if lin.bias is None:
        lin.bias = torch.nn.Parameter(delta.clone(), requires_grad=False)
    else:
        with torch.no_grad():
            lin.bias.add_(delta)


# ---- LLM-Pruner (first-order Taylor on coupled groups) ------------------------------------
def taylor_scores(adapter: DecoderAdapter, ids: torch.Tensor, batch_size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Accumulate ``|w * dL/dw|`` over calibration batches; group per head and per channel."""
    model = adapter.model
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    try:
        for b in tqdm(range(0, ids.shape[0], batch_size), desc="LLM-Pruner gradients", leave=False):
            x = ids[b:b + batch_size]
            loss = model(input_ids=x, labels=x, use_cache=False).loss * x.shape[0] / ids.shape[0]
            loss.backward()
        hd = adapter.head_dim
        out = []
        for layer in adapter.layers:
            q, k, v = adapter.qkv(layer)
            o = adapter.o_proj(layer)

            def t(lin, dim):
                s = (lin.weight.detach() * lin.weight.grad).abs().double().sum(dim)
                if dim == 1 and lin.bias is not None and lin.bias.grad is not None:
                    s = s + (lin.bias.detach() * lin.bias.grad).abs().double()
                return s

            heads = t(q, 1).reshape(-1, hd).sum(1) + _per_head(t(o, 0), hd)
            g = adapter.group_size(layer)
            kv = (t(k, 1) + t(v, 1)).reshape(-1, hd).sum(1)  # shared by the group's query heads
            heads = heads + kv.repeat_interleave(g) / g
            chans = sum(t(lin, 1) for lin in adapter.ffn_in(layer)) + t(adapter.ffn_out(layer), 0)
            out.append((heads, chans))
    finally:
        model.zero_grad(set_to_none=True)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return out


@PRUNERS.register("llm_pruner")
def llm_pruner(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, **options: Any) -> dict[str, Any]:
    opts = _options("llm_pruner", options)
    first_layer, last_layer_offset = opts.first_layer, opts.last_layer_offset
    check_ratio(ratio)
    scores = taylor_scores(adapter, ids, opts.batch_size)
    n = adapter.num_layers
    layer_ids = list(range(min(first_layer, n - 1), max(n - last_layer_offset, min(first_layer, n - 1) + 1)))
    targets = neuron_targets(adapter, layer_ids, int(ratio * adapter.num_parameters()))
    report = []
    for i, tgt in zip(layer_ids, targets):
        info = apply_scores(adapter, i, tgt, scores[i][0], scores[i][1])
        report.append({"layer": i, "heads_kept": adapter.num_heads(adapter.layers[i]),
                       "channels_kept": info.get("channels_kept", adapter.intermediate_size(adapter.layers[i]))})
    return {"layers": report, "pruned_layers": layer_ids}


# ---- whole-layer removal ---------------------------------------------------------------------
def _n_layers(adapter: DecoderAdapter, ratio: float) -> int:
    n = max(1, layers_for_params(adapter, ratio * adapter.num_parameters()))
    if n >= adapter.num_layers:
        raise ValueError(f"ratio {ratio} asks for {n} of {adapter.num_layers} layers: more layers than exist")
    return n


@PRUNERS.register("shortgpt")
def shortgpt(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, **options: Any) -> dict[str, Any]:
    opts = _options("shortgpt", options)
    check_ratio(ratio)
    n = _n_layers(adapter, ratio)
    bi = block_influence_scores(adapter, ids, opts.batch_size)
    drop = sorted(int(i) for i in torch.argsort(torch.tensor(bi))[:n])
    adapter.remove_layers(drop)
    return {"removed_layers": drop, "block_influence": bi}


@PRUNERS.register("sleb")
def sleb(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, **options: Any) -> dict[str, Any]:
    opts = _options("sleb", options)
    check_ratio(ratio)
    n = _n_layers(adapter, ratio)
    drop = sleb_removal(adapter, ids, n, opts.batch_size)
    adapter.remove_layers(drop)
    return {"removed_layers": drop}
