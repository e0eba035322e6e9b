"""Server-side evaluation of a global model on the held-out Dolly records.

- ``test_loss``: mean completion-only cross-entropy over the response tokens (token-weighted),
  and its perplexity;
- ``rouge_l``: F-measure of Rouge-L between greedy answers and the references, on the first
  ``rouge_examples`` records (greedy, ``max_new_tokens`` tokens: kept small for speed).

The model evaluated is ``W0 + base_delta + eval_delta`` with the LoRA adapters disabled, so
every strategy (factored, padded, full-space or merged) is evaluated the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .lora import SharedBaseModel
from .partition import IGNORE_INDEX, collate, format_prompt, tokenize_example


@dataclass
class EvalSettings:
    """Server-side evaluation."""

    every: int = 1
    """evaluate every N rounds (and always after the last round and before the first)"""
    loss_examples: int = 80
    """held-out records for the loss, evenly spread over the file's categories (0 = skip; at most 80)"""
    rouge_examples: int = 8
    """held-out records for Rouge-L of greedy answers, evenly spread (0 = skip)"""
    max_new_tokens: int = 32
    """tokens generated per answer"""
    batch_size: int = 4
    """records per forward pass for the loss"""

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"eval.every must be >= 1, got {self.every}")
        for name, low in (("loss_examples", 0), ("rouge_examples", 0), ("max_new_tokens", 1), ("batch_size", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"eval.{name} must be >= {low}, got {getattr(self, name)}")


def merged_delta(base_delta: Mapping[str, torch.Tensor], eval_delta: Mapping[str, torch.Tensor]) -> dict:
    out = {k: v.clone() for k, v in base_delta.items()}
    for k, v in eval_delta.items():
        out[k] = out[k] + v if k in out else v.clone()
    return out


@torch.no_grad()
def heldout_loss(base: SharedBaseModel, tokenizer, records: Sequence[dict], seq_len: int, batch_size: int) -> dict:
    total, n_tok = 0.0, 0
    exs = [tokenize_example(tokenizer, r, seq_len) for r in records]
    for i in range(0, len(exs), batch_size):
        batch = collate(exs[i:i + batch_size], tokenizer.pad_token_id)
        logits = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        lp = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                               labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(lp)
        n_tok += int((labels != IGNORE_INDEX).sum())
    loss = total / max(n_tok, 1)
    return {"test_loss": loss, "test_ppl": math.exp(min(loss, 50.0)), "test_tokens": n_tok}


@torch.no_grad()
def rouge_l(base: SharedBaseModel, tokenizer, records: Sequence[dict], max_new_tokens: int,
            max_prompt_tokens: int = 384) -> dict:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = []
    for r in records:
        ids = tokenizer(format_prompt(r), add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = ids[:, -max_prompt_tokens:]
        out = base.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        scores.append(scorer.score(r["response"], answer)["rougeL"].fmeasure)
    return {"rouge_l": sum(scores) / len(scores) if scores else float("nan")}


def spread_subset(records: Sequence[dict], n: int) -> list[dict]:
    """``n`` records evenly spaced over ``records`` (the test file is grouped by category, so a
    prefix would cover one or two categories only)."""
    n = min(n, len(records))
    return [records[(i * len(records)) // n] for i in range(n)] if n else []


def evaluate_global(base: SharedBaseModel, tokenizer, records: Sequence[dict], settings: EvalSettings, seq_len: int,
                    base_delta: Mapping[str, torch.Tensor], eval_delta: Mapping[str, torch.Tensor]) -> dict:
    """Evaluate ``W0 + base_delta + eval_delta`` (LoRA off); leaves the base at ``W0 + base_delta``."""
    base.set_base_delta(merged_delta(base_delta, eval_delta))
    base.model.eval()
    out: dict = {}
    try:
        with base.lora_disabled():
            if settings.loss_examples:
                out.update(heldout_loss(base, tokenizer, spread_subset(records, settings.loss_examples), seq_len, settings.batch_size))
            if settings.rouge_examples:
                out.update(rouge_l(base, tokenizer, spread_subset(records, settings.rouge_examples), settings.max_new_tokens))
    finally:
        base.set_base_delta(base_delta)
    return out


def evaluate_global_tasks(base: SharedBaseModel, tokenizer, base_delta: Mapping[str, torch.Tensor],
                          eval_delta: Mapping[str, torch.Tensor], tasks: Sequence[str], limit: int | None = None,
                          seq_len: int = 512, batch_size: int = 8) -> dict:
    """The global model ``W0 + base_delta + eval_delta`` (LoRA off) on evaluation-harness tasks
    (``fedprune.evaluate``: zero-shot tasks such as ``piqa``, perplexity tasks, ``text:PATH``),
    the first ``limit`` examples of each. Returns ``{"average", "results"}`` (the harness's
    zero-shot average and per-task metrics); leaves the base at ``W0 + base_delta``."""
    from ..evaluate.harness import evaluate

    base.set_base_delta(merged_delta(base_delta, eval_delta))
    base.model.eval()
    try:
        with base.lora_disabled(), torch.no_grad():
            out = evaluate(base.model, tokenizer, list(tasks), seq_len=seq_len, limit=limit, batch_size=batch_size,
                           progress=False)
    finally:
        base.set_base_delta(base_delta)
    return {"average": out["average"], "results": dict(out["results"])}
