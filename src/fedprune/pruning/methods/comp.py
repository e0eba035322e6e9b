"""COMP: post-training hybrid-granularity structured pruning (arXiv 2501.15255).

1. Coarse: score decoder layers (Block Influence, ``BI_i = 1 - mean_t cos(x_i, x_{i+1})``,
   or SLEB-style iterative calibration-loss removal) and remove the least important whole
   layers, taking ``layer_fraction`` of the parameter budget.
2. Fine: inside every remaining layer, one layer at a time and first to last, rank
   attention heads (GQA-aware: the same number of query heads leaves every KV group) and
   FFN channels by a matrix-condition-number-based criterion (``criteria.neuron``) computed
   on the *pruned* model's own inputs, and remove the lowest.
3. Recover by mask tuning (``mask_tuning``): per layer, closed-form damped least squares of
   one scale per kept head / channel so the pruned layer reproduces the *dense* model's
   output; scales are folded into ``o_proj`` / ``down_proj``. No gradient is taken.

Memory: two ``N x L x d`` hidden-state streams (dense and pruned; plus the dense layer's
post-attention residual when heads are pruned), held batch by batch and spilled to a scratch
file at large calibration sizes (``activations.HiddenStream``), one ``k x k`` system at a time.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ...adapters import DecoderAdapter
from ..budget import LayerTarget, check_ratio, layers_for_params, module_params, neuron_targets
from ..criteria.layer import block_influence_scores, calibration_nll, lowest, sleb_removal
from ..criteria.neuron import NEURON_CRITERIA, removal_order
from ..activations import OFFLOAD_MODES, HiddenStream, release_free_memory
from ..layerwise import advance_stream, capture_layer0_stream, final_logits_nll, hooks, run_layer
from ..selection import choose_heads, heads_removed
from ..mask_tuning import fold_column_scales, solve_mask
from ..stats import GramAccumulator, flat_tokens, linear_bias
from ...options import require_int, require_number

log = logging.getLogger(__name__)


@dataclass
class CompOptions:
    """Options of COMP (see module docstring)."""

    layer_fraction: float | str = 0.1
    """Share of the removed parameters taken by whole layers, in [0, 1], or ``"auto"`` (picked by calibration NLL).
    The default 0.1 was the best fixed split on SmolLM2-135M (benchmarks/pruning)."""
    n_layers: int | None = None
    """Remove exactly this many whole layers (overrides ``layer_fraction``)."""
    layer_metric: str = "bi"
    """``bi`` (Block Influence) or ``sleb`` (iterative calibration-loss removal)."""
    neuron_metric: str = "mask_lsq"
    """One of ``criteria.neuron.NEURON_CRITERIA``."""
    mask_tuning: bool = True
    """Recover each pruned layer by mask tuning (one least-squares scale per kept head / channel)."""
    head_sparsity: float | None = 0.0
    """Fraction of query heads removed per KV group; ``None``: same as the layer's sparsity; 0 (default): no
    head pruning. SmolLM2 has 3 query heads per KV group, so any head pruning removes a third of them, which
    cost far more perplexity than the same parameters taken from FFN channels (benchmarks/pruning)."""
    allocation_strength: float = 0.5
    """Non-uniform neuron sparsity across kept layers: 0 = uniform; ``a > 0`` prunes a layer
    ``exp(a * z)`` times less when its Block Influence is ``z`` standard deviations above the
    mean (``budget.importance_weights``)."""
    max_layer_sparsity: float = 0.9
    """No kept layer loses more than this share of its attention + FFN parameters."""
    damp: float = 0.01
    """Damping of the criteria's and mask tuning's linear systems, relative to their mean diagonal."""
    batch_size: int = 4
    """Calibration samples per forward pass (the transient activations of one pass scale with it)."""
    offload: str = "auto"
    """Where the calibration hidden-state streams live: ``memory``, ``disk`` (a scratch file, one batch
    resident at a time) or ``auto`` (disk when a stream exceeds 64 MiB, e.g. 128 x 512 tokens)."""
    scratch_dir: str | None = None
    """Directory for spilled streams (default: the system's temporary directory)."""
    auto_candidates: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    """Layer fractions tried by ``layer_fraction="auto"``."""
    auto_nsamples: int = 16
    """Calibration samples per ``auto`` trial (as many again are held out to score it)."""

    def __post_init__(self):
        if self.layer_fraction != "auto" and not 0.0 <= float(self.layer_fraction) <= 1.0:
            raise ValueError(f"layer_fraction must be in [0, 1] or 'auto', got {self.layer_fraction!r}")
        if self.allocation_strength < 0:
            raise ValueError(f"allocation_strength must be >= 0, got {self.allocation_strength}")
        if not 0.0 < self.max_layer_sparsity < 1.0:
            raise ValueError(f"max_layer_sparsity must be in (0, 1), got {self.max_layer_sparsity}")
        if self.layer_metric not in ("bi", "sleb"):
            raise ValueError(f"layer_metric must be 'bi' or 'sleb', got {self.layer_metric!r}")
        NEURON_CRITERIA.get(self.neuron_metric)  # raises with the known names
        if self.offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {self.offload!r}")
        require_int("batch_size", self.batch_size, 1)
        if self.n_layers is not None:
            require_int("n_layers", self.n_layers, 0)
        if self.head_sparsity is not None:
            require_number("head_sparsity", self.head_sparsity, 0.0, 1.0, high_open=True)
        require_number("damp", self.damp, 0.0)
        require_int("auto_nsamples", self.auto_nsamples, 1)
        for c in self.auto_candidates:
            require_number("auto_candidates[]", c, 0.0, 1.0)


def _head_rank_scores(criterion: str, stats, n_remove: int, damp: float) -> torch.Tensor:
    return NEURON_CRITERIA.get(criterion)(stats, n_remove, damp)


def _mask_tune(st, acc: GramAccumulator, keep: list[int], lin: torch.nn.Linear, damp: float,
               group: int = 1) -> dict[str, Any]:
    """Mask tuning of the kept units (``keep``, ``group`` columns each) of output projection ``lin``:
    solve for one scale per unit and fold it into ``lin`` when the solve is accepted; returns the record."""
    idx = torch.as_tensor(keep)
    sol = solve_mask(st.A[idx][:, idx], acc.c[idx], acc.e2, damp)
    if sol.accepted:
        fold_column_scales(lin, sol.scales, group=group)
    return {"accepted": sol.accepted, "reason": sol.reason, "err_before": sol.error_before,
            "err_after": sol.error_after}


@torch.no_grad()
def prune_neurons_layerwise(adapter: DecoderAdapter, ids: torch.Tensor, removed_layers: list[int],
                            targets: list[LayerTarget], opts: CompOptions, dense_layers: list) -> dict[str, Any]:
    """Fine step + mask tuning over the kept layers, one layer at a time (module docstring).

    The dense and pruned streams are :class:`HiddenStream` s (spilled to disk at calibration
    sizes where they would dominate memory, ``opts.offload``); only one batch of each is
    resident, and each layer's dense output overwrites the dense stream batch by batch.
    """
    bs = opts.batch_size
    x_dense, kw = capture_layer0_stream(adapter, ids, bs, opts.offload, opts.scratch_dir)
    x_pruned = x_dense.clone()
    hd = adapter.head_dim
    report: list[dict[str, Any]] = []
    kept_pos = 0
    for orig_i, dense_layer in enumerate(tqdm(dense_layers, desc="COMP layer by layer")):
        if orig_i in removed_layers:
            advance_stream(dense_layer, x_dense, kw)  # the dense stream still passes through it
            continue
        layer = dense_layer  # the same module: kept layers are pruned in place
        tgt = targets[kept_pos]
        entry: dict[str, Any] = {"layer": orig_i}
        prune_heads = bool(tgt.heads_per_group or tgt.groups)
        # -- dense targets: post-attention residual (only when heads are pruned) and output of the
        #    unpruned layer; the output overwrites the dense stream (it is the next layer's input)
        o = adapter.o_proj(layer)
        mid_dense = HiddenStream(x_dense.n, x_dense.seq_len, x_dense.d, bs, x_dense.dtype, opts.offload,
                                 opts.scratch_dir) if prune_heads else None
        for b, xb in x_dense.batches():

            def keep_mid(m, i, out, xb=xb, b=b):  # a forward hook must return None
                mid_dense.write(b, xb + out)

            with hooks([(o, keep_mid)] if prune_heads else []):
                x_dense.write(b, run_layer(layer, xb, kw, bs))
        y_dense = x_dense
        # -- attention heads
        if prune_heads:
            acc = GramAccumulator(adapter.num_heads(layer))
            for b, xb in x_pruned.batches():
                eb = flat_tokens(mid_dense.read(b) - xb) - linear_bias(o)
                with hooks([(o, lambda m, i, out: acc.add_heads(flat_tokens(i[0]), m.weight, eb, hd))]):
                    run_layer(layer, xb, kw, bs)
            st = acc.unit_stats_heads()
            n_rm = heads_removed(adapter, layer, tgt)
            scores = _head_rank_scores(opts.neuron_metric, st, n_rm, opts.damp)
            keep = choose_heads(adapter, layer, scores, tgt)
            adapter.prune_heads(kept_pos, keep)
            entry["heads_kept"] = len(keep)
            if opts.mask_tuning:
                entry["heads_mask"] = _mask_tune(st, acc, keep, adapter.o_proj(layer), opts.damp, group=hd)
        if mid_dense is not None:
            mid_dense.close()
        # -- FFN channels
        if tgt.channels:
            down = adapter.ffn_out(layer)
            acc = GramAccumulator(adapter.intermediate_size(layer))
            for b, xb in x_pruned.batches():
                cap: dict[str, torch.Tensor] = {}

                def grab(m, i, out):
                    cap["h"], cap["f"] = flat_tokens(i[0]).detach(), flat_tokens(out).detach()

                with hooks([(down, grab)]):
                    yb = run_layer(layer, xb, kw, bs)
                eb = flat_tokens(y_dense.read(b) - yb) + cap["f"] - linear_bias(down)
                acc.add_channels(cap["h"], down.weight, eb)
                del cap, yb, eb
            st = acc.unit_stats_channels(down.weight)
            drop = set(removal_order(opts.neuron_metric, st, tgt.channels, opts.damp))
            keep = [c for c in range(acc.k) if c not in drop]
            adapter.prune_ffn_channels(kept_pos, keep)
            entry["channels_kept"] = len(keep)
            if opts.mask_tuning:
                entry["ffn_mask"] = _mask_tune(st, acc, keep, adapter.ffn_out(layer), opts.damp)
        advance_stream(layer, x_pruned, kw)
        report.append(entry)
        kept_pos += 1
        release_free_memory()  # this layer's temporaries must not add to the next layer's peak
    x_dense.close()
    x_pruned.close()
    release_free_memory()
    return {"layers": report}


def _select_layers(adapter: DecoderAdapter, ids: torch.Tensor, n_layers: int, opts: CompOptions) -> tuple[list[int], list[float] | None]:
    if n_layers <= 0:
        return [], None
    if n_layers >= adapter.num_layers:
        raise ValueError(f"cannot remove {n_layers} of {adapter.num_layers} layers")
    if opts.layer_metric == "sleb":
        return sleb_removal(adapter, ids, n_layers, opts.batch_size), None
    bi = block_influence_scores(adapter, ids, opts.batch_size, opts.offload, opts.scratch_dir)
    return lowest(bi, n_layers), bi


def comp_prune(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, opts: CompOptions) -> dict[str, Any]:
    """Prune ``adapter.model`` in place to remove ``ratio`` of its parameters. Returns a report."""
    check_ratio(ratio)
    if opts.layer_fraction == "auto":
        frac, trials = choose_layer_fraction(adapter, ids, ratio, opts)
        opts = copy.replace(opts, layer_fraction=frac) if hasattr(copy, "replace") else CompOptions(
            **{**opts.__dict__, "layer_fraction": frac})
    else:
        trials = None
    total = adapter.num_parameters()
    budget = ratio * total
    if opts.n_layers is not None:
        n_layers = int(opts.n_layers)
        layer_budget = sum(module_params(l) for l in adapter.layers) / adapter.num_layers * n_layers
        if n_layers >= adapter.num_layers or layer_budget > budget * 1.0001 + 1:
            raise ValueError(f"n_layers={n_layers} is more than the model's {adapter.num_layers} layers allow "
                             f"at ratio {ratio}")
    else:
        n_layers = min(layers_for_params(adapter, float(opts.layer_fraction) * budget), adapter.num_layers - 1)
    removed, bi = _select_layers(adapter, ids, n_layers, opts)
    if opts.allocation_strength > 0 and bi is None:
        bi = block_influence_scores(adapter, ids, opts.batch_size, opts.offload, opts.scratch_dir)
    dense_layers = list(adapter.layers)
    layer_params = sum(module_params(adapter.layers[i]) for i in removed)
    kept = [i for i in range(adapter.num_layers) if i not in removed]
    adapter.remove_layers(removed)
    importance = [bi[i] for i in kept] if (bi is not None and opts.allocation_strength > 0) else None
    targets = neuron_targets(adapter, list(range(len(kept))), int(budget - layer_params), opts.head_sparsity,
                             importance=importance, strength=opts.allocation_strength,
                             cap=opts.max_layer_sparsity)
    fine = prune_neurons_layerwise(adapter, ids, removed, targets, opts, dense_layers)
    return {"removed_layers": removed, "block_influence": bi, "layer_fraction": float(opts.layer_fraction),
            "auto_trials": trials, **fine}


def choose_layer_fraction(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float,
                          opts: CompOptions) -> tuple[float, list[dict[str, float]]]:
    """Pick the layer fraction with the lowest held-out calibration NLL.

    Each candidate prunes a copy of the model with ``auto_nsamples`` calibration samples and is
    scored on other calibration samples (held out from that fit). Costs one model copy.
    """
    n = max(2, min(opts.auto_nsamples, ids.shape[0] // 2))
    fit, held = ids[:n], ids[n:2 * n]
    trials = []
    for frac in opts.auto_candidates:
        trial_model = copy.deepcopy(adapter.model)
        from ...adapters import get_adapter

        ta = get_adapter(trial_model)
        try:
            comp_prune(ta, fit, ratio, CompOptions(**{**opts.__dict__, "layer_fraction": frac}))
            nll = calibration_nll(ta, held, opts.batch_size)
        except ValueError as exc:  # e.g. a layer would lose every channel
            log.info("layer fraction %.2f infeasible: %s", frac, exc)
            nll = float("inf")
        trials.append({"layer_fraction": frac, "calibration_nll": nll})
        del trial_model, ta
    best = min(trials, key=lambda t: t["calibration_nll"])
    return float(best["layer_fraction"]), trials
