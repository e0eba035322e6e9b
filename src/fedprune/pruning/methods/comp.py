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
With ``weight_offload`` (``pruning.streamed``) the weights are streamed too, in two passes: step 1's
Block Influence over the dense layers, then steps 2-3 layer by layer, each kept layer materialised,
pruned, mask-tuned and written to the output before the next one loads.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ...adapters import DecoderAdapter
from ..budget import (LayerTarget, channel_cost, check_ratio, head_params_removed, layers_for_params,
                      module_params, neuron_targets)
from ..criteria.layer import block_influence_scores, calibration_nll, lowest, sleb_removal
from ..criteria.neuron import NEURON_CRITERIA, check_neuron_metric, removal_order
from ..activations import OFFLOAD_MODES, HiddenStream, release_free_memory
from ..layerwise import advance_stream, capture_layer0_stream, final_logits_nll, hooks, run_layer
from ..selection import choose_heads, heads_removed
from ..mask_tuning import MaskFit, fit_scales, fold_column_scales, system_error
from ..stats import GramAccumulator, flat_tokens, linear_bias
from ..streamed import finish_layer, layer_weights, load_layer, original_weights, resumed_layer
from ..width import check_option as check_width_option
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
    neuron_metric: str = "energy"
    """One of ``criteria.neuron.NEURON_CRITERIA``. The default is the simplest: on SmolLM2-135M under the
    full protocol (benchmarks/pruning/results/full) the leave-one-out ``rescale_obs`` (the default until
    then) and the condition-number ``cond_greedy`` were no better than ``energy`` on perplexity or the 7-task
    average; ``energy`` needs no inverse of the layer's system."""
    mask_tuning: bool = True
    """Recover each pruned layer by mask tuning (one least-squares scale per kept head / channel)."""
    mask_target: str = "local"
    """What mask tuning fits (``mask_tuning``): ``local`` (default) the dense module's output on the same pruned
    inputs (the error this layer's pruning made), ``global`` the dense model's layer output (adds the drift
    inherited from earlier pruned layers). On SmolLM2-135M at 20 % the global fit *raised* the layer's own
    error on held-out calibration batches in 27 of 29 layers (scales down to -0.2); the local fit lowered it
    in all 29; perplexity is the same within noise (benchmarks/pruning/results/masktuning)."""
    mask_bias: bool = False
    """Fit a per-output constant with the scales (folded into ``o_proj``/``down_proj``'s bias; created and
    recorded in the plan where the architecture has none)."""
    mask_damp: float | str | None = None
    """Mask tuning's relative damping: a number, ``None`` (= ``damp``) or ``"heldout"`` (the best of
    ``MASK_DAMP_GRID`` on held-out calibration samples)."""
    mask_fallback: str = "reject"
    """A solution with a scale above 10: ``reject`` (keep the layer's scales at 1) or ``retry`` with
    tenfold damping, up to four times."""
    head_sparsity: float | str | None = 0.0
    """Fraction of query heads removed per KV group; ``None``: same as the layer's sparsity; 0 (default): no
    head pruning. SmolLM2 has 3 query heads per KV group, so any head pruning removes a third of them, which
    cost far more perplexity than the same parameters taken from FFN channels (benchmarks/pruning).
    ``"auto"``: each layer decides on its own calibration tokens (:func:`heads_or_channels`): the heads planned
    at the layer's sparsity go only if their fixable error is at most what the same parameters cost as
    extra FFN channels; otherwise the layer gives those parameters as channels."""
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
    width_multiple: int = 1
    """Kept FFN widths and kept heads x head_dim multiples of this (32 for llama.cpp's q4_0/q8_0 blocks,
    256 for k-quants), the budget re-balanced over the layers; 1 = off (``pruning.width``)."""

    def __post_init__(self):
        if self.layer_fraction != "auto" and not 0.0 <= float(self.layer_fraction) <= 1.0:
            raise ValueError(f"layer_fraction must be in [0, 1] or 'auto', got {self.layer_fraction!r}")
        if self.allocation_strength < 0:
            raise ValueError(f"allocation_strength must be >= 0, got {self.allocation_strength}")
        if not 0.0 < self.max_layer_sparsity < 1.0:
            raise ValueError(f"max_layer_sparsity must be in (0, 1), got {self.max_layer_sparsity}")
        if self.layer_metric not in ("bi", "sleb"):
            raise ValueError(f"layer_metric must be 'bi' or 'sleb', got {self.layer_metric!r}")
        check_neuron_metric(self.neuron_metric)  # raises with the known names (or the new name)
        if self.mask_target not in MASK_TARGETS:
            raise ValueError(f"mask_target must be one of {MASK_TARGETS}, got {self.mask_target!r}")
        if self.mask_fallback not in ("reject", "retry"):
            raise ValueError(f"mask_fallback must be 'reject' or 'retry', got {self.mask_fallback!r}")
        if isinstance(self.mask_damp, str) and self.mask_damp != "heldout":
            try:  # from the command line every value is text
                self.mask_damp = float(self.mask_damp)
            except ValueError:
                raise ValueError(f"mask_damp must be a number >= 0 or 'heldout', got {self.mask_damp!r}") from None
        if self.mask_damp is not None and self.mask_damp != "heldout":
            require_number("mask_damp", self.mask_damp, 0.0)
        if self.offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {self.offload!r}")
        require_int("batch_size", self.batch_size, 1)
        if self.n_layers is not None:
            require_int("n_layers", self.n_layers, 0)
        if isinstance(self.head_sparsity, str) and self.head_sparsity != "auto":
            try:  # from the command line every value is text
                self.head_sparsity = float(self.head_sparsity)
            except ValueError:
                raise ValueError("head_sparsity must be a number in [0.0, 1.0), 'auto' or None, "
                                 f"got {self.head_sparsity!r}") from None
        if self.head_sparsity is not None and self.head_sparsity != "auto":
            require_number("head_sparsity", self.head_sparsity, 0.0, 1.0, high_open=True)
        require_number("damp", self.damp, 0.0)
        require_int("auto_nsamples", self.auto_nsamples, 1)
        for c in self.auto_candidates:
            require_number("auto_candidates[]", c, 0.0, 1.0)
        self.width_multiple = check_width_option(self.width_multiple)
        if self.head_sparsity == "auto" and self.width_multiple > 1:
            raise ValueError("head_sparsity='auto' cannot be combined with width_multiple > 1 (a layer that keeps "
                             "its heads takes their parameters as channels, which need not fill whole blocks)")

    def whole_model(self) -> str | None:
        """Why these options need the whole model in memory (``weight_offload`` refuses them), or None."""
        if self.layer_metric == "sleb":
            return "scores layer removals (layer_metric='sleb') by the whole model's calibration loss"
        if self.layer_fraction == "auto":
            return "picks layer_fraction='auto' by pruning copies of the whole model"
        return None


