"""benchmarks/pruning/run.py: seeds in the result key, the official-preset rows and the statistics over seeds.

Fast: no model is pruned; the job list, the calibration a row asks for and the summary maths are checked.
"""
import argparse
import math

import pytest

from bench_loader import load_benchmark

T975_DF2 = 4.302652729911275  # Student t, 97.5 % quantile, 2 degrees of freedom


@pytest.fixture(scope="module")
def pb():
    return load_benchmark("benchmarks/pruning/run.py", "pruning_bench")


def test_every_peer_with_a_preset_gets_an_official_row(pb):
    assert {"wanda_sp_official", "flap_official", "llm_pruner_official"} <= set(pb.OFFICIAL)
    for name in pb.OFFICIAL:
        method, opts = pb.VARIANTS[name]
        assert name == f"{method}_official" and opts == {"preset": "official"}


def test_official_rows_calibrate_with_their_code_s_sizes_the_others_with_the_benchmark_s(pb):
    args = argparse.Namespace(nsamples=128, seq_len=512)
    assert pb.calibration("wanda_sp", {"preset": "official"}, args) == (128, 128)
    assert pb.calibration("flap", {"preset": "official"}, args) == (1024, 128)
    assert pb.calibration("llm_pruner", {"preset": "official"}, args) == (10, 64)
    assert pb.calibration("flap", {}, args) == (128, 512)
    assert pb.calibration("comp", {"mask_bias": True}, args) == (128, 512)
    assert pb.calibration(None, {}, args) == (128, 512)
    # a reduced official calibration, by peer name; the other presets keep theirs
    args.official_calibration = "sleb=8x2048"
    assert pb.calibration("sleb", {"preset": "official"}, args) == (8, 2048)
    assert pb.calibration("flap", {"preset": "official"}, args) == (1024, 128)
    assert pb.calibration("sleb", {}, args) == (128, 512)
    assert pb.parse_sizes("sleb=8x2048, flap=256x128") == {"sleb": (8, 2048), "flap": (256, 128)}
    for bad in ("sleb", "sleb=8", "sleb=0x2048", "=8x2048"):
        with pytest.raises(SystemExit, match="PEER=NxLEN"):
            pb.parse_sizes(bad)


def test_seed_is_part_of_the_result_key_and_the_first_seed_runs_everything_first(pb, tmp_path, monkeypatch):
    monkeypatch.setattr(pb, "RESULTS", tmp_path)
    assert pb.run_path("comp", 0.2, 0) != pb.run_path("comp", 0.2, 1)
    assert pb.run_path("comp", 0.2, 1).name == "comp@0.2@seed1.json"
    jobs = pb.seeded_jobs([("dense", 0.0), ("comp", 0.2), ("flap", 0.2)], [0, 1, 2], ["comp"])
    assert jobs == [("dense", 0.0, 0), ("comp", 0.2, 0), ("flap", 0.2, 0), ("comp", 0.2, 1), ("comp", 0.2, 2)]
    assert len(pb.seeded_jobs([("dense", 0.0), ("comp", 0.2)], [3, 4])) == 3  # dense once


def test_seed_statistics_by_hand(pb):
    rec = lambda seed, w, p, z: {"name": "comp", "ratio": 0.2, "calibration": {"seed": seed, "nsamples": 8, "seq_len": 16},
                                 "wikitext2_ppl": w, "ptb_ppl": p, "zero_shot_avg": z}  # noqa: E731
    rows = pb.seed_statistics([rec(2, 80.0, 120.0, 0.5), rec(0, 70.0, 100.0, 0.4), rec(1, 75.0, 110.0, 0.45),
                               {"name": "flap", "ratio": 0.2, "calibration": {"seed": 0}, "wikitext2_ppl": 90.0}])
    comp = next(r for r in rows if r["name"] == "comp")
    assert comp["seeds"] == [0, 1, 2]
    w = comp["wikitext2_ppl"]
    # 70, 75, 80: mean 75, sample sd 5, half-width t * 5 / sqrt(3)
    assert w["mean"] == pytest.approx(75) and w["sd"] == pytest.approx(5)
    assert w["low"] == pytest.approx(75 - T975_DF2 * 5 / math.sqrt(3), abs=1e-6)
    assert w["per_seed"] == {"0": 70.0, "1": 75.0, "2": 80.0}
    assert comp["ptb_ppl"]["mean"] == pytest.approx(110)
    flap = next(r for r in rows if r["name"] == "flap")
    assert flap["wikitext2_ppl"]["low"] is None and "ptb_ppl" not in flap  # one seed: no interval
    md = pb.seed_table(rows)
    assert "75.00 +- 5.00 [" in md and "70.00 / 75.00 / 80.00" in md


