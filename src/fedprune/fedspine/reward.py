"""FedSpine's bandit reward, one swappable function (registry ``REWARDS``).

*Reconstruction* of the abstract's goal: reward configurations that improve the model,
make pruning progress, and finish quickly relative to the round, so a slow device learns
to take smaller, faster configurations.

    gain  = clip((loss_before - loss_after) / loss_before, -1, 1)   relative loss improvement
    prog  = clip(prune_progress, 0, 1)                               e.g. sparsity reached / target
    rel   = max(device_time / round_time, rel_floor)                 1 = as slow as the round
    raw   = gain * (progress_floor + (1 - progress_floor) * prog) / rel
    reward = 0.5 + 0.5 * tanh(raw / scale)                           in (0, 1)

``round_time`` is what the server observes for the round (the slowest selected device, or
the deadline). ``tanh`` keeps rewards bounded for the UCB constant ``c`` while staying
linear for small ``raw``; ``scale`` sets where it saturates (typical relative loss gains
per round are a few percent, hence the default 0.05). ``progress_floor = 0`` is the plain
product "improvement x progress"; a small positive floor still credits loss improvement
in rounds without pruning.
"""
from __future__ import annotations

import math
from typing import Callable

from ..registry import Registry

RewardFn = Callable[..., float]
REWARDS: Registry[RewardFn] = Registry("bandit reward")


@REWARDS.register("fedspine")
def fedspine_reward(loss_before: float, loss_after: float, prune_progress: float, device_time: float,
                    round_time: float, *, scale: float = 0.05, rel_floor: float = 0.1,
                    progress_floor: float = 0.0, eps: float = 1e-12) -> float:
    """Bounded reward in (0, 1); 0.5 means "no gain" (see module doc for the formula)."""
    if device_time < 0 or round_time <= 0:
        raise ValueError(f"need device_time >= 0 and round_time > 0, got {device_time}, {round_time}")
    if scale <= 0 or not 0 < rel_floor or not 0 <= progress_floor <= 1:
        raise ValueError("need scale > 0, rel_floor > 0 and 0 <= progress_floor <= 1")
    if not (math.isfinite(loss_before) and math.isfinite(loss_after)):
        return 0.0  # a diverged round is the worst outcome
    gain = (loss_before - loss_after) / max(abs(loss_before), eps)
    gain = min(max(gain, -1.0), 1.0)
    prog = min(max(float(prune_progress), 0.0), 1.0)
    rel = max(device_time / round_time, rel_floor)
    raw = gain * (progress_floor + (1.0 - progress_floor) * prog) / rel
    return 0.5 + 0.5 * math.tanh(raw / scale)


def get_reward(name: str = "fedspine") -> RewardFn:
    return REWARDS.get(name)
