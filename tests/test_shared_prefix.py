"""Shared-prefix scoring: the plan and the prefix trees (pure), and its log-probabilities against
the full path and a plain full-sequence forward on tiny random LLaMA and OPT models (float32, CPU)."""
from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedprune.data import load_examples, resolve_root
from fedprune.data.toy_tokenizer import toy_tokenizer
from fedprune.evaluate import evaluate, loglikelihoods, score_example
from fedprune.evaluate.loglik import encode_pair, forward_tails, model_inputs, scoring_path
from fedprune.evaluate.shared_prefix import (PrefixGroup, passes, plan_groups, prefix_tree,
                                             score_inputs, split_sorted, tree_mask, unsupported_reason)
from fedprune.models.tiny import tiny_model

HAVE_DATA = (resolve_root() / "piqa" / "dev.jsonl").is_file()
PER_TOKEN = 5e-6  # packed vs full-sequence log-probabilities, float32 on CPU (observed about 1e-6)


def _seq(rng, n, lo=3, hi=500):
    return tuple(rng.randrange(lo, hi) for _ in range(n))


# ---------------------------------------------------------------- the plan (pure)

def test_plan_groups_shares_each_questions_context_not_a_common_opening():
    rng = random.Random(0)
    opening = (7, 8)  # "Question:" shared by every question: not worth a group across questions
    ctx_a, ctx_b = opening + _seq(rng, 10), opening + _seq(rng, 6)
    a = [ctx_a + _seq(rng, n) for n in (1, 3, 5)]
    b = [ctx_b + _seq(rng, n) for n in (2, 2, 4)]
    inputs = a + b
    groups = plan_groups(inputs, [1] * 6)
    assert sorted((g.prefix, set(g.inputs)) for g in groups) == sorted([(12, set(a)), (8, set(b))],
                                                                       key=lambda x: x[0])


def test_plan_groups_runs_into_a_continuation_the_choices_share_and_keeps_nested_inputs():
    rng = random.Random(1)
    ctx, common = _seq(rng, 9), _seq(rng, 4)
    alike = [ctx + common + _seq(rng, 2), ctx + common + _seq(rng, 3)]
    (g,) = plan_groups(alike, [6, 7])
    assert g.prefix == 13
    nested = [ctx, ctx + _seq(rng, 3)]  # one input is the beginning of the other
    (g,) = plan_groups(nested, [1, 4])
    assert g.prefix == len(ctx)


def test_plan_groups_leaves_short_shares_alone_and_respects_max_group():
    rng = random.Random(2)
    short = [(1, 2, 3) + _seq(rng, 5), (1, 2, 3) + _seq(rng, 5)]
    assert [g.prefix for g in plan_groups(short, [1, 1], min_prefix=4)] == [0, 0]
    ctx = _seq(rng, 8)
    many = [ctx + (i,) for i in range(10)]
    groups = plan_groups(many, [1] * 10, max_group=4)
    assert all(len(g.inputs) <= 4 and g.prefix == 8 for g in groups)
    assert sorted(x for g in groups for x in g.inputs) == sorted(many)


def test_plan_groups_refuses_bad_input():
    with pytest.raises(ValueError, match="distinct"):
        plan_groups([(1, 2), (1, 2)], [1, 1])
    with pytest.raises(ValueError, match="tails"):
        plan_groups([(1, 2)], [1, 1])
    with pytest.raises(ValueError, match="no tokens"):
        plan_groups([()], [1])


def test_prefix_tree_holds_each_distinct_prefix_once_and_each_input_on_its_path():
    rng = random.Random(6)
    ctx, common = _seq(rng, 6), _seq(rng, 3)
    inputs = [ctx + common + _seq(rng, 2), ctx + _seq(rng, 4), ctx + common + _seq(rng, 1), ctx,
              _seq(rng, 5)]  # choices that begin alike, a nested input, an unrelated one
    tree = prefix_tree(inputs)
    assert len(tree.tokens) == len({x[:k] for x in inputs for k in range(1, len(x) + 1)})
    for x, path in zip(inputs, tree.paths):
        assert [tree.tokens[k] for k in path] == list(x)
        assert [tree.positions[k] for k in path] == list(range(len(x)))
        assert [tree.parents[k] for k in path] == [-1] + list(path[:-1])
    width = len(tree.tokens) + 2
    mask = tree_mask(tree, width)
    for path in tree.paths:  # a token sees exactly the tokens up to it on its own input
        for j, q in enumerate(path):
            assert set(mask[q].nonzero().flatten().tolist()) == set(path[:j + 1])
    assert mask[-1].nonzero().flatten().tolist() == [width - 1]  # padding sees itself
    with pytest.raises(ValueError, match="distinct"):
        prefix_tree([(1, 2), (1, 2)])


