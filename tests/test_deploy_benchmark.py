"""The deploy benchmark's report maths: paired decode speed-ups, the size-quality frontier, the
log-log interpolation of the dense curve, the COMP 30 % targets, and the load wait."""
from pathlib import Path
from types import SimpleNamespace

import pytest
from bench_loader import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def bench():
    mod = load_benchmark("benchmarks/deploy/run.py", "deploy_bench")
    return mod


def _file(model, outtype, mb, ppl):
    return {"model": model, "outtype": outtype, "bytes": mb * 1e6, "ppl": ppl}


def test_interpolation_is_linear_in_log_log(bench):
    pts = [(100.0, 40.0), (400.0, 10.0)]
    # halfway in log(x) between 100 and 400 is 200; halfway in log(y) between 40 and 10 is 20
    assert bench.interpolate_log(pts, 200.0) == pytest.approx(20.0)
    assert bench.interpolate_log(pts, 100.0) == pytest.approx(40.0)
    assert bench.interpolate_log(pts, 99.0) is None and bench.interpolate_log(pts, 401.0) is None


def test_frontier_and_comparison_with_dense(bench):
    record = {"files": {
        "dense@f16": _file("dense", "f16", 400, 10.0),
        "dense@q4_k_m": _file("dense", "q4_k_m", 100, 40.0),
        "comp-30@f16": _file("comp-30", "f16", 200, 15.0),     # dense at 200 MB: 20 -> beats it
        "comp-30@q8_0": _file("comp-30", "q8_0", 150, 30.0),   # dense at 150 MB: 40*(1/4)^(log(1.5)/log(4)) = 26.7 -> loses
        "comp-50@q4_k_m": _file("comp-50", "q4_k_m", 60, 90.0),  # smaller than every dense file: no comparison
    }}
    front = bench.frontier(record)
    assert front["pareto"] == ["comp-50@q4_k_m", "dense@q4_k_m", "comp-30@q8_0", "comp-30@f16", "dense@f16"]
    vs = front["vs_dense"]
    assert vs["comp-30@f16"]["beats_dense"] is True and vs["comp-30@f16"]["dense_ppl_at_same_bytes"] == pytest.approx(20.0)
    assert vs["comp-30@q8_0"]["beats_dense"] is False
    assert vs["comp-30@q8_0"]["dense_ppl_at_same_bytes"] == pytest.approx(40 * 0.25 ** (0.5849625 / 2), rel=1e-6)
    assert vs["comp-50@q4_k_m"]["beats_dense"] is None


def _run(model, outtype, rnd, decode, contended=False, prefill=None):
    return {"model": model, "outtype": outtype, "round": rnd, "decode_tokens_per_s": decode,
            "prefill_tokens_per_s": 10 * decode if prefill is None else prefill, "peak_rss_bytes": 1e8,
            "contended": contended, "load_before": 0.3}


def test_speedup_is_the_median_of_paired_ratios(bench):
    record = {"speed": [
        _run("dense", "f16", 0, 50.0), _run("comp-30", "f16", 0, 75.0),            # pair 1.5
        _run("dense", "f16", 1, 100.0), _run("comp-30", "f16", 1, 110.0, True),    # pair 1.1
        _run("dense", "f16", 2, 60.0), _run("comp-30", "f16", 2, 120.0),           # pair 2.0
    ]}
    s = bench.speed_summary(record)
    # the median of the pairs (1.5), not the ratio of the medians (110 / 60 = 1.83)
    assert s["comp-30@f16"]["decode_speedup"] == pytest.approx(1.5)
    assert s["comp-30@f16"]["decode_tokens_per_s"] == pytest.approx(110.0)
    assert s["comp-30@f16"]["contended_runs"] == 1 and s["dense@f16"]["decode_speedup"] == pytest.approx(1.0)
    # prefill is paired the same way, on its own figures: pairs 0.9, 1.5, 1.2 -> 1.2
    record = {"speed": [_run("dense", "f16", 0, 50.0, prefill=500.0), _run("comp-30", "f16", 0, 75.0, prefill=450.0),
                        _run("dense", "f16", 1, 50.0, prefill=400.0), _run("comp-30", "f16", 1, 75.0, prefill=600.0),
                        _run("dense", "f16", 2, 50.0, prefill=500.0), _run("comp-30", "f16", 2, 75.0, prefill=600.0)]}
    assert bench.speed_summary(record)["comp-30@f16"]["prefill_speedup"] == pytest.approx(1.2)


