"""FedSpine on the device: LoRA fine-tuning interleaved with structured pruning.

One round on device ``k`` (``train_fedspine_client``, a drop-in for
``federated.local.train_client``; the loop is
``federated.local.train_steps`` with a step hook):

1. load the global LoRA at the rank the server chose and the device's persistent unit
   masks (sent back to it as LoRA row/column masks in ``task.extra["row_masks"]``);
2. every local step: forward/backward on the soft-masked model, fold the LoRAPrune
   importance of every head and FFN channel (LoRA gradients only) into the device's
   moving average (kept across rounds, like an optimiser state), AdamW step;
3. after every ``interval`` local steps, except in the last ``recovery_steps``: one pruning
   step on the cubic schedule from the sparsity the device already has to this round's goal,
   which moves toward the target ratio ``p`` the server chose by at most ``max_step`` per round
   (``fedspine.schedule``): the LoRA always trains on the final masks before it is uploaded,
   and a device approaches ``p`` over several rounds instead of being cut at once. Layers in
   ``protect_layers`` (default: first and last) keep every unit, the others prune more so the
   model still reaches the goal. Masks only ever grow (a pruned unit never comes back); if
   ``p`` is at or below the current sparsity nothing is pruned this round;
4. return the LoRA compacted to the kept rows/columns, the row/column masks, and metrics
   the server may see: losses (``loss_before``/``loss_after``: one fixed local batch
   evaluated before and after the round, what the bandit's reward reads), sparsity
   reached, pruning progress, FLOPs (step-weighted over the masks actually in force, plus
   the importance computation and the two probe forwards).

Sparsity = fraction of the attention + FFN matmul parameters removed (the budget
``fedspine.masks.layer_keep_masks`` works with).
"""
from __future__ import annotations

import time
from typing import Mapping, Sequence

import torch

from ..federated.aggregators import compact
from ..federated.local import (ClientResult, ClientTask, TrainSettings, adamw, detach_state, sample_batches, train_steps,
                               training_loss)
from ..federated.cost import train_flops
from ..federated.partition import collate
from ..federated.submodel import lora_masks
from .importance import ImportanceEMA, peft_lora_parts, update_model_importance
from .masks import apply_masks, attention_params, ffn_params, model_keep_masks
from .schedule import cubic_sparsity, prune_step_positions, round_sparsity_target

Masks = Mapping[str, Mapping[int, torch.Tensor]]


