"""CommonsenseQA: the two evaluation tasks (lm-eval's lettered prompt, the cloze prompt) and the
federated partitions of its training split."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from collections import Counter

import pytest

from fedprune.data import load_examples, load_records, resolve_root
from fedprune.data.csqa import csqa_cloze_example, csqa_letter_example, hf_record

HAVE_DATA = (resolve_root() / "csqa" / "valid.jsonl").is_file()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="local CommonsenseQA files not found (set $FEDPRUNE_DATA)")

RAW = {"answerKey": "C", "id": "x1", "question": {
    "question_concept": "dog", "stem": "Where does a dog sleep?",
    "choices": [{"label": "A", "text": "sky"}, {"label": "B", "text": "ocean"}, {"label": "C", "text": "kennel"},
                {"label": "D", "text": "moon"}, {"label": "E", "text": "fire station"}]}}


def test_local_line_becomes_the_hub_record():
    assert hf_record(RAW) == {"id": "x1", "question": "Where does a dog sleep?", "question_concept": "dog",
                              "choices": {"label": ["A", "B", "C", "D", "E"],
                                          "text": ["sky", "ocean", "kennel", "moon", "fire station"]},
                              "answerKey": "C"}


def test_cloze_builder_on_a_hand_example():
    ex = csqa_cloze_example(hf_record(RAW))
    ctx = "Question: Where does a dog sleep?\nAnswer:"
    assert ex.requests == tuple((ctx, " " + t) for t in ("sky", "ocean", "kennel", "moon", "fire station"))
    assert ex.choices == ("sky", "ocean", "kennel", "moon", "fire station")  # acc_norm divides by these lengths
    assert ex.label == 2


def test_letter_builder_on_a_hand_example():
    ex = csqa_letter_example(hf_record(RAW))
    ctx = ("Question: Where does a dog sleep?\nA. sky\nB. ocean\nC. kennel\nD. moon\nE. fire station\nAnswer:")
    assert ex.requests == tuple((ctx, " " + l) for l in "ABCDE") and ex.label == 2


@needs_data
def test_requests_equal_lm_eval_commonsense_qa_yaml():
    pytest.importorskip("lm_eval")
    from fedprune.evaluate.lm_eval_bridge import lm_eval_requests, lm_eval_task

    records = load_records("commonsense_qa")[:25]
    per_doc = lm_eval_requests(lm_eval_task("commonsense_qa", records))
    theirs = [tuple(inst.arguments for inst in insts) for insts in per_doc]
    assert theirs == [ex.requests for ex in load_examples("commonsense_qa", limit=25)]
    # lm-eval's target is the answer key, found among the choices A-E
    task = lm_eval_task("commonsense_qa", records)
    gold = [task.doc_to_choice(d).index(task.doc_to_target(d)) for d in task.eval_docs]
    assert gold == [ex.label for ex in load_examples("commonsense_qa", limit=25)]


@needs_data
def test_both_tasks_read_the_whole_validation_split_with_the_same_labels():
    letters, cloze = load_examples("commonsense_qa"), load_examples("commonsense_qa_cloze")
    assert len(letters) == len(cloze) == 1221
    assert [e.label for e in letters] == [e.label for e in cloze]
    assert all(len(e.choices) == 5 for e in cloze)
    # the cloze context is the lettered one without its list of choices
    assert letters[0].requests[0][0].startswith(cloze[0].requests[0][0][:-len("\nAnswer:")])


def test_tasks_are_registered_with_their_reported_metric():
    from fedprune.evaluate import parse_tasks, reported_metric

    assert parse_tasks("commonsense_qa,commonsense_qa_cloze") == ["commonsense_qa", "commonsense_qa_cloze"]
    assert reported_metric("commonsense_qa") == "acc" and reported_metric("commonsense_qa_cloze") == "acc_norm"


# ---- federated: groups, partitions, training examples, a run --------------------------------------
from fedprune.federated.csqa import (  # noqa: E402
    concept_groups, pathological_groups, pathological_partition, tokenize_csqa, with_groups,
)
from fedprune.federated.partition import IGNORE_INDEX, dirichlet_partition, iid_partition  # noqa: E402


def _rec(i, concept):
    return {"id": str(i), "question": f"q{i}?", "question_concept": concept,
            "choices": {"label": list("ABCDE"), "text": ["a", "b", "c", "d", "e"]}, "answerKey": "B"}


HAND = [_rec(i, c) for i, c in enumerate(["cat", "dog", "cat", "eel", "dog", "cat", "ant", "bee", "dog", "fox"])]


def test_concept_groups_by_hand():
    # cat x3, dog x3 (tie: by name, cat first), then ant, bee, eel, fox once each (ties by name: ant)
    groups, names = concept_groups(HAND, top=3)
    assert names == ["cat", "dog", "ant", "other"]
    assert groups == [0, 1, 0, 3, 1, 0, 2, 3, 1, 3]
    # every concept a group of its own when top covers them all: no "other"
    assert concept_groups(HAND, top=10)[1] == ["cat", "dog", "ant", "bee", "eel", "fox"]


def _ids(parts):
    return sorted(r["id"] for p in parts for r in p)


def test_every_record_lands_on_exactly_one_client():
    recs = with_groups(HAND * 1, top=3)
    for parts in (iid_partition(recs, 3, seed=0), dirichlet_partition(recs, 2, alpha=0.5, seed=0, key="group"),
                  pathological_partition(recs, 2, seed=0)):
        assert _ids(parts) == sorted(r["id"] for r in recs)


def test_pathological_gives_each_client_two_groups():
    held = pathological_groups(20, 10, seed=3)
    assert all(len(set(g)) == 2 for g in held)
    assert sorted(g for gs in held for g in gs) == list(range(20))  # 10 clients x 2 = each group once
    held = pathological_groups(20, 13, seed=3)  # 26 slots: six groups go to two clients
    assert all(len(set(g)) == 2 for g in held) and set(g for gs in held for g in gs) == set(range(20))
    recs = with_groups(HAND, top=3)  # 4 groups over 2 clients: 2 each
    parts = pathological_partition(recs, 2, seed=1)
    assert [len({r["group"] for r in p}) for p in parts] == [2, 2]
    assert not {r["group"] for r in parts[0]} & {r["group"] for r in parts[1]}
    with pytest.raises(ValueError, match="num_clients >= 10"):
        pathological_groups(20, 9, seed=0)


def test_shared_group_is_split_evenly_between_its_holders():
    recs = [{**_rec(i, "x"), "group": i % 2} for i in range(8)]  # 2 groups of 4 over 4 clients
    parts = pathological_partition(recs, 4, seed=0, per_client=1)
    assert sorted(len(p) for p in parts) == [2, 2, 2, 2] and _ids(parts) == sorted(r["id"] for r in recs)


def test_training_example_is_the_scored_cloze_pair():
    from fedprune.data.csqa import csqa_cloze_example
    from fedprune.evaluate.loglik import encode_pair
    from fedprune.federated.tiny_tokenizer import tiny_bpe_tokenizer

    tok = tiny_bpe_tokenizer()
    rec = hf_record(RAW)
    ex = tokenize_csqa(tok, rec, seq_len=128)
    ctx, cont = csqa_cloze_example(rec).requests[2]  # the right answer's request, as the evaluation scores it
    enc = encode_pair(tok, ctx, cont)
    assert ex["input_ids"] == enc.context + enc.continuation  # no EOS: the loss is the scored answer only
    assert ex["labels"] == [IGNORE_INDEX] * len(enc.context) + enc.continuation
    assert tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX]) == " kennel"


@needs_data
def test_csqa_config_and_data_settings():
    from fedprune.federated.config import load_config
    from fedprune.federated.partition import client_partitions, heldout_records

    cfg = load_config(None, ["data.dataset=commonsense_qa", "data.partition=pathological", "data.num_clients=10"])
    parts = client_partitions(cfg.data, seed=0)
    assert sum(map(len, parts)) == 9741 and all(len({r["group"] for r in p}) == 2 for p in parts)
    assert len(heldout_records(cfg.data)) == 1221
    with pytest.raises(ValueError, match="commonsense_qa must be iid, dirichlet, pathological"):
        load_config(None, ["data.dataset=commonsense_qa"])  # shepherd is Dolly's split
    with pytest.raises(ValueError, match="dolly, commonsense_qa|commonsense_qa, dolly"):
        load_config(None, ["data.dataset=alpaca"])
    with pytest.raises(ValueError, match="accuracy_examples"):
        load_config(None, ["eval.accuracy_examples=5"])  # Dolly has no multiple-choice task


def tiny_csqa_simulation(run_dir):
    """A one-round CommonsenseQA federation of a tiny LLaMA: loss on 6 held-out questions and the
    cloze task's accuracy on 5 at every evaluation."""
    import torch

    from fedprune.federated.config import load_config
    from fedprune.federated.runtime.simulation import Simulation
    from fedprune.federated.tiny_tokenizer import tiny_bpe_tokenizer
    from fedprune.models.tiny import tiny_model

    torch.manual_seed(0)
    tok = tiny_bpe_tokenizer()
    cfg = load_config(None, [
        "model.name=tiny-llama", "model.tokenizer=tiny-bpe", "data.dataset=commonsense_qa", "data.partition=dirichlet",
        "data.max_examples_per_client=6", "train.local_steps=2", "train.grad_accum=1", "train.seq_len=48",
        "federation.rounds=1", "federation.clients_per_round=2", "federation.dropout=false", "lora.rank=4",
        "eval.loss_examples=6", "eval.rouge_examples=0", "eval.accuracy_examples=5"])
    model = tiny_model("llama", vocab_size=len(tok))
    return Simulation(cfg, run_dir, model=model, tokenizer=tok), model, tok