def _head_rank_scores(criterion: str, stats, n_remove: int, damp: float) -> torch.Tensor:
    return NEURON_CRITERIA.get(criterion)(stats, n_remove, damp)


MASK_TARGETS = ("global", "local")
MASK_DAMP_GRID = (1e-3, 1e-2, 1e-1, 1.0)
"""Relative dampings tried by ``mask_damp="heldout"`` (and infinite damping: no tuning, chosen when every
fit raises the error on the held-out batches)."""


def held_out_batch(b: int, num_batches: int) -> bool:
    """Calibration batches held out from the mask-tuning fit (to choose damping and report honest errors):
    every fourth batch, or the last one when there are fewer than four; none when there is one batch."""
    if num_batches < 2:
        return False
    return b % 4 == 3 if num_batches >= 4 else b == num_batches - 1


def _errors(sys_by_target: dict, fit: MaskFit) -> dict[str, list[float]]:
    return {t: [system_error(S, torch.ones_like(fit.scales)), system_error(S, fit.scales, fit.bias)]
            for t, S in sys_by_target.items()}


def _mask_tune(adapter: DecoderAdapter, kept_pos: int, site: str, fit_acc: GramAccumulator,
               held_acc: GramAccumulator, all_acc: GramAccumulator, keep: list[int], opts: CompOptions,
               group: int = 1) -> dict[str, Any]:
    """Mask tuning of the kept units (``keep``, ``group`` columns each) of ``site`` (``o_proj`` / ``ffn_out``).

    The scales (and bias, ``mask_bias``) are solved on all calibration tokens and folded into the layer.
    The record holds, per target (``global``: the dense model's output; ``fixable``: the dense module's
    output on the same pruned inputs), the error ``[before, after]`` in sample and, for a solution fitted
    on the other batches only, on held-out batches; ``fixable_share_removed`` is
    ``1 - after / before`` of the fixable error on held-out tokens (in sample without held-out batches).
    """
    fitted = opts.mask_target
    kw = dict(bias=opts.mask_bias, fallback=opts.mask_fallback)
    has_held = held_acc.n > 0 and fit_acc.n > 0
    damp = opts.damp if opts.mask_damp is None else opts.mask_damp
    grid = None
    if damp == "heldout":
        if has_held:
            S_fit, S_held = fit_acc.system(fitted, keep), held_acc.system(fitted, keep)
            grid = {float("inf"): system_error(S_held, torch.ones(len(keep), dtype=torch.float64))}  # no tuning
            for d in MASK_DAMP_GRID:
                f = fit_scales(S_fit, d, **kw)
                grid[d] = system_error(S_held, f.scales, f.bias) if f.accepted else grid[float("inf")]
            damp = min(grid, key=grid.get)
        else:
            damp = opts.damp
    if damp == float("inf"):  # held-out batches say: any tuning makes this layer worse
        ones = torch.ones(len(keep), dtype=torch.float64)
        e0 = system_error(all_acc.system(fitted, keep), ones)
        sol = MaskFit(ones, None, False, "no gain on held-out batches", damp, e0, e0)
    else:
        sol = fit_scales(all_acc.system(fitted, keep), float(damp), **kw)
    rec: dict[str, Any] = {"accepted": sol.accepted, "reason": sol.reason, "target": fitted,
                           "damp": sol.damp if sol.damp != float("inf") else None,
                           "err_before": sol.error_before, "err_after": sol.error_after,
                           "in_sample": _errors({"global": all_acc.system("global", keep),
                                                 "fixable": all_acc.system("local", keep)}, sol)}
    if grid is not None:
        rec["damp_grid_heldout_error"] = {str(d): e for d, e in grid.items()}
    if sol.accepted:
        rec["scale_min"], rec["scale_max"] = float(sol.scales.min()), float(sol.scales.max())
    if has_held:
        hsol = sol if not sol.accepted else fit_scales(fit_acc.system(fitted, keep), sol.damp, **kw)
        rec["held_out"] = _errors({"global": held_acc.system("global", keep),
                                   "fixable": held_acc.system("local", keep)}, hsol)
    ref = rec.get("held_out", rec["in_sample"])["fixable"]
    rec["fixable_share_removed"] = (1.0 - ref[1] / ref[0]) if ref[0] > 0 else 0.0
    if sol.accepted:
        lin = getattr(adapter, site)(adapter.layers[kept_pos])
        fold_column_scales(lin, sol.scales, group=group)
        if sol.bias is not None:
            rec["bias_added"] = lin.bias is None  # created (and recorded in the plan) or added to the existing one
            adapter.add_output_bias(kept_pos, site, sol.bias)
    return rec