def test_paired_effects_by_hand(pb):
    rec = lambda name, seed, w, z: {"name": name, "ratio": 0.2, "calibration": {"seed": seed},  # noqa: E731
                                    "wikitext2_ppl": w, "ptb_ppl": None, "zero_shot_avg": z}
    records = [rec("comp", 0, 90.0, 0.46), rec("comp_no_mask_tuning", 0, 100.0, 0.45),
               rec("comp", 1, 76.0, 0.44), rec("comp_no_mask_tuning", 1, 80.0, 0.44),
               rec("comp", 2, 50.0, 0.40)]  # seed 2 has no reference: not paired
    rows = pb.paired_effects(records)
    assert len(rows) == 1
    row = rows[0]
    assert (row["variant"], row["reference"], row["seeds"]) == ("comp", "comp_no_mask_tuning", [0, 1])
    w = row["wikitext2_ppl_reduction_pct"]  # 10 % and 5 %
    assert w["mean"] == pytest.approx(7.5) and w["sd"] == pytest.approx(math.sqrt(12.5))
    assert "ptb_ppl_reduction_pct" not in row  # missing values give no interval rather than a wrong one
    assert row["zero_shot_gain_points"]["mean"] == pytest.approx(0.5)
    md = pb.paired_table(rows)
    assert "+7.50 [" in md and "no difference" in md  # two seeds, 10 and 5: t(1) interval spans zero


def test_comp_against_every_peer_by_hand(pb):
    rec = lambda name, seed, w, z, ratio=0.2: {"name": name, "ratio": ratio, "calibration": {"seed": seed},  # noqa: E731
                                               "wikitext2_ppl": w, "ptb_ppl": None, "zero_shot_avg": z,
                                               "zero_shot": {"a": {}, "b": {}}, "settings": {"eval_limit": 50},
                                               "wall_s_total": 1800.0}
    records = [rec("comp", 0, 70.0, 0.50), rec("comp", 1, 75.0, 0.50), rec("comp", 2, 80.0, 0.50),
               rec("flap", 0, 120.0, 0.40),       # above COMP's interval [62.6, 87.4]: COMP better
               rec("wanda_sp", 0, 80.0, 0.50),    # inside it: no difference
               rec("comp_no_mask_tuning", 0, 99.0, 0.1),  # a COMP variant, not a peer: no row
               rec("shortgpt", 0, 50.0, 0.5, ratio=0.3)]  # no COMP at 0.3: no row
    rows = pb.versus_peers(pb.seed_statistics(records), records)
    assert [(r["ratio"], r["peer"]) for r in rows] == [(0.2, "flap"), (0.2, "wanda_sp")]
    flap, wanda = rows
    assert flap["wikitext2_ppl"]["verdict"] == "reference better"
    assert wanda["wikitext2_ppl"]["verdict"] == "no difference"
    assert "ptb_ppl" not in flap
    # 7-task: 2 tasks x 50 examples = 100; se = sqrt(.5 * .5 / 100 + .4 * .6 / 100) = 0.07 -> 10 points < 2 se
    z = flap["zero_shot_avg"]
    assert z["examples"] == 100 and z["se_points"] == pytest.approx(100 * math.sqrt(0.0025 + 0.0024))
    assert z["diff_points"] == pytest.approx(10.0) and z["verdict"] == "no difference"
    md = pb.versus_table(rows)
    assert "120.00: reference better" in md and "+10.0 +- 7.0 points" in md
    assert pb.cpu_time_text(records) == "7 runs, 3.5 h of wall time in all (sum of the runs' `wall_s_total`)."
    records[0]["cpu_s_total"], records[1]["cpu_s_total"] = 1800.0, 5400.0
    assert pb.cpu_time_text(records).endswith("; the 2 runs that measured it used 2.0 h of CPU time over 1.0 h of "
                                              "wall time (`cpu_s_total`).")


def test_a_worker_reports_the_cpu_time_it_used(pb):
    t0 = pb.process_cpu_seconds()
    x = 0
    for i in range(3_000_000):
        x += i
    assert pb.process_cpu_seconds() > t0


def test_paired_by_example_by_hand(pb):
    run = lambda a, b: {"zero_shot_correct": {"a": a, "b": b}}  # noqa: E731
    out = pb.paired_by_example([run("1100", "11"), run("1000", "11")], [run("0100", "01")])
    # task a: reference means 1, .5, 0, 0 minus peer 0, 1, 0, 0 -> d = 1, -.5, 0, 0: mean .125, var 1.1875 / 3
    # task b: d = 1, 0: mean .5, var .5
    assert out["examples"] == 6 and out["runs"] == [2, 1]
    assert out["diff"] == pytest.approx((0.125 + 0.5) / 2)
    assert out["se"] == pytest.approx(math.sqrt(1.1875 / 3 / 4 + 0.5 / 2) / 2)
    # only the runs that logged their answers count; a side without one, or other examples: no paired figure
    assert pb.paired_by_example([run("1100", "11"), {}], [run("0100", "01")])["runs"] == [1, 1]
    assert pb.paired_by_example([{}], [run("0100", "01")]) is None
    assert pb.paired_by_example([run("1100", "11")], [run("010", "01")]) is None
    # versus_peers takes the paired figure when both sides logged their answers
    rec = lambda name, seed, w, bits: {"name": name, "ratio": 0.2, "calibration": {"seed": seed}, "wikitext2_ppl": w,  # noqa: E731
                                       "zero_shot_avg": bits.count("1") / len(bits), "zero_shot": {"a": {}},
                                       "settings": {"eval_limit": len(bits)}, "zero_shot_correct": {"a": bits}}
    records = [rec("comp", 0, 60.0, "1111111100"), rec("flap", 0, 90.0, "0111111100")]
    z = pb.versus_peers(pb.seed_statistics(records), records)[0]["zero_shot_avg"]
    assert z["paired"] and z["diff_points"] == pytest.approx(10.0)
    # d = one 1 and nine 0s: mean .1, sum of squared deviations .81 + 9 x .01 = .9
    assert z["se_points"] == pytest.approx(100 * math.sqrt(0.9 / 9 / 10))
    assert "paired, runs 1/1): no difference" in pb.versus_table(pb.versus_peers(pb.seed_statistics(records), records))


