"""Head and FFN-channel scores of the peer methods (higher = keep), one layer at a time.

All return ``(heads [num_heads], channels [width])`` float64 scores, or per-layer lists of them:

magnitude  squared L2 norm of a unit's coupled weights: channel j: ``||W_gate[j]||^2 +
           ||W_up[j]||^2 + ||W_down[:, j]||^2``; query head h: ``||W_q[h]||^2 + ||W_o[:, h]||^2``.
wanda_sp   ``S_j = sum_i |W_ij| * ||X_j||_2`` on the output projection's input columns
           (``X_j`` the column's calibration activations); heads sum over their columns.
flap       fluctuation ``S_j = Var(X_j) * ||W[:, j]||^2`` on the same columns.
taylor     first-order Taylor ``sum_{w in G} |w * dL/dw|`` over a coupled group (LLM-Pruner).
"""
from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from ...adapters import DecoderAdapter
from ..layerwise import capture_layer0_inputs, hooks, run_layer
from ..streamed import digest, layer_weights, saved_state
from ..stats import flat_tokens


def per_head(col_scores: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Column scores ``[num_heads * head_dim]`` summed per head ``[num_heads]``."""
    return col_scores.reshape(-1, head_dim).sum(1)


@torch.no_grad()
def activation_moments(adapter: DecoderAdapter, ids: torch.Tensor, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Per layer: mean, second moment and variance of every input column of ``o_proj`` and
    ``ffn_out`` (keys ``attn_mean``, ``attn_sq``, ``attn_var``, ``ffn_*``), one dense pass (one layer
    materialised at a time on a streamed model, whose partial output saves the moments for a resume)."""
    return saved_state(adapter, f"activation_moments-{digest(ids)}-{batch_size}",
                       lambda: _activation_moments(adapter, ids, batch_size))


def _activation_moments(adapter: DecoderAdapter, ids: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    inp = capture_layer0_inputs(adapter, ids, batch_size)
    x, out = inp.hidden, []
    for layer in tqdm(list(adapter.layers), desc="activation statistics", leave=False):
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

        with layer_weights(adapter, layer), hooks([(adapter.o_proj(layer), add("attn")),
                                                   (adapter.ffn_out(layer), add("ffn"))]):
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


def magnitude_scores(adapter: DecoderAdapter, layer) -> tuple[torch.Tensor, torch.Tensor]:
    hd = adapter.head_dim
    q = adapter.qkv(layer)[0].weight.detach().double()
    o = adapter.o_proj(layer).weight.detach().double()
    heads = (q * q).sum(1).reshape(-1, hd).sum(1) + per_head((o * o).sum(0), hd)
    chans = sum((lin.weight.detach().double() ** 2).sum(1) for lin in adapter.ffn_in(layer))
    chans = chans + (adapter.ffn_out(layer).weight.detach().double() ** 2).sum(0)
    return heads, chans


def wanda_sp_scores(adapter: DecoderAdapter, layer, moments: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``moments``: the layer's entry of :func:`activation_moments`."""
    o = adapter.o_proj(layer).weight.detach().double().abs()
    d = adapter.ffn_out(layer).weight.detach().double().abs()
    heads = per_head(o.sum(0) * moments["attn_sq"].sqrt(), adapter.head_dim)
    chans = d.sum(0) * moments["ffn_sq"].sqrt()
    return heads, chans


def fluctuation_columns(adapter: DecoderAdapter, layer, moments: dict[str, torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP's fluctuation metric (WIFV) per input column of the output projections:
    ``Var(X_j) * ||W[:, j]||^2`` for ``o_proj`` (``[num_heads * head_dim]``) and ``down_proj``
    (``[intermediate]``); ``moments``: the layer's entry of :func:`activation_moments`."""
    o = adapter.o_proj(layer).weight.detach().double()
    d = adapter.ffn_out(layer).weight.detach().double()
    return moments["attn_var"] * (o * o).sum(0), moments["ffn_var"] * (d * d).sum(0)


def taylor_scores(adapter: DecoderAdapter, ids: torch.Tensor, batch_size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Accumulate ``|w * dL/dw|`` over calibration batches; group per head and per channel.

    A full backward pass over the model (the memory overhead COMP avoids); a KV head's score
    is shared by its group's query heads.
    """
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

            heads = t(q, 1).reshape(-1, hd).sum(1) + per_head(t(o, 0), hd)
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