def _channel_accumulators(adapter: DecoderAdapter, layer, x_pruned: HiddenStream, y_dense: HiddenStream, kw, bs: int
                          ) -> tuple[GramAccumulator, GramAccumulator]:
    """FFN-channel statistics of ``layer`` on the pruned stream's tokens, (fitted-on, held-out) batches: the
    down projection's inputs and, as targets, the dense module's contribution on the same inputs (``local``)
    and the dense model's layer output (``global``)."""
    down = adapter.ffn_out(layer)
    accs = (GramAccumulator(adapter.intermediate_size(layer), MASK_TARGETS),
            GramAccumulator(adapter.intermediate_size(layer), MASK_TARGETS))
    nb = x_pruned.num_batches
    for b, xb in x_pruned.batches():
        cap: dict[str, torch.Tensor] = {}

        def grab(m, i, out):
            cap["h"], cap["f"] = flat_tokens(i[0]).detach(), flat_tokens(out).detach()

        with hooks([(down, grab)]):
            yb = run_layer(layer, xb, kw, bs)
        local = cap["f"] - linear_bias(down)  # the dense module's contribution on these inputs
        e = {"global": flat_tokens(y_dense.read(b) - yb) + local, "local": local}
        accs[held_out_batch(b, nb)].add_channels(cap["h"], down.weight, e)
        del cap, yb, e, local
    return accs


def fixable_error(acc: GramAccumulator, keep: list[int], opts: CompOptions) -> float:
    """The fixable (``local``) error left when only ``keep`` of ``acc``'s units stay: after mask tuning of
    the kept units as ``opts`` would tune them (their rescaled fit; the plain removal without
    ``mask_tuning`` or when the fit is rejected). Units of heads and channels are both measured on the
    layer's output in the residual stream, so the two are comparable."""
    S = acc.system("local", keep)
    ones = torch.ones(len(keep), dtype=torch.float64)
    plain = system_error(S, ones)
    if not opts.mask_tuning:
        return plain
    damp = opts.damp if opts.mask_damp in (None, "heldout") else float(opts.mask_damp)
    fit = fit_scales(S, damp, bias=opts.mask_bias, fallback=opts.mask_fallback)
    return min(plain, fit.error_after) if fit.accepted else plain


