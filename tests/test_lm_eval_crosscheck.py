"""fedprune's zero-shot prompts and scoring against lm-evaluation-harness's own code.

Prompts: lm-eval's task YAMLs (``ConfigurableTask`` over the same local records) must build
exactly the (context, continuation) requests fedprune builds. Scoring:

A tiny random model and a small byte-level BPE tokenizer are saved to a temporary
directory; lm-eval loads them from there with ``HFLM`` and scores the (context,
continuation) requests built from the local task files; fedprune scores the same requests
in-process, with both scoring paths (shared-prefix on LLaMA and OPT). Per-request
log-likelihoods must agree to 1e-4 and acc / acc_norm predictions must be identical. Boolq
passages exceed the tiny model's 256 positions, so lm-eval's left truncation is compared too;
the tokenizer is run with and without a BOS token.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

pytest.importorskip("lm_eval")

from fedprune.data import load_examples, load_records, resolve_root
from fedprune.data.choice import hellaswag_example
from fedprune.evaluate import accuracy, score_examples
from fedprune.evaluate.lm_eval_bridge import TASK_YAMLS, lm_eval_metrics, lm_eval_requests, lm_eval_task
from fedprune.data.toy_tokenizer import toy_tokenizer
from fedprune.evaluate import loglikelihoods, score_flat
from fedprune.models.tiny import tiny_model

TASK_COUNTS = {"piqa": 20, "arc_easy": 20, "winogrande": 6, "hellaswag": 4, "boolq": 3, "openbookqa": 4}

pytestmark = pytest.mark.skipif(not (resolve_root() / "piqa" / "dev.jsonl").is_file(),
                                reason="local evaluation data not found (set $FEDPRUNE_DATA)")


@pytest.fixture(scope="module")
def examples():
    return [ex for task, n in TASK_COUNTS.items() for ex in load_examples(task, limit=n)]


def _requests(examples):
    return [r for ex in examples for r in ex.requests]


def _lm_eval_loglikelihoods(directory, requests, batch_size=8):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(directory), tokenizer=str(directory), batch_size=batch_size, device="cpu",
              dtype="float32")
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(requests)]
    return [ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)]


def _predictions(examples, lls):
    return [(s.pred, s.pred_norm) for s in score_flat(examples, lls)]


def _crosscheck(model, tokenizer, directory, examples, scoring="shared-prefix"):
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    requests = _requests(examples)
    ours = loglikelihoods(model, tokenizer, requests, batch_size=8, progress=False, scoring=scoring)
    theirs = _lm_eval_loglikelihoods(directory, requests)
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    assert worst < 1e-4, f"largest log-likelihood difference {worst:.2e}"
    assert _predictions(examples, ours) == _predictions(examples, theirs)
    return ours


@pytest.mark.parametrize("scoring", ["shared-prefix", "full"])
@pytest.mark.parametrize("add_bos", [False, True], ids=["no-bos", "bos"])
def test_loglikelihoods_match_lm_eval_hflm(tmp_path, examples, add_bos, scoring):
    texts = [c + x for c, x in _requests(examples)]
    tokenizer = toy_tokenizer(texts, vocab_size=600, add_bos=add_bos)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    lls = _crosscheck(model, tokenizer, tmp_path, examples, scoring)
    assert all(ll < 0 for ll in lls)


def test_shared_prefix_matches_lm_eval_hflm_on_opt(tmp_path, examples):
    texts = [c + x for c, x in _requests(examples)]
    tokenizer = toy_tokenizer(texts, vocab_size=600)
    model = tiny_model("opt", vocab_size=len(tokenizer))
    _crosscheck(model, tokenizer, tmp_path, examples)


@pytest.mark.real_model
def test_loglikelihoods_match_lm_eval_with_smollm2_tokenizer(tmp_path, examples):
    import fedprune

    tokenizer = fedprune.load_tokenizer("smollm2-135m")
    model = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=1024)
    subset = examples[:12] + examples[40:46]  # piqa, winogrande
    _crosscheck(model, tokenizer, tmp_path, subset)


@pytest.mark.parametrize("task", sorted(TASK_YAMLS))
def test_requests_equal_those_built_by_lm_eval_task_yamls(task):
    per_doc = lm_eval_requests(lm_eval_task(task, load_records(task)[:20]))
    theirs = [tuple(inst.arguments for inst in insts) for insts in per_doc]
    assert theirs == [ex.requests for ex in load_examples(task, limit=20)]


def test_hub_shaped_hellaswag_records_follow_lm_eval_process_docs():
    docs = [{"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
             "endings": ["is using wrap [title] to wrap a pair of skis.", "is ripping  level tiles off.",
                         "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": "3"}]
    per_doc = lm_eval_requests(lm_eval_task("hellaswag", docs))
    assert tuple(i.arguments for i in per_doc[0]) == hellaswag_example(docs[0]).requests


def test_accuracy_equals_lm_eval_process_results(examples):
    tokenizer = toy_tokenizer(vocab_size=300)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    for task in ("piqa", "winogrande", "hellaswag"):  # winogrande: lm-eval reports acc only
        n = TASK_COUNTS[task]
        scores = score_examples(model, tokenizer, load_examples(task, limit=n), progress=False)
        lls = [ll for s in scores for ll in s.loglikelihoods]
        lm_task = lm_eval_task(task, load_records(task)[:n])
        theirs = lm_eval_metrics(lm_task, lm_eval_requests(lm_task), lls)
        assert "acc" in theirs
        assert theirs == pytest.approx({m: v for m, v in accuracy(scores).items() if m in theirs})
