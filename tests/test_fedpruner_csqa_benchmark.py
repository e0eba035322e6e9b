"""The CommonsenseQA FedPruner benchmark's summary: per-method mean / sd / per-seed accuracy, the
best memory-aware baseline, the margin and its significance from the paired t-interval over seeds."""
import argparse
import json
from pathlib import Path

import pytest
from bench_loader import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
T975_DF2 = 4.302652729911275


@pytest.fixture()
def bench():
    mod = load_benchmark("benchmarks/fedpruner/run_csqa.py", "fedpruner_csqa_bench")
    return mod


def _args(bench, out, **kw):
    a = dict(rounds=2, local_steps=1, grad_accum=1, lr=0.001, eval_questions=10, letter=False, out=out)
    return argparse.Namespace(**{**a, **kw})


def _write(bench, args, method, seed, right):
    """A result whose first ``right`` of 10 questions are answered correctly (acc_norm = right / 10)."""
    correct = [1] * right + [0] * (10 - right)
    row = {"method": method, "seed": seed, "settings": bench.settings(args), "acc_norm": right / 10,
           "acc": right / 10, "correct": correct, "correct_norm": correct, "participation": 1.0, "cpu_s": 100.0,
           "test_loss": 2.0}
    bench.result_path(args.out, method, seed).write_text(json.dumps(row))


def test_summary_statistics_by_hand(bench, tmp_path):
    args = _args(bench, tmp_path)
    for seed, (ours, dt, fr) in enumerate([(6, 4, 5), (7, 4, 5), (8, 4, 5)]):
        _write(bench, args, "fedpruner", seed, ours)
        _write(bench, args, "depth_truncation", seed, dt)
        _write(bench, args, "fedra", seed, fr)
    res = bench.summarise(args)
    m = res["methods"]["fedpruner"]
    assert m["acc_norm"]["mean"] == pytest.approx(0.7) and m["acc_norm"]["sd"] == pytest.approx(0.1)
    assert m["acc_norm"]["per_seed"] == {"0": 0.6, "1": 0.7, "2": 0.8}
    s = res["summary"]
    assert s["seeds"] == [0, 1, 2] and s["best_memory_aware_baseline"] == "fedra"
    # differences 10, 20, 30 points: mean 20, sd 10, t-interval 20 -+ 4.3027 * 10 / sqrt(3) = [-4.84, 44.84]
    assert s["margin_points"] == pytest.approx(20.0)
    assert s["margin_95ci_points"][0] == pytest.approx(20 - T975_DF2 * 10 / 3 ** 0.5)
    assert s["beats_best_memory_aware_baseline"] is False
    md = (tmp_path / "fedpruner_csqa.md").read_text()
    assert "+20.00 points" in md and "no significant difference" in md
    assert json.loads((tmp_path / "fedpruner_csqa.json").read_text())["summary"]["margin_points"] == pytest.approx(20)


def test_summary_significant_when_interval_above_zero(bench, tmp_path):
    args = _args(bench, tmp_path)
    for seed, ours in enumerate([8, 8, 9]):  # differences 3, 3, 4 tenths over fedra's 5
        _write(bench, args, "fedpruner", seed, ours)
        _write(bench, args, "fedra", seed, 5)
    s = bench.summarise(args)["summary"]
    assert s["margin_points"] == pytest.approx(100 / 3)
    assert s["margin_95ci_points"][0] > 0 and s["beats_best_memory_aware_baseline"] is True
    assert s["bootstrap_95ci_points"][0] <= s["margin_points"] <= s["bootstrap_95ci_points"][1]


def test_finished_result_with_other_settings_is_refused(bench, tmp_path):
    args = _args(bench, tmp_path)
    _write(bench, args, "fedra", 0, 5)
    assert bench.existing(bench.result_path(tmp_path, "fedra", 0), args)["acc_norm"] == 0.5
    with pytest.raises(SystemExit, match="other settings"):
        bench.existing(bench.result_path(tmp_path, "fedra", 0), _args(bench, tmp_path, rounds=3))
    assert bench.existing(bench.result_path(tmp_path, "fedra", 1), args) is None


def test_layer_coverage_by_hand(bench):
    even = bench.layer_coverage([4, 4, 4, 4])
    assert even["cv"] == 0 and even["min"] == even["max"] == 4
    # counts 2 and 6: mean 4, population sd 2, cv 0.5
    skew = bench.layer_coverage([2, 6, 2, 6])
    assert skew["cv"] == pytest.approx(0.5) and skew["min"] == 2 and skew["max"] == 6
