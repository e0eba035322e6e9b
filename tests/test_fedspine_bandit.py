"""Bandits: interface, checkpoints, and S-UCB on a synthetic smooth reward surface."""
import json
import math

import numpy as np
import pytest

from fedprune.fedspine.bandit import CHOOSERS, Arm, ConfigChooser, SmoothUCB, make_chooser
from fedprune.fedspine.reward import REWARDS, fedspine_reward

P_RANGE, R_RANGE = (0.1, 0.6), (2, 32)
P_STAR, R_STAR = 0.42, 12


def surface(p: float, r: int) -> float:
    """Smooth unimodal reward, peak 1 at (0.42, 12), log-scale in r."""
    return math.exp(-((p - P_STAR) / 0.12) ** 2 - ((math.log2(r) - math.log2(R_STAR)) / 1.2) ** 2)


BEST = max(surface(p, r) for p in np.linspace(*P_RANGE, 501) for r in range(R_RANGE[0], R_RANGE[1] + 1))


def run(name: str, seed: int, T: int = 600, noise: float = 0.1):
    kw = {"seed": seed} if name == "ucb1-grid" else {"p_range": P_RANGE, "r_range": R_RANGE, "seed": seed}
    ch = make_chooser(name, **kw)
    rng = np.random.default_rng(1000 + seed)
    regret, arms = [], []
    for _ in range(T):
        arm = ch.select()
        p, r = arm
        ch.update(arm, surface(p, r) + noise * rng.standard_normal())
        regret.append(BEST - surface(p, r))
        arms.append((p, r))
    return np.array(regret), arms


def test_registry_and_interface():
    assert {"s-ucb", "ucb1-grid", "random"} <= set(CHOOSERS.names())
    for name in CHOOSERS.names():
        ch = make_chooser(name, seed=0)
        assert isinstance(ch, ConfigChooser)
        arm = ch.select()
        p, r = arm
        assert isinstance(r, int) and 0.0 <= p < 1.0
        ch.update(arm, 0.5)
        ch.update((p, r), 0.4)  # a plain tuple is accepted too
    with pytest.raises(KeyError, match="s-ucb"):
        make_chooser("s_ucb")


def test_samples_stay_in_range_and_on_allowed_ranks():
    ch = SmoothUCB(p_range=(0.2, 0.5), ranks=(4, 8, 16), seed=3)
    rng = np.random.default_rng(0)
    for _ in range(200):
        arm = ch.select()
        assert 0.2 <= arm.p <= 0.5 and arm.r in (4, 8, 16)
        ch.update(arm, rng.uniform())
    # cells always tile the unit square
    area = sum((c.hi[0] - c.lo[0]) * (c.hi[1] - c.lo[1]) for c in ch.cells)
    assert area == pytest.approx(1.0)
    # no cell straddles a rank bin boundary once it is narrower than a bin along r
    for c in ch.cells:
        assert c.n >= 1


def test_index_formula_by_hand():
    ch = SmoothUCB(c=0.5, lipschitz=0.3, init_grid=(1, 1), split_k0=100, seed=0)
    assert ch.index(ch.cells[0]) == math.inf
    for x in (0.2, 0.6):
        ch.update(Arm(0.3, 8, (0.5, 0.5)), x)
    # t = 2 rewards seen -> ln(3); n = 2; diam of the unit square = 1
    assert ch.index(ch.cells[0]) == pytest.approx(0.4 + 0.5 * math.sqrt(math.log(3) / 2) + 0.3)


def test_split_hands_observations_to_children():
    ch = SmoothUCB(init_grid=(1, 1), split_k0=4, split_growth=2, seed=0)
    pts = [(0.1, 0.9, 1.0), (0.2, 0.8, 1.0), (0.15, 0.7, 1.0), (0.3, 0.95, 0.0)]
    for u, v, y in pts:
        ch.update(Arm(0.0, 2, (u, v)), y)
    assert len(ch.cells) == 2 and all(c.depth == 1 for c in ch.cells)
    assert sum(len(c.obs) for c in ch.cells) == 4  # every observation kept exactly once
    # both sides equal (square) -> split along r at a bin edge; all points are in the top half
    top = [c for c in ch.cells if c.lo[1] > 0][0]
    bottom = [c for c in ch.cells if c.lo[1] == 0][0]
    assert len(top.obs) == 4 and top.mean == pytest.approx(0.75)
    assert bottom.obs == [] and bottom.pseudo_n == 1 and bottom.mean == pytest.approx(0.75)
    assert ch.split_threshold(1) == 8