@needs_data
def test_tiny_federated_run_logs_loss_and_accuracy(tmp_path):
    import json

    from fedprune.data import load_examples
    from fedprune.evaluate import accuracy, score_examples

    sim, model, tok = tiny_csqa_simulation(tmp_path / "run")
    assert all(len({r["question_concept"] for r in p}) >= 1 and "group" in p[0] for p in sim.partitions)
    before = accuracy(score_examples(model, tok, load_examples("commonsense_qa_cloze", limit=5), progress=False))
    sim.run()
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1]
    for m in metrics:
        assert m["acc_task"] == "commonsense_qa_cloze" and m["acc_examples"] == 5 and m["test_loss"] > 0
    # round 0 is the untouched base model: its accuracy is the harness's on the same 5 questions
    assert {k: metrics[0][k] for k in ("acc", "acc_norm")} == before
    # `fedprune report` shows the accuracy columns of a multiple-choice run, round by round
    from fedprune.federated.report import write_report

    md = write_report(tmp_path / "run").read_text()
    assert "| acc | acc_norm |" in md
    row0 = next(line for line in md.splitlines() if line.startswith("| 0 |"))
    assert f"| {metrics[0]['acc']:.4g} | {metrics[0]['acc_norm']:.4g} |" in row0


@needs_data
def test_score_global_matches_the_rounds_own_evaluation_with_per_question_correctness(tmp_path):
    """``score_global`` (the CSQA benchmarks' scoring): the same loss and accuracy as the simulation's
    round evaluation of the same global model, plus a 0/1 per question that adds up to the accuracy;
    the base is left at ``W0 + base_delta``."""
    import json

    import torch

    from fedprune.federated.evaluation import score_global

    sim, _, _ = tiny_csqa_simulation(tmp_path / "run")
    sim.run()
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    before = {k: v.clone() for k, v in sim.base.model.state_dict().items()}
    row = score_global(sim, "commonsense_qa_cloze", 5, 6)
    assert row["questions"] == 5 and len(row["correct"]) == len(row["correct_norm"]) == 5
    assert row["acc"] == pytest.approx(last["acc"]) and row["acc_norm"] == pytest.approx(last["acc_norm"])
    assert row["test_loss"] == pytest.approx(last["test_loss"], rel=1e-5)
    assert sum(row["correct"]) / 5 == pytest.approx(row["acc"]) and sum(row["correct_norm"]) / 5 == pytest.approx(row["acc_norm"])
    after = sim.base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
