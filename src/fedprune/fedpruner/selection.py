"""Importance-aware choice of the layers (or sub-blocks) a device trains (FedPruner's micro step).

Layer importance, two criteria (registry ``LAYER_IMPORTANCE``):

- ``"cosine"``: ``1 - mean_t cos(x_t, y_t)`` between a layer's input and output hidden
  state per token: a layer that barely turns its input matters little (ShortGPT's
  block influence);
- ``"skip_loss"``: ``loss(all layers except i) - loss(all layers)``, from a closure that
  evaluates the loss with a given set of layers (see ``skip_loss_importance``).

Selection: in each group G (from ``partition.contiguous_partition``) one layer is drawn with

    P(i | G) = softmax(importance_G / temperature)_i

so important layers are trained more often, and every layer still sometimes (the
probability is never 0 for a finite temperature). Low temperature -> argmax; high ->
uniform. Importances are divided by their spread within the group before the softmax
when ``normalize`` is set, so the temperature does not depend on the criterion's units.

FedPruner+ (``select_blocks``): units are ``(layer, "attn")`` and ``(layer, "mlp")`` with
their own memory costs and importances; under a byte budget, first one unit per group is
drawn (as above, skipping units that no longer fit), then the remaining budget is filled by
sampling without replacement in proportion to ``softmax(importance / temperature)``
(Gumbel-top-k), taking every drawn unit that still fits.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..registry import Registry

LAYER_IMPORTANCE: Registry[Callable[..., torch.Tensor]] = Registry("layer importance")
Unit = tuple[int, str]


@torch.no_grad()
def layer_io(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(input, output)]`` hidden states ``[n_tokens, hidden]`` of every decoder layer."""
    from ..adapters import get_adapter

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ad = get_adapter(base)
    io: list = [None] * ad.num_layers

    def make(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            io[i] = (x.detach(), y.detach())
        return hook

    hooks = [layer.register_forward_hook(make(i), with_kwargs=True) for i, layer in enumerate(ad.layers)]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in hooks:
            h.remove()
    keep = attention_mask.bool() if attention_mask is not None else None
    flat = lambda t: t[keep] if keep is not None else t.reshape(-1, t.shape[-1])  # noqa: E731
    return [(flat(x), flat(y)) for x, y in io]


@LAYER_IMPORTANCE.register("cosine")
def cosine_importance(io: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``[L]``: Block Influence ``1 - mean_t cos(x_t, y_t)`` from ``layer_io`` pairs."""
    from ..pruning.criteria.layer import block_influence

    return torch.stack([block_influence(x, y) for x, y in io]).float()


@LAYER_IMPORTANCE.register("skip_loss")
def skip_loss_importance(loss_with_layers: Callable[[list[int]], float], num_layers: int) -> torch.Tensor:
    """``[L]``: ``loss(without layer i) - loss(all)``; ``loss_with_layers(keep)`` runs only layers ``keep``."""
    full = float(loss_with_layers(list(range(num_layers))))
    return torch.tensor([float(loss_with_layers([j for j in range(num_layers) if j != i])) - full
                         for i in range(num_layers)])


def model_loss_closure(model: torch.nn.Module, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> Callable[[list[int]], float]:
    """``keep -> causal-LM loss`` on one batch with only layers ``keep`` (for ``skip_loss_importance``)."""
    from .submodel import only_layers

    @torch.no_grad()
    def loss(keep: list[int]) -> float:
        with only_layers(model, keep):
            return float(model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss)

    return loss


def selection_probs(importance: torch.Tensor, temperature: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """``softmax(importance / temperature)`` (importances scaled by their spread if ``normalize``)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    s = torch.as_tensor(importance, dtype=torch.float64).clone()
    if normalize and s.numel() > 1:
        spread = float(s.max() - s.min())
        if spread > 0:
            s = (s - s.min()) / spread
    return torch.softmax(s / temperature, dim=0)


def select_layers(groups: Sequence[Sequence[int]], importance: torch.Tensor, temperature: float = 1.0,
                  rng: np.random.Generator | int | None = None, normalize: bool = True) -> list[int]:
    """One layer per group, drawn with ``softmax(importance / temperature)`` within the group (sorted)."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    importance = torch.as_tensor(importance, dtype=torch.float64)
    chosen = []
    for g in groups:
        g = list(g)
        if not g:
            raise ValueError("empty group")
        p = selection_probs(importance[g], temperature, normalize).numpy()
        chosen.append(g[int(rng.choice(len(g), p=p / p.sum()))])
    return sorted(chosen)


def select_blocks(units: Sequence[Unit], importance: Sequence[float], costs: Sequence[float], budget: float,
                  groups: Sequence[Sequence[int]] | None = None, temperature: float = 1.0,
                  rng: np.random.Generator | int | None = None, normalize: bool = True) -> list[Unit]:
    """FedPruner+: a set of ``(layer, "attn"|"mlp")`` units with total cost <= ``budget`` (module doc).

    ``groups`` (optional) are lists of indices into ``units``; one unit per group is drawn
    first. Returns the chosen units sorted by (layer, kind).
    """
    n = len(units)
    if not (len(importance) == len(costs) == n):
        raise ValueError("units, importance and costs must have the same length")
    if any(c <= 0 for c in costs):
        raise ValueError("unit costs must be positive")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    imp = torch.as_tensor(list(importance), dtype=torch.float64)
    chosen: list[int] = []
    left = float(budget)
    for g in groups or []:
        g = [i for i in g if costs[i] <= left and i not in chosen]
        if not g:
            continue
        p = selection_probs(imp[g], temperature, normalize).numpy()
        i = g[int(rng.choice(len(g), p=p / p.sum()))]
        chosen.append(i)
        left -= costs[i]
    # fill the rest: Gumbel-top-k = sampling without replacement with softmax probabilities
    logp = torch.log(selection_probs(imp, temperature, normalize)).numpy()
    keys = logp + rng.gumbel(size=n)
    for i in np.argsort(-keys):
        i = int(i)
        if i not in chosen and costs[i] <= left:
            chosen.append(i)
            left -= costs[i]
    return sorted((units[i] for i in chosen), key=lambda u: (u[0], u[1]))


def block_units(num_layers: int) -> list[Unit]:
    """``[(0, "attn"), (0, "mlp"), (1, "attn"), ...]`` in forward order."""
    return [(i, kind) for i in range(num_layers) for kind in ("attn", "mlp")]


def blocks_to_skip(chosen: Sequence[Unit], num_layers: int) -> tuple[list[int], list[int], list[int]]:
    """From chosen units: ``(layers to run, attn blocks to bypass, mlp blocks to bypass)``.

    A layer with neither sub-block chosen is dropped entirely; a layer with one chosen runs
    with the other bypassed. All indices are original ones, so enter ``skip_blocks(model, attn,
    mlp)`` first and ``only_layers(model, keep)`` inside it.
    """
    have = {(i, k) for i, k in chosen}
    keep = [i for i in range(num_layers) if (i, "attn") in have or (i, "mlp") in have]
    attn = [i for i in keep if (i, "attn") not in have]
    mlp = [i for i in keep if (i, "mlp") not in have]
    return keep, attn, mlp



def device_layer_plan(similarity: torch.Tensor, importance: torch.Tensor, num_layers: int,
                      temperature: float = 1.0, rng: np.random.Generator | int | None = None,
                      objective: str = "scatter") -> tuple[list[list[int]], list[int]]:
    """FedPruner macro + micro for one device: ``(groups, chosen layers)``.

    ``similarity`` ``[L, L]`` (e.g. ``cka.cka_matrix``), ``importance`` ``[L]``, ``num_layers`` = K
    (e.g. ``memory.max_layers_for_budget``). Groups are the contiguous partition into K parts;
    one layer is drawn per group.
    """
    from .partition import contiguous_partition

    groups = contiguous_partition(similarity, num_layers, objective)
    return groups, select_layers(groups, importance, temperature, rng)