def test_checkpoint_round_trip_is_json_and_reproduces_choices():
    for name in CHOOSERS.names():
        a = make_chooser(name, seed=5)
        rng = np.random.default_rng(0)
        for _ in range(40):
            arm = a.select()
            a.update(arm, float(rng.uniform()))
        state = json.loads(json.dumps(a.state_dict()))
        b = make_chooser(name, seed=999)
        b.load_state_dict(state)
        for _ in range(20):
            x, y = a.select(), b.select()
            assert (x.p, x.r) == (y.p, y.r)
            a.update(x, 0.3)
            b.update(y, 0.3)


def test_sucb_regret_is_sublinear_and_beats_random():
    seeds = range(3)
    s = [run("s-ucb", sd) for sd in seeds]
    rnd = [run("random", sd) for sd in seeds]
    reg = np.mean([x[0] for x in s], axis=0)
    first, last = reg[:150].mean(), reg[-150:].mean()
    # regret per pull shrinks: the last quarter is far cheaper than the first
    assert last < 0.5 * first
    # cumulative regret well below a random chooser's
    assert reg.sum() < 0.3 * np.mean([x[0].sum() for x in rnd])
    # it concentrates on the best region in the second half
    near = lambda arms: np.mean([abs(p - P_STAR) < 0.08 and 8 <= r <= 18 for p, r in arms[300:]])  # noqa: E731
    assert np.mean([near(x[1]) for x in s]) > 0.5
    assert np.mean([near(x[1]) for x in rnd]) < 0.2


def test_sucb_beats_fixed_grid_ucb1_on_a_continuous_optimum():
    reg_s = np.mean([run("s-ucb", sd)[0].sum() for sd in range(3)])
    reg_g = np.mean([run("ucb1-grid", sd)[0].sum() for sd in range(3)])
    assert reg_s < reg_g


def test_reward_is_bounded_monotone_and_time_aware():
    assert "fedspine" in REWARDS
    base = dict(loss_before=2.0, loss_after=1.8, prune_progress=1.0, round_time=10.0)
    fast = fedspine_reward(device_time=2.0, **base)
    slow = fedspine_reward(device_time=10.0, **base)
    assert 0.5 < slow < fast < 1.0
    assert fedspine_reward(2.0, 2.0, 1.0, 5.0, 10.0) == pytest.approx(0.5)  # no gain
    assert fedspine_reward(2.0, 2.2, 1.0, 5.0, 10.0) < 0.5  # loss got worse
    half = fedspine_reward(2.0, 1.8, 0.5, 10.0, 10.0)
    assert 0.5 < half < slow  # less pruning progress, less reward
    for args in [(1e9, 0.0, 1.0, 0.0, 1.0), (1.0, 1e9, 1.0, 0.0, 1.0), (1.0, float("nan"), 1.0, 1.0, 1.0)]:
        assert 0.0 <= fedspine_reward(*args) <= 1.0
    with pytest.raises(ValueError):
        fedspine_reward(2.0, 1.0, 1.0, 1.0, 0.0)


@pytest.mark.parametrize("after", [1.8, 2.6, 5.0])  # a gain, mild pruning damage, heavy damage
def test_reward_rises_with_speed_and_progress_whatever_the_sign_of_the_gain(after):
    r = lambda prog, t: fedspine_reward(2.0, after, prog, t, 10.0)  # noqa: E731
    assert r(1.0, 2.0) > r(1.0, 8.0)  # faster is better, also when the loss rose
    assert r(1.0, 5.0) > r(0.3, 5.0)  # further pruned is better for the same loss change
    assert (r(1.0, 5.0) > 0.5) == (after < 2.0)


def test_reward_separates_pruning_damage_of_different_size():
    # pruning makes the loss rise within a round; the bandit must still tell mild from heavy damage
    mild, heavy = fedspine_reward(2.0, 2.6, 1.0, 10.0, 10.0), fedspine_reward(2.0, 5.0, 1.0, 10.0, 10.0)
    assert mild - heavy > 0.05 and heavy > 1e-3


@pytest.mark.parametrize("name", ["s-ucb", "ucb1-grid"])
def test_pending_pulls_spread_one_rounds_batch(name):
    kw = dict(p_values=(0.1, 0.3, 0.5), r_values=(2, 8)) if name == "ucb1-grid" else dict(p_range=(0.1, 0.5), ranks=(2, 4, 8, 16))
    ch = make_chooser(name, seed=0, **kw)
    rng = np.random.default_rng(0)
    for _ in range(12):  # some history: best at low ratio and low rank
        arm = ch.select()
        ch.update(arm, 1 - arm.p - arm.r / 32 + 0.02 * rng.standard_normal())
    where = (lambda a: ch._find(*ch.space.to_point(a))) if name == "s-ucb" else ch._nearest  # noqa: E731
    alone = {where(ch.select()) for _ in range(8)}  # no pending: the same best cell every time
    batch: list = []
    for _ in range(8):
        batch.append(ch.select(pending=batch))
    assert len(alone) == 1 and len({where(a) for a in batch}) > 1
    assert ch.t == 12  # pending pulls are not rewards
