"""The COMP-then-federated-recovery benchmark on a tiny random LLaMA: every stage runs (prune, score,
FedIT, score of the merged model, GGUF export), a rerun skips finished stages, and the summary's gap
comes from the rows."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
from bench_loader import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    mod = load_benchmark("benchmarks/recovery/run.py", "recovery_bench")
    return mod


@pytest.fixture(scope="module")
def finished(bench, tmp_path_factory):
    """dense and COMP 20 % through every stage on a tiny LLaMA (1 round, 4 questions)."""
    from fedprune import save_model
    from fedprune.federated.tiny_tokenizer import tiny_bpe_tokenizer
    from fedprune.models.tiny import tiny_model

    root = tmp_path_factory.mktemp("recovery")
    tok = tiny_bpe_tokenizer()
    model = save_model(tiny_model("llama", vocab_size=len(tok), max_position_embeddings=256), root / "tiny",
                       tokenizer=tok)
    argv = ["--model", str(model), "--rows", "dense,comp20", "--zeroshot-rows", "", "--limit", "4", "--rounds", "1",
            "--nsamples", "2", "--seq-len", "32", "--outtype", "f32", "--out", str(root / "results"),
            "--work", str(root / "work")]
    for kv in ("data.max_examples_per_client=4", "train.local_steps=2", "train.batch_size=2", "train.seq_len=48",
               "train.lr=0.02", "federation.clients_per_round=2", "eval.loss_examples=4", "eval.batch_size=2"):
        argv += ["--set", kv]
    res = bench.main(argv)
    return argv, root, res


def _stage(root, name):
    return json.loads((root / "results" / f"{name}.json").read_text())


def test_every_stage_ran_and_the_merge_changes_the_scored_model(bench, finished):
    from fedprune.federated.merged import load_merged_run

    argv, root, res = finished
    names = {r: sorted(s) for r, s in res["stages"].items()}
    assert names == {"dense": ["eval", "eval_fed", "fed"], "comp20": ["eval", "eval_fed", "export", "fed", "prune"]}
    assert [r["name"] for r in res["rows"]] == ["dense", "dense_fed", "comp20", "comp20_fed"]
    prune = _stage(root, "comp20.prune")
    assert prune["params_after"] < prune["params_before"] and prune["achieved_ratio"] > 0.1
    assert _stage(root, "comp20.eval")["params"] == prune["params_after"] == _stage(root, "comp20.eval_fed")["params"]
    # the fed score is the merged model's: other log-likelihoods than the pruned base's, the same as the merge's own
    before, after = _stage(root, "comp20.eval"), _stage(root, "comp20.eval_fed")
    assert before["cloze"]["first_loglikelihoods"] != after["cloze"]["first_loglikelihoods"]
    args = bench.build_parser().parse_args(argv)
    merged, tok, info = load_merged_run(bench.run_dir(args, "comp20"))
    assert info["round"] == 1
    again = bench.score_csqa(merged, tok, args)
    assert again["cloze"]["first_loglikelihoods"] == pytest.approx(after["cloze"]["first_loglikelihoods"], abs=1e-5)
    fed = _stage(root, "comp20.fed")
    assert fed["rounds"] == 1 and fed["device_rounds"] == 2 and fed["cpu_s"] > 0
    ex = _stage(root, "comp20.export")
    assert ex["bytes"] == bench.gguf_path(args, "comp20").stat().st_size > 0
    assert res["summary"]["comp20_fed_gguf"]["bytes"] == ex["bytes"]
    for st in ("comp20.prune", "comp20.eval", "dense.fed"):
        rec = _stage(root, st)
        assert rec["cpu_s"] > 0 and set(rec["load_avg_1m"]) == {"start", "end"}


def test_rerun_skips_finished_stages_and_refuses_other_settings(bench, finished):
    argv, root, _ = finished
    before = {p.name: p.read_text() for p in (root / "results").glob("*.*.json")}
    ckpt = bench.run_dir(bench.build_parser().parse_args(argv), "dense") / "checkpoint.pt"
    mtime = ckpt.stat().st_mtime_ns
    (root / "results" / "dense.eval_fed.json").unlink()  # only this stage is redone
    bench.main(argv)
    after = {p.name: p.read_text() for p in (root / "results").glob("*.*.json")}
    assert after.keys() == before.keys()
    assert {k for k in after if after[k] != before[k]} == {"dense.eval_fed.json"}
    assert json.loads(after["dense.eval_fed.json"])["cloze"] == json.loads(before["dense.eval_fed.json"])["cloze"]
    assert ckpt.stat().st_mtime_ns == mtime  # the finished federation was not run again
    with pytest.raises(SystemExit, match="other settings"):
        bench.main([*argv, "--limit", "5"])


def test_summary_gap_is_computed_from_the_rows(bench, finished):
    argv, root, _ = finished
    res_dir = root / "results"

    def set_acc(stage, correct_norm):
        p = res_dir / f"{stage}.json"
        rec = json.loads(p.read_text())
        rec["cloze"].update(acc_norm=sum(correct_norm) / 4, correct_norm="".join(map(str, correct_norm)))
        p.write_text(json.dumps(rec))

    set_acc("dense.eval_fed", [1, 1, 1, 0])
    set_acc("comp20.eval_fed", [1, 1, 0, 0])
    set_acc("dense.eval", [1, 1, 0, 0])
    set_acc("comp20.eval", [1, 0, 0, 0])
    s = bench.main([*argv, "--summary-only"])["summary"]
    assert s["comp20_fed_gap_to_dense_fed_points"] == pytest.approx(25.0) and s["within_3_points"] is False
    assert s["per_pipeline"]["comp20"] == pytest.approx({"fed_gain_points": 25.0, "pruning_loss_points": 25.0,
                                                         "gap_to_dense_fed_points": 25.0})
    lo, hi = s["comp20_fed_gap_bootstrap_95ci_points"]
    assert lo <= 25.0 <= hi
    set_acc("comp20.eval_fed", [1, 1, 1, 0])
    s = bench.main([*argv, "--summary-only"])["summary"]
    assert s["comp20_fed_gap_to_dense_fed_points"] == pytest.approx(0.0) and s["within_3_points"] is True
    md = (res_dir / "recovery.md").read_text()
    assert "| COMP 20 % + fed LoRA |" in md and "**0.0 points** behind" in md and ": within 3 points" in md


def test_six_task_average_leaves_out_boolq_and_uses_each_tasks_metric(bench):
    r = {"boolq": {"acc": 1.0, "acc_norm": 1.0}, "piqa": {"acc": 0.5, "acc_norm": 0.1},
         "hellaswag": {"acc": 0.2, "acc_norm": 0.3}}
    assert bench.without_boolq(r) == pytest.approx((0.5 + 0.3) / 2)  # piqa: acc, hellaswag: acc_norm