def heads_or_channels(adapter: DecoderAdapter, layer, tgt: LayerTarget, head_acc: GramAccumulator,
                      keep_heads: list[int], ch_accs, opts: CompOptions
                      ) -> tuple[LayerTarget, dict[str, Any], list[int]]:
    """``head_sparsity="auto"`` for one layer: remove the planned heads, or as many parameters as FFN channels?

    ``E_h`` = fixable error with the planned heads gone (``keep_heads`` kept, :func:`fixable_error`);
    ``E_c`` = what the extra ``x = round(P_h / c)`` channels add to the error of the planned channel
    removal, ``P_h`` the heads' parameters and ``c`` one channel's: ``E(drop_{n+x}) - E(drop_n)``, the
    channels chosen by the layer's criterion on its present inputs. Heads go when ``E_h <= E_c``;
    otherwise the target becomes ``n + x`` channels and no head. ``carry_params`` is what whole channels
    could not match (``P_h - x c``), given to the next layer. Also returns the channel removal order
    (``n + x`` channels, least important first), which the layer's FFN step reuses when the heads stay."""
    hd_params = head_params_removed(adapter, layer, tgt)
    ccost = channel_cost(adapter, layer)
    width = adapter.intermediate_size(layer)
    extra = min(int(round(hd_params / ccost)), width - 1 - tgt.channels)
    down = adapter.ffn_out(layer)
    acc = ch_accs[0].merged(ch_accs[1])
    st = acc.unit_stats_channels(down.weight)
    order = removal_order(opts.neuron_metric, st, tgt.channels + extra, opts.damp)

    def kept(n):
        gone = set(order[:n])
        return [c for c in range(width) if c not in gone]

    e_heads = fixable_error(head_acc, keep_heads, opts)
    e_base = fixable_error(acc, kept(tgt.channels), opts)
    e_more = fixable_error(acc, kept(tgt.channels + extra), opts)
    prune = e_heads <= e_more - e_base
    rec = {"prune_heads": prune, "heads_error": e_heads, "extra_channels_error": e_more - e_base,
           "head_params": hd_params, "extra_channels": 0 if prune else extra,
           "carry_params": 0 if prune else hd_params - extra * ccost}
    if prune:
        return tgt, rec, order
    return LayerTarget(0, 0, tgt.channels + extra), rec, order


