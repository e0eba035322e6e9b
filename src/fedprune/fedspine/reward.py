"""FedSpine's bandit reward, one swappable function (registry ``REWARDS``).

Every registered reward is called as ``reward(outcome, **reward_kwargs)`` with a
:class:`RoundOutcome` (what the server observed of one device's round) and returns a value in
``(0, 1)``; ``0.5`` means "nothing gained".

``efficiency`` (the default): the improvement of the device's *recovered pruned model* per unit of
observed time, as in bandit-driven federated pruning (FedMP: loss reduction per completion time):

    gain   = clip(ln(loss_before / loss_after), -gain_clip, gain_clip)
    value  = gain + progress_weight * max(sparsity_end - sparsity_start, 0)
    rel    = max(device_time / round_time, rel_floor)
    raw    = value / rel  if value >= 0  else  value * rel
    reward = 0.5 + 0.5 * tanh(raw / scale)

``loss_before`` is one fixed local batch on the model the device starts the round with (the global
LoRA under its current masks), ``loss_after`` the same batch on the model it uploads, pruned *and*
recovered (the round ends with ``recovery_steps`` steps at fixed masks): pruning damage that
training repairs within the round is not punished, damage it does not repair is. Masks only grow,
so the chosen ratio is a target the device approaches over several rounds (at most
``max_step_sparsity`` a round) and a device already at it prunes nothing: the arm is credited with
what the round did, the sparsity actually gained (``progress_weight`` is its exchange rate against
log-loss: 1 means 0.1 of the model removed is worth a 10 % loss reduction) and the time it took.
``scale = 1`` keeps typical rounds off tanh's flat ends (a 15 % loss reduction plus 0.1 sparsity
by a device at a third of the round's time is 0.84, not 0.997), so the bandit can still rank
good configurations. A loss increase is multiplied by the relative time instead of divided, so the reward still falls
with time (a quick failure costs the fleet less than a slow one). A diverged round scores 0.

``fedspine`` (the previous reward): reward configurations that improve the model,
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
from dataclasses import dataclass
from typing import Callable

from ..registry import Registry

@dataclass(frozen=True)
class RoundOutcome:
    """What the server observed of one device's round (never the device's profile)."""

    loss_before: float
    loss_after: float
    device_time: float
    """the device's observed round time (seconds)"""
    round_time: float
    """the round's time: the slowest accepted device (or the deadline)"""
    sparsity_start: float = 0.0
    sparsity_end: float = 0.0
    target: float = 0.0
    """the ratio the bandit chose"""
    p_max: float = 1.0
    """the largest ratio a bandit may choose"""


RewardFn = Callable[..., float]
REWARDS: Registry[RewardFn] = Registry("bandit reward")


def efficiency_reward(loss_before: float, loss_after: float, device_time: float, round_time: float,
                      sparsity_start: float = 0.0, sparsity_end: float = 0.0, *, progress_weight: float = 1.0,
                      scale: float = 1.0, rel_floor: float = 0.1, gain_clip: float = 3.0,
                      eps: float = 1e-12) -> float:
    """Improvement of the recovered pruned model per unit of relative time, in (0, 1) (module doc)."""
    if device_time < 0 or round_time <= 0:
        raise ValueError(f"need device_time >= 0 and round_time > 0, got {device_time}, {round_time}")
    if scale <= 0 or rel_floor <= 0 or progress_weight < 0 or gain_clip <= 0:
        raise ValueError("need scale > 0, rel_floor > 0, progress_weight >= 0, gain_clip > 0")
    if not (math.isfinite(loss_before) and math.isfinite(loss_after)):
        return 0.0  # a diverged round is the worst outcome
    gain = math.log(max(loss_before, eps) / max(loss_after, eps))
    value = min(max(gain, -gain_clip), gain_clip) + progress_weight * max(sparsity_end - sparsity_start, 0.0)
    rel = max(device_time / round_time, rel_floor)
    raw = value / rel if value >= 0 else value * rel
    return 0.5 + 0.5 * math.tanh(raw / scale)


@REWARDS.register("efficiency")
def _efficiency(o: RoundOutcome, **kw) -> float:
    return efficiency_reward(o.loss_before, o.loss_after, o.device_time, o.round_time, o.sparsity_start,
                             o.sparsity_end, **kw)


@REWARDS.register("fedspine")
def _progress_times_gain(o: RoundOutcome, **kw) -> float:
    """The previous reward: log-loss gain x pruning progress (``sparsity_end / p_max``) / relative time."""
    return fedspine_reward(o.loss_before, o.loss_after, o.sparsity_end / max(o.p_max, 1e-9), o.device_time,
                           o.round_time, **kw)


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


def get_reward(name: str = "efficiency") -> RewardFn:
    return REWARDS.get(name)
