"""Perplexity, log-likelihood scoring, accuracy, the evaluate() result and the CLI, on tiny models."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from fedprune.data import resolve_root
from fedprune.data.choice import ChoiceExample, multiple_choice, multiple_input
from fedprune.data.toy_tokenizer import toy_tokenizer
from fedprune.evaluate import (accuracy, encode_pair, evaluate, loglikelihoods, perplexity, perplexity_of_tokens,
                               score_example, score_examples, score_flat, speed, zero_shot_average)
from fedprune.models.tiny import tiny_model

HAVE_DATA = (resolve_root() / "piqa" / "dev.jsonl").is_file()
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 3


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    return tiny_model("llama", vocab_size=len(tok))


def _hand_perplexity(model, tokens: torch.Tensor, seq_len: int, n: int) -> float:
    nll, count = 0.0, 0
    for w in range(n):
        ids = tokens[w * seq_len:(w + 1) * seq_len]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), dim=-1)
        for t in range(seq_len - 1):
            nll -= float(logp[t, ids[t + 1]])
            count += 1
    return math.exp(nll / count)


def test_perplexity_equals_hand_computation(lm):
    tokens = torch.randint(0, lm.config.vocab_size, (3 * 16 + 5,), generator=torch.Generator().manual_seed(1))
    got = perplexity_of_tokens(lm, tokens, seq_len=16, batch_size=2, progress=False)
    assert got["windows"] == 3 and got["tokens"] == 3 * 15
    assert got["ppl"] == pytest.approx(_hand_perplexity(lm, tokens, 16, 3), rel=1e-5)
    first = perplexity_of_tokens(lm, tokens, seq_len=16, limit=1, progress=False)
    assert first["windows"] == 1
    assert first["ppl"] == pytest.approx(_hand_perplexity(lm, tokens, 16, 1), rel=1e-5)


class FixedLogitsLM(torch.nn.Module):
    """Returns the same large-magnitude logits [1, T, V] whatever the input (to test numerics)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.logits[:, :input_ids.shape[1]])


def test_perplexity_is_precise_with_a_large_vocabulary():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 512, 49152, generator=g) * 4
    tokens = torch.randint(0, 49152, (512,), generator=g)
    ref = -torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, tokens[1:, None]).mean().item()
    got = perplexity_of_tokens(FixedLogitsLM(logits), tokens, seq_len=512, progress=False)
    assert got["nll"] == pytest.approx(ref, abs=1e-5)  # a transposed cross_entropy was 7e-5 off here


