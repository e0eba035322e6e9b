"""The FedSpine benchmark's summary maths: time to target on the deployed models, speedups per
seed, the loss gain at equal sparsity with its 95 % t-interval, the compute share."""
import json
from pathlib import Path

import pytest
from bench_loader import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def bench(tmp_path, monkeypatch):
    mod = load_benchmark("benchmarks/fedspine/run.py", "fedspine_bench")
    monkeypatch.setattr(mod, "OUT", tmp_path)
    return mod


def _write(bench, method, seed, losses, times, share=0.8):
    curve = [{"round": i, "deployed_loss": l, "sim_time_s": t, "compute_share": {"all": share}}
             for i, (l, t) in enumerate(zip(losses, times))]
    p = bench.result_path("compute", method, seed, 1.0)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"method": method, "seed": seed, "speed_scale": 1.0, "curve": curve}))


def test_summary_by_hand(bench):
    assert bench.time_to([{"deployed_loss": 3.0, "sim_time_s": 0}, {"deployed_loss": 2.4, "sim_time_s": 7}], 2.5) == 7
    assert bench.time_to([{"deployed_loss": 3.0, "sim_time_s": 0}], 2.5) is None
    for seed, (spine_t, gain) in enumerate(((10, 0.1), (20, 0.3))):
        # base 3.0, best final 2.0 -> target 2.5; FedSpine reaches it at spine_t, FedIT at 40, fedmp at 30
        _write(bench, "fedspine", seed, [3.0, 2.4, 2.0], [0, spine_t, 50])
        _write(bench, "fedit", seed, [3.0, 2.8, 2.45], [0, 20, 40], share=0.4)
        _write(bench, "fedmp", seed, [3.0, 2.45, 2.0 + gain], [0, 30, 60])
    s = bench.summarise("compute")
    assert s["seeds"] == [0, 1]
    assert s["speedup_per_seed"] == {0: pytest.approx(3.0), 1: pytest.approx(1.5)}
    assert s["speedup_vs_best_baseline"] == pytest.approx(2.25)
    g = s["accuracy_gain_at_equal_sparsity"]
    # mean 0.2, sd 0.1414, t(0.975, 1) = 12.706: half-width 12.706 x 0.1414 / sqrt 2 = 1.2706
    assert g["mean"] == pytest.approx(0.2) and g["high"] - g["mean"] == pytest.approx(1.2706, rel=1e-3)
    assert s["compute_share"] == {"fedspine": pytest.approx(0.8), "fedit": pytest.approx(0.4),
                                  "fedmp": pytest.approx(0.8)}
    assert s["reference_params"] == 6.74e9


def test_pruned_baselines_take_fedspines_reached_sparsity(bench):
    """Equal sparsity: the uniform baselines' ratio is the mean deployed sparsity of FedSpine's cool-down
    rounds in the same seed; without FedSpine's result they are refused; HetLoRA ranks go by class."""
    with pytest.raises(SystemExit, match="run fedspine for this seed first"):
        bench.equal_sparsity("fedspine", "compute", 0, 1.0)
    curve = [{"round": 0, "deployed_loss": 3.0, "sim_time_s": 0}] + [
        {"round": i, "deployed_loss": 2.5, "sim_time_s": i, "deployed_sparsity": s}
        for i, s in enumerate([0.1, 0.2, 0.28, 0.3, 0.32], start=1)]
    p = bench.result_path("compute", "fedspine", 0, 1.0)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"method": "fedspine", "seed": 0, "curve": curve, "settings": {"cooldown": 2}}))
    assert bench.equal_sparsity("fedspine", "compute", 0, 1.0) == pytest.approx(0.31)  # mean of 0.3, 0.32
    assert bench.equal_sparsity("0.25", "compute", 5, 1.0) == 0.25
    with pytest.raises(SystemExit, match="--equal-sparsity"):
        bench.equal_sparsity("half", "compute", 0, 1.0)
    over, opts = bench.method_overrides("hetlora-prune", {**bench.DEFAULTS, "fleet": "tx2:2,agx-xavier:1"}, 0.31)
    assert opts["p_range"] == [0.31, 0.31] and opts["device_ranks"] == [4, 4, 16]
    assert bench.METHODS[0] == "fedspine"
