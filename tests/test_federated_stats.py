"""federated.stats: seed statistics and the paired bootstrap, checked against hand-computed numbers."""
import math

import numpy as np
import pytest

from fedprune.federated import stats

T975_DF2 = 4.302652729911275  # Student t, 97.5 % quantile, 2 degrees of freedom (tables)


def test_mean_sd_by_hand():
    out = stats.mean_sd([0.50, 0.52, 0.54])
    assert out["mean"] == pytest.approx(0.52)
    assert out["sd"] == pytest.approx(0.02)  # sqrt((0.02^2 + 0 + 0.02^2) / 2)
    assert stats.mean_sd([0.3])["sd"] is None
    with pytest.raises(ValueError):
        stats.mean_sd([])


def test_t_interval_three_values():
    out = stats.t_interval([0.02, 0.03, 0.04])
    half = T975_DF2 * 0.01 / math.sqrt(3)  # 0.0248414
    assert out["low"] == pytest.approx(0.03 - half)
    assert out["high"] == pytest.approx(0.03 + half)
    assert out["low"] == pytest.approx(0.0051586, abs=1e-6)
    one = stats.t_interval([0.5])
    assert one["low"] is None and one["high"] is None


def test_paired_t_uses_common_seeds_and_differences():
    a = {0: 0.50, 1: 0.52, 2: 0.54, 3: 0.9}
    b = {0: 0.48, 1: 0.49, 2: 0.50}
    out = stats.paired_t_interval(a, b)
    assert out["seeds"] == [0, 1, 2]
    assert out["mean"] == pytest.approx(0.03)  # differences 0.02, 0.03, 0.04
    assert out["sd"] == pytest.approx(0.01)
    # unpaired spreads would be 0.02 and 0.01; the paired sd is the differences' own
    with pytest.raises(ValueError, match="no common seed"):
        stats.paired_t_interval({0: 1.0}, {1: 1.0})


def test_bootstrap_identical_methods_give_zero_width():
    a = np.array([[1, 0, 1, 0, 1], [0, 0, 1, 1, 1]])
    out = stats.paired_bootstrap(a, a.copy(), n_boot=500)
    assert out["diff"] == 0 and out["low"] == 0 and out["high"] == 0
    assert out["questions"] == 5 and out["seeds"] == 2


def test_bootstrap_constant_difference_is_exact():
    a, b = np.ones((3, 7)), np.zeros((3, 7))
    out = stats.paired_bootstrap(a, b, n_boot=200)
    assert out["diff"] == 1 and out["low"] == 1 and out["high"] == 1


def test_bootstrap_two_questions_by_hand():
    # one seed, per-question differences d = [1, 0]: a resample of 2 questions has mean 0, 0.5 or 1
    # with probabilities 1/4, 1/2, 1/4, so the 2.5 % and 97.5 % percentiles are 0 and 1
    out = stats.paired_bootstrap([1, 0], [0, 0], n_boot=4000, seed=3)
    assert out["diff"] == 0.5
    assert out["low"] == 0 and out["high"] == 1


def test_bootstrap_pools_seeds_per_question():
    # per-question differences averaged over seeds: seed 0 gives [1, 1], seed 1 gives [0, 0] -> [0.5, 0.5]:
    # every resample then has mean 0.5 exactly (a pooled-over-rows bootstrap would not)
    a = np.array([[1, 1], [0, 0]])
    b = np.zeros((2, 2))
    out = stats.paired_bootstrap(a, b, n_boot=300)
    assert out["low"] == 0.5 and out["high"] == 0.5


def test_bootstrap_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        stats.paired_bootstrap(np.ones((2, 3)), np.ones((3, 3)))


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, (3, 50)), rng.integers(0, 2, (3, 50))
    assert stats.paired_bootstrap(a, b, 700, seed=5) == stats.paired_bootstrap(a, b, 700, seed=5)


def test_compare_picks_best_baseline_and_decides_by_lower_bound():
    scores = {"ours": {0: 0.50, 1: 0.52, 2: 0.54},
              "base_a": {0: 0.48, 1: 0.49, 2: 0.50},   # mean 0.49 (best)
              "base_b": {0: 0.40, 1: 0.41, 2: 0.42}}
    out = stats.compare_to_baselines(scores, "ours", ["base_a", "base_b", "missing"])
    assert out["best_baseline"] == "base_a" and out["baselines_considered"] == ["base_a", "base_b"]
    assert out["seeds"] == [0, 1, 2]
    assert out["margin_points"] == pytest.approx(3.0)
    assert out["paired_t"]["low"] == pytest.approx(100 * (0.03 - T975_DF2 * 0.01 / math.sqrt(3)))
    assert out["beats_best_memory_aware_baseline"] is True
    # a larger spread of the differences: mean still +3 points, the interval crosses zero
    noisy = {**scores, "ours": {0: 0.46, 1: 0.52, 2: 0.58}}  # differences -0.02, 0.03, 0.08
    out = stats.compare_to_baselines(noisy, "ours", ["base_a", "base_b"])
    assert out["margin_points"] == pytest.approx(3.0)
    assert out["paired_t"]["low"] < 0 and out["beats_best_memory_aware_baseline"] is False


def test_compare_one_seed_never_beats():
    out = stats.compare_to_baselines({"ours": {0: 0.9}, "b": {0: 0.1}}, "ours", ["b"])
    assert out["margin_points"] == pytest.approx(80.0)
    assert out["beats_best_memory_aware_baseline"] is False


def test_compare_bootstrap_in_points():
    scores = {"ours": {0: 0.75, 1: 0.5}, "b": {0: 0.25, 1: 0.5}}
    correct = {"ours": {0: [1, 1, 1, 0], 1: [1, 1, 0, 0]}, "b": {0: [1, 0, 0, 0], 1: [1, 1, 0, 0]}}
    out = stats.compare_to_baselines(scores, "ours", ["b"], correct, n_boot=200)
    assert out["bootstrap"]["diff"] == pytest.approx(25.0)  # (0.75 + 0.5 - 0.25 - 0.5) / 2
    assert out["bootstrap"]["low"] >= 0 and out["bootstrap"]["high"] <= 50


@pytest.mark.parametrize("df,level,expected", [  # Student t tables (two-sided)
    (1, 0.95, 12.706204736), (2, 0.95, 4.302652730), (3, 0.95, 3.182446305), (4, 0.95, 2.776445105),
    (10, 0.95, 2.228138852), (29, 0.95, 2.045229642), (2, 0.90, 2.919985580), (5, 0.99, 4.032142984)])
def test_t_quantile_matches_tables(df, level, expected):
    assert stats.t_quantile(level, df) == pytest.approx(expected, rel=1e-8)


def test_t_central_probability_small_cases_by_hand():
    # df 1 (Cauchy): P(|T| < 1) = 2 atan(1) / pi = 1/2; df 2: P(|T| < t) = t / sqrt(2 + t^2)
    assert stats.t_central_probability(1.0, 1) == pytest.approx(0.5)
    assert stats.t_central_probability(2.0, 2) == pytest.approx(2 / math.sqrt(6))
    with pytest.raises(ValueError):
        stats.t_central_probability(1.0, 0)