def test_perplexity_of_a_text_file(tmp_path, lm, tok):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    tokens = torch.tensor(tok(TEXT)["input_ids"])
    got = perplexity(lm, tok, f"text:{path}", seq_len=20, limit=2, progress=False)
    assert got == pytest.approx(_hand_perplexity(lm, tokens, 20, 2), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(lm, tok, f"text:{path}", seq_len=10_000, progress=False)


class BigramLM(torch.nn.Module):
    """A causal LM whose next-token logits depend on the current token only: logits = table[token]."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 3)
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, logits_to_keep: int = 0):
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)

    def loglik(self, context: list[int], continuation: list[int]) -> float:
        ids = context + continuation
        logp = torch.log_softmax(self.table.detach().double(), dim=-1)
        return sum(float(logp[ids[i - 1], ids[i]]) for i in range(len(context), len(ids)))


@pytest.mark.parametrize("add_bos", [False, True])
def test_loglikelihoods_equal_hand_computation(add_bos):
    tok = toy_tokenizer(add_bos=add_bos)
    lm = BigramLM(len(tok))
    requests = [("Question: What do plants need?\nAnswer:", " water"), ("The quick brown", " fox jumps"),
                ("Is it yes or no? ", "yes"), ("A man is sitting on a roof.", " He starts")]
    got = loglikelihoods(lm, tok, requests, batch_size=3, progress=False)
    for (context, continuation), value in zip(requests, got):
        enc = encode_pair(tok, context, continuation)
        assert value == pytest.approx(lm.loglik(enc.context, enc.continuation), abs=1e-4)


def test_encode_pair_moves_trailing_space_and_keeps_bos_in_context():
    tok = toy_tokenizer(add_bos=True)
    a, b = encode_pair(tok, "Answer: ", "yes"), encode_pair(tok, "Answer:", " yes")
    assert a == b
    assert a.context[0] == tok.bos_token_id and tok.bos_token_id not in a.continuation
    assert tok.decode(a.continuation) == " yes"
    assert encode_pair(tok, "", "yes").context == [tok.bos_token_id]


def test_acc_and_acc_norm_on_a_constructed_case():
    ex = multiple_choice("Q:", ["ab", "abcdefgh"], label=1)
    s = score_example(ex, [-10.0, -12.0])  # raw favours 0; per character -5 vs -1.5 favours 1
    assert (s.pred, s.pred_norm) == (0, 1)
    assert accuracy([s]) == {"acc": 0.0, "acc_norm": 1.0}
    tie = score_example(multiple_choice("Q:", ["x", "y"], label=0), [-1.0, -1.0])
    assert (tie.pred, tie.pred_norm) == (0, 0)  # first maximum, like numpy.argmax


def test_correct_string_follows_the_metric():
    from fedprune.evaluate.harness import correct_string

    # pred right / pred_norm wrong, then the reverse, then both right
    scores = [SimpleNamespace(pred=1, pred_norm=0, label=1), SimpleNamespace(pred=0, pred_norm=2, label=2),
              SimpleNamespace(pred=3, pred_norm=3, label=3)]
    assert correct_string(scores, "acc") == "101"
    assert correct_string(scores, "acc_norm") == "011"
    with pytest.raises(ValueError, match="acc or acc_norm"):
        correct_string(scores, "ppl")


def test_score_flat_splits_the_loglikelihoods_per_example():
    a = multiple_choice("Q:", ["ab", "abcdefgh"], label=1)
    b = multiple_choice("R:", ["x", "y", "z"], label=2)
    s = score_flat([a, b], [-10.0, -12.0, -3.0, -2.0, -1.0])
    assert [(x.pred, x.pred_norm, x.label) for x in s] == [(0, 1, 1), (2, 2, 2)]
    assert s[1].loglikelihoods == (-3.0, -2.0, -1.0)
    with pytest.raises(ValueError, match="4 log-likelihoods for 5 requests"):
        score_flat([a, b], [-1.0] * 4)


def test_scoring_picks_the_choice_the_model_prefers():
    tok = toy_tokenizer()
    lm = BigramLM(len(tok), seed=3)
    choices = ["yes", "no", "water", "roof"]
    lls = [lm.loglik(*_enc(tok, "Answer:", " " + c)) for c in choices]
    best = max(range(len(choices)), key=lls.__getitem__)
    scores = score_examples(lm, tok, [multiple_choice("Answer:", choices, best),
                                      multiple_choice("Answer:", choices, (best + 1) % 4)], progress=False)
    assert [s.pred for s in scores] == [best, best]
    assert accuracy(scores)["acc"] == 0.5


def _enc(tok, context, continuation):
    e = encode_pair(tok, context, continuation)
    return e.context, e.continuation


def test_multiple_input_example_scores_the_shared_continuation():
    ex = multiple_input(["Sarah was better than Maria so Sarah", "Sarah was better than Maria so Maria"],
                        "always won.", label=1)
    assert ex.requests[0][1] == ex.requests[1][1] == " always won."
    assert ex.choices == tuple(c for c, _ in ex.requests)
    with pytest.raises(ValueError):
        ChoiceExample((("a", " b"),), ("b",), label=2)


def test_zero_shot_average_uses_the_reported_metric_of_the_seven_tasks():
    results = {"wikitext2": {"ppl": 30.0}, "piqa": {"acc": 0.6, "acc_norm": 0.1},
               "hellaswag": {"acc": 0.1, "acc_norm": 0.4}, "siqa": {"acc": 1.0, "acc_norm": 1.0}}
    assert zero_shot_average(results) == pytest.approx(0.5)
    assert zero_shot_average({"wikitext2": {"ppl": 3.0}}) is None


@pytest.mark.skipif(not HAVE_DATA, reason="local evaluation data not found")
def test_evaluate_result_shape(tmp_path, lm, tok):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    out = evaluate(lm, tok, tasks=[f"text:{path}", "piqa", "arc_challenge"], seq_len=16, limit=3, batch_size=4,
                   progress=False)
    assert set(out) == {"model", "settings", "results", "average"}
    assert set(out["results"]) == {f"text:{path}", "piqa", "arc_challenge"}
    assert set(out["results"]["piqa"]) == {"acc", "acc_norm"}
    assert set(out["results"][f"text:{path}"]) == {"ppl"}
    assert out["settings"]["counts"] == {f"text:{path}": 3, "piqa": 3, "arc_challenge": 3}
    assert out["average"] == pytest.approx((out["results"]["piqa"]["acc"]
                                            + out["results"]["arc_challenge"]["acc_norm"]) / 2)
    json.dumps(out)
    logged = evaluate(lm, tok, tasks=["piqa", "arc_challenge"], limit=3, batch_size=4, progress=False, log_samples=True)
    assert set(logged["samples"]) == {"piqa", "arc_challenge"}  # zero-shot tasks only
    for task, metric in (("piqa", "acc"), ("arc_challenge", "acc_norm")):
        bits = logged["samples"][task]["correct"]
        assert len(bits) == 3 and set(bits) <= {"0", "1"}
        assert bits.count("1") / 3 == pytest.approx(out["results"][task][metric])  # the reported metric's verdicts
    with pytest.raises(KeyError, match="known:"):
        evaluate(lm, tok, tasks=["piqa", "no-such-task"])


def test_eval_command_writes_the_api_result(tmp_path, lm, tok):
    from fedprune.cli import main

    model_dir, corpus, out = tmp_path / "model", tmp_path / "corpus.txt", tmp_path / "res.json"
    lm.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    corpus.write_text(TEXT)
    rc = main(["eval", "--model", str(model_dir), "--tasks", f"text:{corpus}", "--seq-len", "20", "--output", str(out)])
    assert rc == 0
    written = json.loads(out.read_text())
    assert written["results"][f"text:{corpus}"]["ppl"] == pytest.approx(
        perplexity(lm, tok, f"text:{corpus}", seq_len=20, progress=False), rel=1e-5)


def test_speed_reports_throughput_memory_and_parameter_bytes(lm, tok):
    got = speed(lm, None, prompt_len=8, gen_len=4, repeats=1)
    assert got["prefill_tokens_per_s"] > 0 and got["decode_tokens_per_s"] > 0 and got["peak_memory_bytes"] > 0
    assert got["parameter_bytes"] == 4 * sum(p.numel() for p in lm.parameters())
    assert got["memory_kind"] == "process_rss"