def _with_carry(adapter: DecoderAdapter, layer, tgt: LayerTarget, carry: int) -> tuple[LayerTarget, int]:
    """``tgt`` with the parameters an earlier layer left over added as whole channels (within the layer's
    width), and what still remains."""
    if not carry:
        return tgt, carry
    ccost = channel_cost(adapter, layer)
    add = max(-tgt.channels, min(int(round(carry / ccost)), adapter.intermediate_size(layer) - 1 - tgt.channels))
    return LayerTarget(tgt.heads_per_group, tgt.groups, tgt.channels + add), carry - add * ccost


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
    carry = 0  # parameters a layer could not give in whole channels (head_sparsity="auto"): the next one gives them
    for orig_i, dense_layer in enumerate(tqdm(dense_layers, desc="COMP layer by layer")):
        if orig_i in removed_layers:
            with layer_weights(adapter, dense_layer):
                advance_stream(dense_layer, x_dense, kw)  # the dense stream still passes through it
            continue
        layer = dense_layer  # the same module: kept layers are pruned in place
        done = resumed_layer(adapter, layer)
        if done is not None:  # a resumed streamed prune: pruned and written before the interruption
            with original_weights(adapter, layer) as dense:
                advance_stream(dense, x_dense, kw)
            with layer_weights(adapter, layer):
                advance_stream(layer, x_pruned, kw)
            report.append(done)
            kept_pos += 1
            continue
        load_layer(adapter, layer)  # streamed: materialised until finish_layer
        tgt, carry = _with_carry(adapter, layer, targets[kept_pos], carry)
        entry: dict[str, Any] = {"layer": orig_i}
        ch_accs = ch_order = None  # set by head_sparsity="auto" when the layer keeps its heads
        prune_heads = bool(tgt.heads_per_group or tgt.groups)
        # -- dense targets: post-attention residual (only when heads are pruned) and output of the
        #    unpruned layer; the output overwrites the dense stream (it is the next layer's input)
        o = adapter.o_proj(layer)
        mid_dense = HiddenStream(x_dense.n, x_dense.seq_len, x_dense.d, bs, x_dense.dtype, opts.offload,
                                 opts.scratch_dir, x_dense.device) if prune_heads else None
        for b, xb in x_dense.batches():

            def keep_mid(m, i, out, xb=xb, b=b):  # a forward hook must return None
                mid_dense.write(b, xb + out)

            with hooks([(o, keep_mid)] if prune_heads else []):
                x_dense.write(b, run_layer(layer, xb, kw, bs))
        y_dense = x_dense
        # -- attention heads
        if prune_heads:
            accs = (GramAccumulator(adapter.num_heads(layer), MASK_TARGETS),
                    GramAccumulator(adapter.num_heads(layer), MASK_TARGETS))  # fitted on, held out
            nb = x_pruned.num_batches
            for b, xb in x_pruned.batches():
                acc = accs[held_out_batch(b, nb)]

                def grab_heads(m, i, out, xb=xb, b=b, acc=acc):
                    ob = linear_bias(m)
                    e = {"global": flat_tokens(mid_dense.read(b) - xb) - ob, "local": flat_tokens(out) - ob}
                    acc.add_heads(flat_tokens(i[0]), m.weight, e, hd)

                with hooks([(o, grab_heads)]):
                    run_layer(layer, xb, kw, bs)
            acc = accs[0].merged(accs[1])
            st = acc.unit_stats_heads()
            accs[0].unit_stats_heads(), accs[1].unit_stats_heads()
            n_rm = heads_removed(adapter, layer, tgt)
            scores = _head_rank_scores(opts.neuron_metric, st, n_rm, opts.damp)
            keep = choose_heads(adapter, layer, scores, tgt)
            if opts.head_sparsity == "auto":
                ch_accs = _channel_accumulators(adapter, layer, x_pruned, y_dense, kw, bs)
                tgt, decision, ch_order = heads_or_channels(adapter, layer, tgt, acc, keep, ch_accs, opts)
                entry["head_decision"] = decision
                if decision["prune_heads"]:
                    ch_accs = ch_order = None  # the FFN's inputs change with the heads: score them again
            if tgt.heads_per_group or tgt.groups:
                adapter.prune_heads(kept_pos, keep)
                entry["heads_kept"] = len(keep)
                if opts.mask_tuning:
                    entry["heads_mask"] = _mask_tune(adapter, kept_pos, "o_proj", accs[0], accs[1], acc, keep, opts,
                                                     group=hd)
        if mid_dense is not None:
            mid_dense.close()
        # -- FFN channels
        if tgt.channels:
            down = adapter.ffn_out(layer)
            if ch_accs is None:  # (an ``auto`` decision that kept the heads has them for these very inputs)
                ch_accs = _channel_accumulators(adapter, layer, x_pruned, y_dense, kw, bs)
            accs = ch_accs
            acc = accs[0].merged(accs[1])
            st = acc.unit_stats_channels(down.weight)
            accs[0].unit_stats_channels(down.weight), accs[1].unit_stats_channels(down.weight)
            # (the auto decision ranked exactly these channels on these inputs: the same call, not repeated)
            drop = set(ch_order if ch_order is not None else removal_order(opts.neuron_metric, st, tgt.channels,
                                                                            opts.damp))
            keep = [c for c in range(acc.k) if c not in drop]
            adapter.prune_ffn_channels(kept_pos, keep)
            entry["channels_kept"] = len(keep)
            if opts.mask_tuning:
                entry["ffn_mask"] = _mask_tune(adapter, kept_pos, "ffn_out", accs[0], accs[1], acc, keep, opts)
        if "head_decision" in entry:
            carry += entry["head_decision"]["carry_params"]
        advance_stream(layer, x_pruned, kw)
        finish_layer(adapter, layer, entry)  # streamed: written to the output and released
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
    hs = None if opts.head_sparsity == "auto" else opts.head_sparsity  # auto: planned at the layer's sparsity
    targets = neuron_targets(adapter, list(range(len(kept))), int(budget - layer_params), hs,
                             importance=importance, strength=opts.allocation_strength,
                             cap=opts.max_layer_sparsity, width_multiple=opts.width_multiple)
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