def test_a_peer_that_removes_less_meets_comp_at_its_achieved_ratio(pb):
    rec = lambda name, ratio, w, achieved: {"name": name, "ratio": ratio, "calibration": {"seed": 0},  # noqa: E731
                                            "achieved_ratio": achieved, "wikitext2_ppl": w}
    records = [rec("comp", 0.2, 60.0, 0.2), rec("comp", 0.1183, 50.0, 0.11830),
               rec("wanda_sp_official", 0.2, 55.0, 0.11834),  # asked 20 %, removes 11.8 %: COMP at 0.1183
               rec("flap_official", 0.2, 70.0, 0.1999)]        # within the tolerance of 0.2: COMP at 0.2
    rows = {r["peer"]: r for r in pb.versus_peers(pb.seed_statistics(records), records)}
    assert rows["wanda_sp_official"]["reference_ratio"] == 0.1183
    assert rows["wanda_sp_official"]["wikitext2_ppl"] == {"reference": 50.0, "peer": 55.0, "verdict": "reference better"}
    assert rows["flap_official"]["reference_ratio"] == 0.2
    assert "| 0.20 | wanda_sp_official (0.118) | 0.1183 |" in pb.versus_table(list(rows.values()))


def test_a_peer_that_removes_less_meets_the_smallest_comp_removing_at_least_as_much(pb):
    comp = [0.095, 0.1183, 0.2, 0.3]
    assert pb.reference_ratio_for(0.3, 0.1773, comp) == 0.2       # no COMP at 17.73 %: the next larger
    assert pb.reference_ratio_for(0.2, 0.09496, comp) == 0.095     # within the tolerance below
    assert pb.reference_ratio_for(0.2, 0.09496, comp[1:]) == 0.1183
    assert pb.reference_ratio_for(0.2, 0.1999, comp) == 0.2        # removed what it was asked
    assert pb.reference_ratio_for(0.2, 0.2105, comp) == 0.2        # removed more (ShortGPT): the same ratio
    assert pb.reference_ratio_for(0.3, 0.1773, [0.1, 0.3]) == 0.3
    assert pb.reference_ratio_for(0.3, 0.1773, [0.1]) == 0.3       # nothing fits: the asked ratio
    assert pb.reference_ratio_for(0.3, None, comp) == 0.3
    rec = lambda name, ratio, w, achieved: {"name": name, "ratio": ratio, "calibration": {"seed": 0},  # noqa: E731
                                            "achieved_ratio": achieved, "wikitext2_ppl": w}
    records = [rec("comp", 0.2, 60.0, 0.2), rec("comp", 0.3, 90.0, 0.3),
               rec("llm_pruner_official", 0.3, 65.0, 0.1421)]  # asked 30 %, removes 14.21 %: COMP at 20 %
    row = pb.versus_peers(pb.seed_statistics(records), records)[0]
    assert row["reference_ratio"] == 0.2
    assert row["wikitext2_ppl"] == {"reference": 60.0, "peer": 65.0, "verdict": "reference better"}


def test_requested_ratios_keep_their_digits_in_tables(pb):
    assert [pb.ratio_text(r) for r in (0.2, 0.3, 0.095, 0.1183, 0.0)] == ["0.20", "0.30", "0.095", "0.1183", "0.00"]


def test_every_comp_variant_is_a_valid_option_set_and_every_paired_row_exists(pb):
    """A typo in a variant's options (or a renamed criterion) would only fail hours into a benchmark."""
    from fedprune.pruning.methods.comp import CompOptions

    for name, (method, opts) in pb.VARIANTS.items():
        if method == "comp":
            CompOptions(**opts)  # raises on an unknown option or value
    for variant, reference in pb.PAIRED:
        assert variant in pb.VARIANTS and reference in pb.VARIANTS
    # the rows that keep the previous default's seeds must really differ from today's default
    assert pb.VARIANTS["comp"] == ("comp", {})
    assert CompOptions().neuron_metric != pb.VARIANTS["comp_metric_rescale_obs"][1]["neuron_metric"]
    for name, (_, opts) in pb.VARIANTS.items():
        if name.startswith("comp_metric_"):
            assert name.removeprefix("comp_metric_").startswith(opts["neuron_metric"])