# ---- unit masks <-> LoRA row/column masks -----------------------------------------------------
def unit_masks_from_lora_masks(adapter, masks: Masks | None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Recover ``({layer: bool[num_heads]}, {layer: bool[width]})`` from ``lora_masks`` output.

    Heads come from the ``q_proj`` B rows or ``o_proj`` A columns, channels from
    ``gate/up`` B rows or ``down`` A columns; a layer without such masks keeps everything.
    """
    heads: dict[int, torch.Tensor] = {}
    chans: dict[int, torch.Tensor] = {}
    hd = adapter.head_dim
    for key, mk in (masks or {}).items():
        parts = key.split(".")
        i, role, which = int(parts[1]), parts[-2], parts[-1]
        if role == "q_proj" and which == "lora_B" and 0 in mk:
            heads[i] = mk[0].bool().view(-1, hd).all(dim=1)
        elif role == "o_proj" and which == "lora_A" and 1 in mk:
            heads[i] = mk[1].bool().view(-1, hd).all(dim=1)
        elif role in ("gate_proj", "up_proj", "fc1") and which == "lora_B" and 0 in mk:
            chans[i] = mk[0].bool()
        elif role in ("down_proj", "fc2") and which == "lora_A" and 1 in mk:
            chans[i] = mk[1].bool()
    return heads, chans


def full_unit_masks(adapter, heads: Mapping[int, torch.Tensor] | None = None,
                    chans: Mapping[int, torch.Tensor] | None = None) -> tuple[dict, dict]:
    """Masks for every layer (all-true where none is given)."""
    hm, cm = {}, {}
    for i, layer in enumerate(adapter.layers):
        hm[i] = (heads or {}).get(i, torch.ones(adapter.num_heads(layer), dtype=torch.bool)).bool().clone()
        cm[i] = (chans or {}).get(i, torch.ones(adapter.ffn_out(layer).in_features, dtype=torch.bool)).bool().clone()
    return hm, cm


def model_sparsity(adapter, heads: Mapping[int, torch.Tensor], chans: Mapping[int, torch.Tensor]) -> float:
    """Fraction of attention + FFN matmul parameters removed by the masks (whole model)."""
    kept = total = 0
    hid, hd = adapter.hidden_size, adapter.head_dim
    for i, layer in enumerate(adapter.layers):
        nh, nkv = adapter.num_heads(layer), adapter.num_kv_heads(layer)
        width = adapter.ffn_out(layer).in_features
        total += attention_params(nh, nkv, hd, hid) + ffn_params(width, hid, adapter.gated_ffn)
        h = heads.get(i, torch.ones(nh, dtype=torch.bool)).bool()
        c = chans.get(i, torch.ones(width, dtype=torch.bool)).bool()
        n_kv = int(h.view(nkv, -1).any(dim=1).sum())
        kept += attention_params(int(h.sum()), n_kv, hd, hid) + ffn_params(int(c.sum()), hid, adapter.gated_ffn)
    return 1.0 - kept / total


def _importance_flops(base, keys: Sequence[str], rank: int) -> float:
    """FLOPs of one LoRAPrune importance pass: ``G = dB A + B dA - dB dA`` and ``|G (W + s B A)|``."""
    return float(sum(4 * 2 * base.shapes[k][0] * base.shapes[k][1] * rank for k in keys))


def _params_through(base, heads: Mapping[int, torch.Tensor], chans: Mapping[int, torch.Tensor]) -> int:
    """Frozen matmul weights a token flows through under these masks (kept fraction per layer)."""
    return base.params_through(None, {i: float(m.float().mean()) for i, m in heads.items()},
                               {i: float(m.float().mean()) for i, m in chans.items()})


def _probe_loss(base, batch, settings: TrainSettings, handle) -> tuple[float, float]:
    """(loss, forward FLOPs) of ``batch`` on the masked model in eval mode, without gradients."""
    base.model.eval()
    with torch.no_grad():
        loss = float(training_loss(base, batch, settings))
    through = _params_through(base, handle.head_masks, handle.channel_masks)
    return loss, train_flops(through, int(batch["attention_mask"].sum())) / 3.0  # forward: a third


# ---- the device round ------------------------------------------------------------------------------
class _PruneWhileTuning:
    """The :class:`~fedprune.federated.local.StepHook` of a FedSpine round: after each backward it
    counts the step's FLOPs under the masks in force and folds the LoRA-gradient importance into
    the moving average; after the optimiser steps in ``positions`` (1-based) it takes one pruning
    step, the ``k``-th of them to the cubic schedule's ``k``-th value from ``s_start`` to ``target``."""

    def __init__(self, base, handle, ema: ImportanceEMA, parts_fn, trainable: int, imp_flops: float,
                 do_prune: bool, positions: Sequence[int], target: float, s_start: float,
                 protect: Sequence[int] = ()):
        self.base, self.handle, self.ema, self.parts_fn = base, handle, ema, parts_fn
        self.trainable, self.imp_flops = trainable, imp_flops
        self.do_prune, self.positions = do_prune, list(positions)
        self.target, self.s_start, self.protect = target, s_start, tuple(protect)
        self.flops = 0.0
        self.prune_log: list[float] = []
        self.scores: dict = {}

    def after_backward(self, step: int, tokens: int) -> None:
        h = self.handle
        self.flops += train_flops(_params_through(self.base, h.head_masks, h.channel_masks), tokens, self.trainable)
        if self.do_prune:  # importance from this step's LoRA gradients (before clipping), smoothed
            self.scores = update_model_importance(self.base.model, self.ema, self.parts_fn)
            self.flops += self.imp_flops

    def after_step(self, step: int) -> None:
        s = step + 1
        if not (self.do_prune and s in self.positions):
            return
        ratio = cubic_sparsity(self.positions.index(s) + 1, len(self.positions), self.target, self.s_start)
        h = self.handle
        new_h, new_c = model_keep_masks(self.base.model, {i: v[0] for i, v in self.scores.items()},
                                        {i: v[1] for i, v in self.scores.items()}, ratio,
                                        prev=(h.head_masks, h.channel_masks), protect=self.protect)
        for i in new_h:  # edit in place: the hooks read these dicts
            h.head_masks[i] = new_h[i]
            h.channel_masks[i] = new_c[i]
        self.prune_log.append(ratio)


def train_fedspine_client(base, task: ClientTask, examples: Sequence[dict], settings: TrainSettings, seed: int,
                          pad_id: int, device_state: Mapping | None = None) -> tuple[ClientResult, dict]:
    """One FedSpine round on a device (see module doc). Returns the result and the device's
    local state to keep for its next round (importance averages, AdamW moments if kept)."""
    if not examples:
        raise ValueError(f"client {task.cid} has no training examples")
    t0 = time.perf_counter()
    extra = task.extra or {}
    target = float(extra.get("ratio", 0.0))
    interval = int(extra.get("interval", 20))
    momentum = float(extra.get("momentum", 0.9))
    max_step = float(extra.get("max_step", 1.0))
    recovery = int(extra.get("recovery_steps", 0))
    protect = [int(i) for i in extra.get("protect_layers", ())]
    if not 0.0 <= target < 1.0 or interval < 1 or not 0.0 < max_step <= 1.0 or recovery < 0:
        raise ValueError(f"bad FedSpine task: ratio={target} (in [0, 1)), interval={interval} (>= 1), "
                         f"max_step={max_step} (in (0, 1]), recovery_steps={recovery} (>= 0)")
    base.load_lora(task.lora, task.rank)
    torch.manual_seed(seed)
    ad = base.adapter
    keys = sorted(base.modules)
    params = list(base.named_trainable(keys).values())
    state = dict(device_state or {})
    opt = adamw(params, settings, state.get("adamw"))
    ema = ImportanceEMA(momentum)
    ema.load_state_dict(state.get("importance") or {})

    hm, cm = full_unit_masks(ad, *unit_masks_from_lora_masks(ad, extra.get("row_masks")))
    if task.head_masks:
        hm.update({i: m.bool().clone() for i, m in task.head_masks.items()})
    if task.channel_masks:
        cm.update({i: m.bool().clone() for i, m in task.channel_masks.items()})
    s_start = model_sparsity(ad, hm, cm)
    steps = task.local_steps or settings.local_steps
    goal = round_sparsity_target(min(s_start, 1.0), target, max_step)  # this round's step toward the target
    positions = prune_step_positions(steps, interval, recovery)
    do_prune = goal > s_start + 1e-9 and bool(positions)
    parts_fn = lambda mod: peft_lora_parts(mod, f"r{task.rank}")  # noqa: E731  (SharedBaseModel names adapters r{rank})
    trainable = sum(p.numel() for p in params)

    batches = sample_batches(examples, steps, settings.grad_accum, settings.batch_size, seed)
    probe = collate(batches[0], pad_id)  # the reward's loss before/after: one fixed batch, same mode
    handle = apply_masks(base.model, hm, cm)
    try:
        probe_before, probe_flops = _probe_loss(base, probe, settings, handle)
        hook = _PruneWhileTuning(base, handle, ema, parts_fn, trainable, _importance_flops(base, keys, task.rank),
                                 do_prune, positions, goal, s_start, protect)
        base.model.train()
        losses, tokens = train_steps(base, params, opt, batches, settings, pad_id, hook)
        probe_after, f_after = _probe_loss(base, probe, settings, handle)
        flops = hook.flops + (probe_flops + f_after)
        hm, cm = dict(handle.head_masks), dict(handle.channel_masks)
    finally:
        handle.remove()
        base.model.eval()

    full = base.lora_state(keys)
    masks = lora_masks(ad, keys, hm, cm)
    lora = {k: compact(v, masks.get(k)) for k, v in full.items()}
    sparsity = model_sparsity(ad, hm, cm)
    tail = losses[-max(1, min(2, len(losses) // 2)):]
    metrics = {
        "train_loss_first": losses[0], "train_loss_last": losses[-1],
        "train_loss_mean": sum(losses) / len(losses), "tokens": tokens, "steps": steps,
        # the same batch before training (incoming LoRA and masks) and after (final LoRA and masks):
        # pruning damage and recovery both show, batch-to-batch noise does not
        "loss_before": probe_before, "loss_after": probe_after, "train_loss_tail": sum(tail) / len(tail),
        "sparsity_start": s_start, "sparsity": sparsity, "target_ratio": target, "round_target": goal,
        "prune_steps": len(hook.prune_log),
        "recovery_steps": steps - max(positions) if hook.prune_log else steps, "trainable_params": trainable,
        "params_through": _params_through(base, hm, cm),
        "train_flops": flops, "wall_s": time.perf_counter() - t0,
    }
    keep = {"importance": ema.state_dict(),
            "adamw": detach_state(opt.state_dict()) if settings.keep_optimizer_state else None}
    return ClientResult(task.cid, task.round, task.rank, lora, masks, len(examples), metrics), keep
