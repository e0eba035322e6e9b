"""Zero-shot multiple-choice accuracy with lm-evaluation-harness conventions.

Each choice is scored by the summed log-likelihood of its continuation; ``acc`` takes the
argmax, ``acc_norm`` the argmax of log-likelihood / ``len(choice)`` in characters (lm-eval
divides by the length of the choice string, without the leading space). Ties go to the
first choice, as with ``numpy.argmax``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..data.choice import ChoiceExample
from ..options import require_int
from .loglik import loglikelihoods


@dataclass(frozen=True)
class ChoiceScore:
    """One example's outcome: per-choice log-likelihoods and both predictions."""

    loglikelihoods: tuple[float, ...]
    pred: int
    pred_norm: int
    label: int


def argmax(values: list[float]) -> int:
    """Index of the first maximum (numpy.argmax semantics)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def score_example(example: ChoiceExample, lls: list[float]) -> ChoiceScore:
    """Predictions for one example from its per-choice log-likelihoods."""
    norm = [ll / float(len(c)) for ll, c in zip(lls, example.choices)]
    return ChoiceScore(tuple(lls), argmax(lls), argmax(norm), example.label)


def accuracy(scores: list[ChoiceScore]) -> dict[str, float]:
    """``{"acc", "acc_norm"}`` over a list of scored examples."""
    if not scores:
        raise ValueError("no examples to score")
    n = len(scores)
    return {"acc": sum(s.pred == s.label for s in scores) / n,
            "acc_norm": sum(s.pred_norm == s.label for s in scores) / n}


def score_examples(model, tokenizer, examples: list[ChoiceExample], batch_size: int = 8,
                   add_bos_token: bool | None = None, progress: bool = True, desc: str = "zero-shot",
                   scoring: str = "shared-prefix") -> list[ChoiceScore]:
    """Score every choice of every example (all requests batched together; ``scoring``: see
    :func:`~fedprune.evaluate.loglik.loglikelihoods`)."""
    requests = [r for ex in examples for r in ex.requests]
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, add_bos_token=add_bos_token,
                         progress=progress, desc=desc, scoring=scoring)
    return score_flat(examples, lls)


def score_flat(examples: list[ChoiceExample], lls: list[float]) -> list[ChoiceScore]:
    """Every example scored from ``lls``, the log-likelihoods of all examples' requests in order (one
    per choice, as :func:`score_examples` or another evaluator such as lm-eval returns them)."""
    if len(lls) != sum(len(ex.requests) for ex in examples):
        raise ValueError(f"{len(lls)} log-likelihoods for {sum(len(ex.requests) for ex in examples)} requests")
    scores, k = [], 0
    for ex in examples:
        scores.append(score_example(ex, lls[k:k + len(ex.requests)]))
        k += len(ex.requests)
    return scores


def zero_shot(model, tokenizer, task: str, limit: int | None = None, batch_size: int = 8,
              data_dir: str | os.PathLike | None = None, add_bos_token: bool | None = None,
              progress: bool = True, scoring: str = "shared-prefix") -> dict[str, float]:
    """``{"acc", "acc_norm"}`` of ``model`` on the first ``limit`` examples of ``task``."""
    d = zero_shot_details(model, tokenizer, task, limit, batch_size, data_dir, add_bos_token, progress, scoring)
    return {"acc": d["acc"], "acc_norm": d["acc_norm"]}


def zero_shot_details(model, tokenizer, task: str, limit: int | None = None, batch_size: int = 8,
                      data_dir: str | os.PathLike | None = None, add_bos_token: bool | None = None,
                      progress: bool = True, scoring: str = "shared-prefix") -> dict:
    """Like :func:`zero_shot`, plus ``examples`` (count) and ``scores`` (one ChoiceScore each)."""
    from ..data import load_examples

    require_int("batch_size", batch_size, 1)
    examples = load_examples(task, data_dir, limit)
    scores = score_examples(model, tokenizer, examples, batch_size, add_bos_token, progress, desc=task, scoring=scoring)
    return {**accuracy(scores), "examples": len(examples), "scores": scores}
