"""FedSpine's bandit reward, one swappable function (registry ``REWARDS``).

*Reconstruction* of the abstract's goal: reward configurations that improve the model,
make pruning progress, and finish quickly relative to the round, so a slow device learns
to take smaller, faster configurations.

    gain  = clip(ln(loss_before / loss_after), -gain_clip, gain_clip)  log loss ratio
    f     = max(progress_floor + (1 - progress_floor) * clip(prune_progress, 0, 1), f_min)
    rel   = max(device_time / round_time, rel_floor)                 1 = as slow as the round
    raw   = gain * f / rel    if gain >= 0       (improvement x progress / relative time)
          = gain * rel / f    if gain <  0       (a loss: smaller when faster and further pruned)
    reward = 0.5 + 0.5 * tanh(raw / scale)                           in (0, 1)

The reward rises with the loss gain, with pruning progress and with speed, for gains of
either sign: a plain ``gain * f / rel`` would punish a *faster* device harder for the same
loss increase, and pruning makes the loss rise within a round. The gain is a log ratio so
pruning damage (the loss doubling, say) and training progress (a few per cent) both stay
inside the range where ``tanh`` still separates them (``scale`` sets where it saturates).
``round_time`` is what the server observes for the round (the slowest selected device, or
the deadline). ``progress_floor = 0`` is the plain product "improvement x progress"; a
positive floor still credits loss improvement in rounds without pruning.
"""
from __future__ import annotations

import math
from typing import Callable

from ..registry import Registry

RewardFn = Callable[..., float]
REWARDS: Registry[RewardFn] = Registry("bandit reward")


@REWARDS.register("fedspine")
def fedspine_reward(loss_before: float, loss_after: float, prune_progress: float, device_time: float,
                    round_time: float, *, scale: float = 0.5, rel_floor: float = 0.1,
                    progress_floor: float = 0.0, f_min: float = 0.05, gain_clip: float = 3.0,
                    eps: float = 1e-12) -> float:
    """Bounded reward in (0, 1); 0.5 means "no gain" (see module doc for the formula)."""
    if device_time < 0 or round_time <= 0:
        raise ValueError(f"need device_time >= 0 and round_time > 0, got {device_time}, {round_time}")
    if scale <= 0 or not 0 < rel_floor or not 0 <= progress_floor <= 1 or not 0 < f_min <= 1 or gain_clip <= 0:
        raise ValueError("need scale > 0, rel_floor > 0, 0 <= progress_floor <= 1, 0 < f_min <= 1, gain_clip > 0")
    if not (math.isfinite(loss_before) and math.isfinite(loss_after)):
        return 0.0  # a diverged round is the worst outcome
    gain = math.log(max(loss_before, eps) / max(loss_after, eps))
    gain = min(max(gain, -gain_clip), gain_clip)
    prog = min(max(float(prune_progress), 0.0), 1.0)
    f = max(progress_floor + (1.0 - progress_floor) * prog, f_min)
    rel = max(device_time / round_time, rel_floor)
    raw = gain * f / rel if gain >= 0 else gain * rel / f
    return 0.5 + 0.5 * math.tanh(raw / scale)


def get_reward(name: str = "fedspine") -> RewardFn:
    return REWARDS.get(name)