def test_targets_compare_speedup_with_the_file_size_ratio(bench):
    record = {"files": {"dense@f16": _file("dense", "f16", 271, 30.0), "comp-30@f16": _file("comp-30", "f16", 190, 120.0)}}
    speed = {"comp-30@f16": {"decode_speedup": 1.44}}
    (row,) = bench.checks(record, speed)
    assert row["file_size_ratio"] == pytest.approx(271 / 190)
    assert row["within_10pct_of_size_ratio"] and row["at_least_1_3x"]
    (row,) = bench.checks(record, {"comp-30@f16": {"decode_speedup": 1.2}})
    assert not row["within_10pct_of_size_ratio"] and not row["at_least_1_3x"]
    # the width-rounded COMP 30 % variants are checked too (unrounded first, then by multiple); COMP 20 % is not
    record["files"].update({"comp-30-w256@f16": _file("comp-30-w256", "f16", 190, 121.0),
                            "comp-30-w32@f16": _file("comp-30-w32", "f16", 190, 119.0),
                            "comp-20@f16": _file("comp-20", "f16", 217, 60.0)})
    speed = {k: {"decode_speedup": 1.38, "rounds": 6} for k in ("comp-30@f16", "comp-30-w256@f16", "comp-30-w32@f16",
                                                                  "comp-20@f16")}
    rows = bench.checks(record, speed)
    assert [r["model"] for r in rows] == ["comp-30", "comp-30-w32", "comp-30-w256"]
    assert all(r["passes"] == 6 and r["at_least_1_3x"] for r in rows)


def test_wait_for_quiet_marks_a_busy_machine(bench, monkeypatch):
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (50.0, 0, 0))
    args = SimpleNamespace(load_per_core=0.5, max_wait=0.0)
    assert bench.wait_for_quiet(args)["contended"] is True
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (0.0, 0, 0))
    out = bench.wait_for_quiet(args)
    assert out["contended"] is False and out["waited_s"] == 0.0


def test_decode_time_model_recovers_overhead_and_bandwidth(bench):
    # t = 2 ms + bytes / (1 GB/s): 100 MB -> 102 ms, 200 MB -> 202 ms, 300 MB -> 302 ms
    files = {"dense@f16": _file("dense", "f16", 300, 30.0), "comp-30@f16": _file("comp-30", "f16", 200, 60.0),
             "comp-50@f16": _file("comp-50", "f16", 100, 90.0), "dense@q4_k_m": _file("dense", "q4_k_m", 90, 40.0)}
    speed = {"dense@f16": {"decode_tokens_per_s": 1 / 0.302}, "comp-30@f16": {"decode_tokens_per_s": 1 / 0.202},
             "comp-50@f16": {"decode_tokens_per_s": 1 / 0.102}, "dense@q4_k_m": {"decode_tokens_per_s": 20.0}}
    m = bench.decode_time_model({"files": files}, speed)
    assert set(m) == {"f16"}  # one q4_k_m model: no fit
    r = m["f16"]
    assert r["overhead_ms_per_token"] == pytest.approx(2.0) and r["bandwidth_gb_per_s"] == pytest.approx(1.0)
    assert r["r2"] == pytest.approx(1.0)
    # the overhead keeps the predicted speed-up below the file ratio 1.5: 302 / 202
    assert r["comp30_predicted_speedup"] == pytest.approx(302 / 202)
    assert r["dense_overhead_share"] == pytest.approx(2 / 302)


def test_decode_time_model_uses_the_paired_speedup_against_dense(bench):
    # comp-30 and comp-50 were measured on a day the machine ran 2x faster: their own medians would
    # fake a huge overhead; their paired speed-ups (302/202, 302/102) give back the 2 ms + 1 GB/s line
    files = {"dense@f16": _file("dense", "f16", 300, 30.0), "comp-30@f16": _file("comp-30", "f16", 200, 60.0),
             "comp-50@f16": _file("comp-50", "f16", 100, 90.0)}
    speed = {"dense@f16": {"decode_tokens_per_s": 1 / 0.302, "decode_speedup": 1.0},
             "comp-30@f16": {"decode_tokens_per_s": 2 / 0.202, "decode_speedup": 302 / 202},
             "comp-50@f16": {"decode_tokens_per_s": 2 / 0.102, "decode_speedup": 302 / 102}}
    r = bench.decode_time_model({"files": files}, speed)["f16"]
    assert r["overhead_ms_per_token"] == pytest.approx(2.0) and r["bandwidth_gb_per_s"] == pytest.approx(1.0)


def test_reexport_keeps_quality_only_for_the_same_file(bench):
    old = {"bytes": 10, "tensor_types": {"f16": 3}, "bits_per_weight": 16.0, "sha256": "a", "ppl": 30.0,
           "top1_agreement": 0.9, "ppl_tokens": 4088}
    same = {"bytes": 10, "tensor_types": {"f16": 3}, "bits_per_weight": 16.0, "sha256": "a"}
    assert bench.carried_quality(old, same) == {"ppl": 30.0, "top1_agreement": 0.9, "ppl_tokens": 4088}
    assert bench.carried_quality(old, {**same, "sha256": "b"}) == {}  # another file: measured again
    legacy = {k: v for k, v in old.items() if k != "sha256"}  # recorded before hashes were stored
    assert bench.carried_quality(legacy, same) == {}  # the same size is no proof of the same weights
    assert bench.carried_quality(None, same) == {} and bench.carried_quality({"bytes": 10}, same) == {}


def test_file_sha256(bench, tmp_path):
    import hashlib

    f = tmp_path / "x.gguf"
    f.write_bytes(b"gguf" * 1000)
    assert bench.file_sha256(f) == hashlib.sha256(b"gguf" * 1000).hexdigest()
