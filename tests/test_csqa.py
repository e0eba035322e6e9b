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