def _cost(lengths, sizes, pass_cost):
    cost, k = 0, 0
    for s in sizes:
        cost += lengths[k] * s + pass_cost
        k += s
    return cost


def _fits(lengths, longest, sizes, batch_size):
    k = 0
    for s in sizes:
        if s > 1 and s * lengths[k] > batch_size * max(longest[k:k + s]):
            return False
        k += s
    return True


def _brute_force_cost(lengths, longest, batch_size, pass_cost):
    best = None
    for cuts in itertools.product([0, 1], repeat=len(lengths) - 1):
        sizes, n = [], 1
        for c in cuts:
            if c:
                sizes.append(n)
                n = 1
            else:
                n += 1
        sizes.append(n)
        if _fits(lengths, longest, sizes, batch_size):
            cost = _cost(lengths, sizes, pass_cost)
            best = cost if best is None else min(best, cost)
    return best


def test_split_sorted_is_optimal_and_sends_a_long_row_alone():
    assert split_sorted([100, 40, 38, 36], 8, 16) == [1, 3]
    assert split_sorted([10] * 20, 8, 16) == [8, 8, 4]
    # rows of width 30 holding inputs of 10 tokens: 4 such rows are 4 padded inputs' worth of tokens
    assert split_sorted([30] * 8, 4, 16, longest=[10] * 8) == [1] * 8
    assert split_sorted([30] * 8, 4, 16, longest=[20] * 8) == [2] * 4
    rng = random.Random(3)
    for _ in range(60):
        lengths = sorted((rng.randrange(1, 60) for _ in range(rng.randrange(1, 9))), reverse=True)
        longest = [rng.randrange(1, n + 1) for n in lengths]
        bs, cost = rng.randrange(1, 5), rng.choice([0, 4, 16, 100])
        sizes = split_sorted(lengths, bs, cost, longest)
        assert sum(sizes) == len(lengths) and _fits(lengths, longest, sizes, bs)
        assert _cost(lengths, sizes, cost) == _brute_force_cost(lengths, longest, bs, cost)
        plain = split_sorted(lengths, bs, cost)
        assert max(plain) <= bs and _cost(lengths, plain, cost) == _brute_force_cost(lengths, lengths, bs, cost)
    with pytest.raises(ValueError, match="sorted"):
        split_sorted([1, 2], 4)


def test_passes_run_every_group_once_within_the_tokens_of_a_padded_batch():
    rng = random.Random(4)
    groups = []
    for _ in range(30):
        ctx = _seq(rng, rng.randrange(4, 30))
        inputs = tuple(dict.fromkeys(ctx + _seq(rng, rng.randrange(1, 8)) for _ in range(rng.randrange(1, 6))))
        groups.append(PrefixGroup(len(ctx) if len(inputs) > 1 else 0, inputs, (1,) * len(inputs)))
    chunks = passes(groups, batch_size=4)
    assert sorted(g for c in chunks for g in c) == list(range(30))
    for c in chunks:
        width = max(len(prefix_tree(groups[g].inputs).tokens) for g in c)
        assert len(c) == 1 or len(c) * width <= 4 * max(len(x) for g in c for x in groups[g].inputs)


# ---------------------------------------------------------------- against full forwards

def _synthetic_inputs():
    """Questions with 1-10 choices, continuations of 1-9 tokens, choices that begin alike,
    a question with more choices than the batch size, nested inputs and lone inputs."""
    rng = random.Random(5)
    inputs, tails = [], []

    def add(x, t):
        inputs.append(x)
        tails.append(t)

    for q in range(5):
        ctx = _seq(rng, 4 + 9 * q)
        for c in range(1 + q % 4):
            cont = _seq(rng, 1 + (3 * c + q) % 9)
            add(ctx + cont[:-1] if len(cont) > 1 else ctx, len(cont))  # model input: all but the last token
    ctx, common = _seq(rng, 12), _seq(rng, 5)
    for c in range(3):  # the prefix runs into the scored tokens
        add(ctx + common + _seq(rng, 1 + c), 5 + 1 + c)
    ctx = _seq(rng, 7)
    for c in range(10):  # more choices than the batch size
        add(ctx + _seq(rng, 1 + c % 3), 1 + c % 3)
    base = _seq(rng, 20)
    add(base, 3)  # nested: one input is the beginning of the other
    add(base + _seq(rng, 4), 2)
    for n in (1, 30, 3):
        add(_seq(rng, n), 1)  # lone inputs, one of a single token
    return inputs, tails


