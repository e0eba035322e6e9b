"""The CommonsenseQA aggregator benchmark's summary: per-method mean / sd / per-seed accuracy and each
heterogeneous-rank method against FedIT (paired t-interval over seeds, bootstrap over questions)."""
import argparse
import json

import pytest
from bench_loader import load_benchmark

T975_DF2 = 4.302652729911275


@pytest.fixture()
def bench():
    return load_benchmark("benchmarks/federated/run_csqa.py", "aggregators_csqa_bench")


def _write(bench, args, method, seed, right, n=10):
    correct = [1] * right + [0] * (n - right)
    row = {"method": method, "seed": seed, "settings": bench.settings(args), "acc_norm": right / n, "acc": right / n,
           "correct": correct, "correct_norm": correct, "cpu_s": 50.0, "sim_time_s": 20.0, "mb_moved": 9.0,
           "test_loss": 5.0, "ranks": [4, 8, 16]}
    bench.result_path(args.out, method, seed).write_text(json.dumps(row))


def test_summary_against_fedit_by_hand(bench, tmp_path):
    args = argparse.Namespace(rounds=2, eval_questions=10, out=tmp_path)
    for seed, (fedit, flex, flora) in enumerate([(5, 6, 5), (5, 7, 5), (5, 8, 4)]):
        _write(bench, args, "fedit", seed, fedit)
        _write(bench, args, "flexlora", seed, flex)
        _write(bench, args, "flora", seed, flora)
    res = bench.summarise(args)
    e = res["methods"]["flexlora"]["acc_norm"]
    assert e["mean"] == pytest.approx(0.7) and e["sd"] == pytest.approx(0.1)
    assert e["per_seed"] == {"0": 0.6, "1": 0.7, "2": 0.8}
    c = res["against_fedit"]["flexlora"]
    # differences 10, 20, 30 points: mean 20, sd 10 -> 20 -+ 4.3027 * 10 / sqrt(3), which spans zero
    assert c["margin_points"] == pytest.approx(20.0)
    assert c["paired_t_95ci_points"][0] == pytest.approx(20 - T975_DF2 * 10 / 3 ** 0.5)
    assert c["verdict"] == "no difference"
    assert res["against_fedit"]["flora"]["margin_points"] == pytest.approx(-100 / 30)
    assert "hetlora" not in res["methods"] and "fedit" not in res["against_fedit"]
    md = (tmp_path / "aggregators_csqa.md").read_text()
    assert "**flexlora** - fedit" in md and "+20.00 points" in md
    assert json.loads((tmp_path / "aggregators_csqa.json").read_text())["methods"]["fedit"]["seeds"] == [0, 1, 2]


def test_consistent_gain_is_above(bench, tmp_path):
    args = argparse.Namespace(rounds=2, eval_questions=10, out=tmp_path)
    for seed, flex in enumerate([8, 8, 9]):
        _write(bench, args, "fedit", seed, 5)
        _write(bench, args, "flexlora", seed, flex)
    c = bench.summarise(args)["against_fedit"]["flexlora"]
    assert c["verdict"] == "above" and c["paired_t_95ci_points"][0] > 0


def test_result_with_other_settings_is_refused(bench, tmp_path):
    args = argparse.Namespace(rounds=2, eval_questions=10, out=tmp_path)
    _write(bench, args, "fedit", 0, 5)
    other = argparse.Namespace(rounds=3, eval_questions=10, out=tmp_path)
    with pytest.raises(SystemExit, match="other settings"):
        bench.existing(bench.result_path(tmp_path, "fedit", 0), other)


def test_csqa_configs_for_every_method(bench):
    from fedprune.federated.config import load_config

    for m in bench.METHODS:
        cfg = load_config(bench.config_file(m), bench.overrides(m, 1, argparse.Namespace(rounds=3)))
        assert cfg.federation.strategy == m and cfg.data.dataset == "commonsense_qa"
        assert cfg.federation.seed == 1 and cfg.federation.rounds == 3
