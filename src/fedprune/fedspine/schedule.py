"""Cubic sparsity schedule for iterative prune-and-tune (Zhu & Gupta style).

A device prunes a little every ``interval`` local steps. After pruning step ``t`` of ``T``
its sparsity target is

    s_t = s_f + (s_0 - s_f) * (1 - t / T)^3,     t = 0..T

so ``s_0`` at ``t = 0`` and exactly ``s_f`` at ``t = T``: fast early, gentle at the end,
when fewer redundant units remain. Values are clamped to ``[min(s_0, s_f), max(s_0, s_f)]``
so float error can never overshoot the target.

A round must leave the model it uploads recovered: ``prune_step_positions`` keeps the last
``recovery_steps`` local steps free of pruning, and ``round_sparsity_target`` moves a device's
sparsity toward the ratio its bandit chose by at most ``max_step`` per round (the cubic schedule
then runs within the round, from the current sparsity to that round's goal).
"""
from __future__ import annotations


def cubic_sparsity(t: int, total_steps: int, final: float, initial: float = 0.0) -> float:
    """Sparsity after pruning step ``t`` of ``total_steps`` (``t`` is clipped to ``[0, T]``)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not (0.0 <= initial <= 1.0 and 0.0 <= final <= 1.0):
        raise ValueError(f"sparsities must lie in [0, 1]; got initial={initial}, final={final}")
    t = min(max(int(t), 0), total_steps)
    if t == total_steps:
        return float(final)
    s = final + (initial - final) * (1.0 - t / total_steps) ** 3
    lo, hi = min(initial, final), max(initial, final)
    return float(min(max(s, lo), hi))


def is_prune_step(local_step: int, interval: int = 20) -> bool:
    """Whether to prune after local step ``local_step`` (1-based): every ``interval`` steps."""
    if interval <= 0:
        raise ValueError(f"interval must be positive, got {interval}")
    return local_step > 0 and local_step % interval == 0


def sparsity_at_local_step(local_step: int, final: float, num_prune_steps: int, interval: int = 20,
                           initial: float = 0.0) -> float:
    """Sparsity target in force after ``local_step`` local steps (1-based).

    Pruning step ``t = local_step // interval`` has happened; beyond ``num_prune_steps``
    pruning steps the target stays at ``final``.
    """
    if interval <= 0:
        raise ValueError(f"interval must be positive, got {interval}")
    return cubic_sparsity(max(local_step, 0) // interval, num_prune_steps, final, initial)


def sparsity_schedule(total_steps: int, final: float, initial: float = 0.0) -> list[float]:
    """``[s_0, s_1, ..., s_T]``: the whole schedule (length ``T + 1``)."""
    return [cubic_sparsity(t, total_steps, final, initial) for t in range(total_steps + 1)]


# ---- a device round that recovers ---------------------------------------------------------------
def prune_step_positions(local_steps: int, interval: int, recovery_steps: int) -> list[int]:
    """The local steps (1-based) after which a round prunes: every ``interval`` steps, but never in
    the last ``recovery_steps`` steps, so the LoRA trains on the final masks before it is uploaded.

    When no multiple of ``interval`` leaves room for recovery, the round prunes once, after step
    ``local_steps - recovery_steps``. ``recovery_steps`` is capped at ``local_steps - 1`` (a round of
    ``S`` steps can prune once and recover for ``S - 1``); a one-step round cannot prune at all.
    """
    if local_steps < 1 or interval < 1 or recovery_steps < 0:
        raise ValueError(f"need local_steps >= 1, interval >= 1 and recovery_steps >= 0; got {local_steps}, "
                         f"{interval}, {recovery_steps}")
    if local_steps == 1:
        return []
    last = local_steps - min(recovery_steps, local_steps - 1)
    steps = list(range(interval, last + 1, interval))
    return steps or [last]


def round_sparsity_target(current: float, target: float, max_step: float) -> float:
    """This round's sparsity goal: toward ``target`` from ``current`` by at most ``max_step``.

    Masks only grow, so a target at or below ``current`` keeps ``current`` (nothing is pruned).
    """
    if not 0.0 <= current <= 1.0 or not 0.0 <= target < 1.0 or not 0.0 < max_step <= 1.0:
        raise ValueError(f"need current in [0, 1], target in [0, 1), max_step in (0, 1]; got {current}, "
                         f"{target}, {max_step}")
    if target <= current:
        return float(current)
    return float(min(target, current + max_step))