def _full_forward(model, x, t):
    with torch.no_grad():
        return F.log_softmax(model(input_ids=torch.tensor([x])).logits[0, -t:].float(), dim=-1)


@pytest.mark.parametrize("arch,attention", [("llama", "sdpa"), ("opt", "sdpa"), ("llama", "eager"),
                                            ("opt", "eager")])
def test_shared_prefix_log_probs_equal_a_full_forward_and_the_full_path(arch, attention, one_thread):
    model = tiny_model(arch, vocab_size=512, attn_implementation=attention)
    inputs, tails = _synthetic_inputs()
    assert len(set(inputs)) == len(inputs)
    groups = plan_groups(inputs, tails)
    assert any(g.prefix > 0 and len(g.inputs) > 4 for g in groups)  # a row wider than 4 inputs
    assert any(g.prefix > len(x) - t for g in groups for x, t in zip(g.inputs, g.tails))  # scored in prefix
    chunks = passes(groups, 4)  # passes of trees (4D mask) and of lone inputs only (plain causal)
    assert any(all(len(groups[g].inputs) == 1 for g in c) for c in chunks)
    assert any(len(groups[g].inputs) > 1 for c in chunks for g in c)
    rng = random.Random(7)
    targets = {x: [_seq(rng, t), _seq(rng, max(1, t // 2))] for x, t in zip(inputs, tails)}  # two per input
    got = {}
    score_inputs(model, targets, batch_size=4, device="cpu", collect=got.__setitem__)
    assert set(got) == set(inputs)
    old = dict(zip(inputs, forward_tails(model, inputs, tails, "cpu")))
    for x, t in zip(inputs, tails):
        full = _full_forward(model, x, t)
        for c, ll in zip(targets[x], got[x]):
            target = torch.tensor(c)[:, None]
            per_token = full[-len(c):].gather(-1, target).flatten()
            assert abs(ll - float(per_token.sum())) < PER_TOKEN * len(c)
            assert abs(ll - float(old[x][-len(c):].gather(-1, target).sum())) < PER_TOKEN * len(c)


def test_shared_prefix_rounds_like_the_full_path_on_a_large_vocabulary(one_thread):
    """float32 log_softmax over ~50k logits is off from the exact value by up to ~1e-5 per token,
    consistently; lm-eval and the full path use it, so shared-prefix must too (logit - logsumexp
    would land 1e-4 away from them on 30-token continuations)."""
    model = tiny_model("llama", vocab_size=49152, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # logits spanning about +-25, like SmolLM2's
    rng = random.Random(8)
    ctx = _seq(rng, 20, hi=49152)
    inputs = [ctx + _seq(rng, 30, hi=49152) for _ in range(3)]
    full = forward_tails(model, inputs, [30] * 3, "cpu")
    # the likeliest tokens as continuations: a small sum, whose float32 rounding is a few 1e-6
    targets = {x: [tuple(logp.argmax(-1).tolist())] for x, logp in zip(inputs, full)}
    got = {}
    score_inputs(model, targets, batch_size=8, device="cpu", collect=got.__setitem__)
    for x, logp in zip(inputs, full):
        want = float(logp.gather(-1, torch.tensor(targets[x][0])[:, None]).sum())
        assert -100 < want < 0 and abs(got[x][0] - want) < 3e-5, (got[x][0], want)  # logsumexp: 1e-4


def _task_requests():
    """Real requests: boolq (one-token continuations, passages longer than the tiny model's 256
    positions), piqa, winogrande (one continuation after different contexts), hellaswag,
    arc_easy, and two questions with an identical context but different choices."""
    examples = [ex for task, n in (("boolq", 3), ("piqa", 8), ("winogrande", 6), ("hellaswag", 3), ("arc_easy", 6))
                for ex in load_examples(task, limit=n)]
    piqa = load_examples("piqa", limit=2)
    twin = type(piqa[0])(tuple((piqa[0].requests[0][0], x) for _, x in piqa[1].requests), piqa[1].choices, 0)
    return examples + [twin]


def _summed_close(a, b):
    """Per-token differences (PER_TOKEN each) plus float32 rounding of the sum (2 ulps)."""
    return abs(a - b) <= 1e-5 + 2 * float(np.spacing(np.float32(abs(a))))


@pytest.mark.skipif(not HAVE_DATA, reason="local evaluation data not found")
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_loglikelihoods_shared_prefix_equal_the_full_path_on_task_requests(arch, one_thread):
    examples = _task_requests()
    requests = [r for ex in examples for r in ex.requests]
    tok = toy_tokenizer([c + x for c, x in requests], vocab_size=600)
    model = tiny_model(arch, vocab_size=len(tok))
    assert scoring_path(model) == "shared-prefix"
    longest = max(len(encode_pair(tok, c, x).context) + len(encode_pair(tok, c, x).continuation) for c, x in requests)
    assert longest > 256 + 1  # left truncation to the model length is exercised
    full = loglikelihoods(model, tok, requests, batch_size=8, progress=False, scoring="full")
    shared = loglikelihoods(model, tok, requests, batch_size=8, progress=False, scoring="shared-prefix")
    bad = [(a, b) for a, b in zip(full, shared) if not _summed_close(a, b)]
    assert not bad, bad[:3]
    k, preds = 0, []
    for ex in examples:
        n = len(ex.requests)
        preds.append(((s := score_example(ex, full[k:k + n])).pred, s.pred_norm,
                      (u := score_example(ex, shared[k:k + n])).pred, u.pred_norm))
        k += n
    assert all(p[:2] == p[2:] for p in preds)
    # and against a plain forward of each (truncated) input
    for (c, x), ll in zip(requests[:12] + requests[-12:], shared[:12] + shared[-12:]):
        req = encode_pair(tok, c, x)
        inp, n = model_inputs(req, 256)
        logp = _full_forward(model, inp, n)
        assert _summed_close(float(logp.gather(-1, torch.tensor(req.continuation)[:, None]).sum()), ll)


@pytest.mark.skipif(not HAVE_DATA, reason="local evaluation data not found")
def test_shared_prefix_shares_the_context_of_each_question():
    examples = [ex for task in ("hellaswag", "arc_easy", "winogrande") for ex in load_examples(task, limit=4)]
    requests = [r for ex in examples for r in ex.requests]
    tok = toy_tokenizer([c + x for c, x in requests], vocab_size=600)
    inputs = list(dict.fromkeys(model_inputs(encode_pair(tok, c, x), 256)[0] for c, x in requests))
    groups = plan_groups(inputs, [1] * len(inputs))
    saved = sum((len(g.inputs) - 1) * g.prefix for g in groups)
    assert saved > 0.3 * sum(map(len, inputs))
    assert sum(len(g.inputs) for g in groups if g.prefix > 0) >= len(inputs) - 2


# ---------------------------------------------------------------- fallback and plumbing

def test_models_without_support_take_the_full_path(one_thread):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = toy_tokenizer()
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    assert "gpt2" in unsupported_reason(gpt2)
    assert scoring_path(gpt2, "shared-prefix") == "full"
    requests = [("Question: What do plants need?\nAnswer:", x) for x in (" water", " light and air", " a dog")]
    assert (loglikelihoods(gpt2, tok, requests, progress=False)
            == loglikelihoods(gpt2, tok, requests, progress=False, scoring="full"))
    sliding = tiny_model("mistral", vocab_size=len(tok), sliding_window=8)
    assert "sliding" in unsupported_reason(sliding)
    assert scoring_path(sliding) == "full"
    assert unsupported_reason(tiny_model("opt", vocab_size=len(tok))) is None
    with pytest.raises(ValueError, match="unknown scoring 'fast'"):
        loglikelihoods(gpt2, tok, requests, scoring="fast")


@pytest.mark.skipif(not HAVE_DATA, reason="local evaluation data not found")
def test_evaluate_and_the_eval_command_take_scoring(tmp_path, one_thread):
    from fedprune.cli import main

    tok = toy_tokenizer()
    lm = tiny_model("llama", vocab_size=len(tok))
    shared = evaluate(lm, tok, tasks=["arc_easy"], limit=4, progress=False)
    full = evaluate(lm, tok, tasks=["arc_easy"], limit=4, progress=False, scoring="full")
    assert (shared["settings"]["scoring"], full["settings"]["scoring"]) == ("shared-prefix", "full")
    assert shared["results"] == full["results"]
    model_dir, out = tmp_path / "model", tmp_path / "res.json"
    lm.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    assert main(["eval", "--model", str(model_dir), "--tasks", "arc_easy", "--limit", "4", "--scoring", "full",
                 "--output", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["settings"]["scoring"] == "full" and written["results"] == full["results"]
