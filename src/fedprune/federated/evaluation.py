"""Server-side evaluation of a global model on the held-out records of its dataset.

- ``test_loss``: mean completion-only cross-entropy over the response tokens (token-weighted),
  and its perplexity (Dolly: the 80 held-out records; commonsense_qa: validation questions,
  loss on the right answer's tokens);
- ``rouge_l``: F-measure of Rouge-L between greedy answers and the references, on the first
  ``rouge_examples`` records (greedy, ``max_new_tokens`` tokens: kept small for speed);
- ``acc`` / ``acc_norm`` (``accuracy_examples`` > 0, multiple-choice datasets only): the
  dataset's zero-shot task (commonsense_qa: ``commonsense_qa_cloze``) on its first N examples,
  scored as ``fedprune eval`` scores it; ``acc_task`` and ``acc_examples`` say which.

The model evaluated is ``W0 + base_delta + eval_delta`` with the LoRA adapters disabled, so
every strategy (factored, padded, full-space or merged) is evaluated the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from .lora import SharedBaseModel
from .partition import IGNORE_INDEX, collate, federated_dataset, format_prompt, tokenize_example


@dataclass
class EvalSettings:
    """Server-side evaluation."""

    every: int = 1
    """evaluate every N rounds (and always after the last round and before the first)"""
    loss_examples: int = 80
    """held-out records for the loss, evenly spread over the file (0 = skip; at most all: Dolly 80,
    commonsense_qa 1221)"""
    rouge_examples: int = 8
    """held-out records for Rouge-L of greedy answers, evenly spread (0 = skip)"""
    max_new_tokens: int = 32
    """tokens generated per answer"""
    batch_size: int = 4
    """records per forward pass for the loss"""
    accuracy_examples: int = 0
    """multiple-choice datasets (commonsense_qa): accuracy of the global model on the first N validation
    questions at every evaluation (the commonsense_qa_cloze task; 0 = skip)"""

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"eval.every must be >= 1, got {self.every}")
        for name, low in (("loss_examples", 0), ("rouge_examples", 0), ("max_new_tokens", 1), ("batch_size", 1),
                          ("accuracy_examples", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"eval.{name} must be >= {low}, got {getattr(self, name)}")


def merged_delta(base_delta: Mapping[str, torch.Tensor], eval_delta: Mapping[str, torch.Tensor]) -> dict:
    out = {k: v.clone() for k, v in base_delta.items()}
    for k, v in eval_delta.items():
        out[k] = out[k] + v if k in out else v.clone()
    return out


@torch.no_grad()
def heldout_loss(base: SharedBaseModel, tokenizer, records: Sequence[dict], seq_len: int, batch_size: int,
                 tokenize: Callable[..., dict] = tokenize_example) -> dict:
    total, n_tok = 0.0, 0
    exs = [tokenize(tokenizer, r, seq_len) for r in records]
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
            max_prompt_tokens: int = 384, prompt: Callable[[dict], str] = format_prompt,
            reference: Callable[[dict], str] = lambda r: r["response"]) -> dict:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = []
    for r in records:
        ids = tokenizer(prompt(r), add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = ids[:, -max_prompt_tokens:]
        out = base.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        scores.append(scorer.score(reference(r), answer)["rougeL"].fmeasure)
    return {"rouge_l": sum(scores) / len(scores) if scores else float("nan")}


def spread_subset(records: Sequence[dict], n: int) -> list[dict]:
    """``n`` records evenly spaced over ``records`` (the test file is grouped by category, so a
    prefix would cover one or two categories only)."""
    n = min(n, len(records))
    return [records[(i * len(records)) // n] for i in range(n)] if n else []


def evaluate_global(base: SharedBaseModel, tokenizer, records: Sequence[dict], settings: EvalSettings, seq_len: int,
                    base_delta: Mapping[str, torch.Tensor], eval_delta: Mapping[str, torch.Tensor],
                    dataset: str = "dolly", data_dir: str | None = None) -> dict:
    """Evaluate ``W0 + base_delta + eval_delta`` (LoRA off) on ``records`` of ``dataset`` (a
    ``FEDERATED_DATASETS`` name); leaves the base at ``W0 + base_delta``. ``data_dir`` locates the
    dataset's zero-shot task for ``settings.accuracy_examples``."""
    ds = federated_dataset(dataset)
    base.set_base_delta(merged_delta(base_delta, eval_delta))
    base.model.eval()
    out: dict = {}
    try:
        with base.lora_disabled():
            if settings.loss_examples:
                out.update(heldout_loss(base, tokenizer, spread_subset(records, settings.loss_examples), seq_len,
                                        settings.batch_size, ds.tokenize))
            if settings.rouge_examples:
                out.update(rouge_l(base, tokenizer, spread_subset(records, settings.rouge_examples),
                                   settings.max_new_tokens, prompt=ds.prompt, reference=ds.reference))
            if settings.accuracy_examples:
                if ds.choice_task is None:
                    raise ValueError(f"eval.accuracy_examples: dataset {dataset!r} has no multiple-choice task")
                out.update(choice_accuracy(base.model, tokenizer, ds.choice_task, settings.accuracy_examples,
                                           data_dir, settings.batch_size))
    finally:
        base.set_base_delta(base_delta)
    return out


@torch.no_grad()
def choice_accuracy(model, tokenizer, task: str, limit: int, data_dir: str | None = None,
                    batch_size: int = 8) -> dict:
    """``acc`` / ``acc_norm`` of ``model`` on the first ``limit`` examples of the zero-shot ``task``
    (scored as ``fedprune eval`` scores it), with ``acc_task`` and ``acc_examples``."""
    from ..data import load_examples
    from ..evaluate.zeroshot import accuracy, score_examples

    examples = load_examples(task, data_dir, limit)
    scores = score_examples(model, tokenizer, examples, batch_size=max(batch_size, 8), progress=False, desc=task)
    return {**accuracy(scores), "acc_task": task, "acc_examples": len(examples)}


def global_choice_details(base: SharedBaseModel, tokenizer, base_delta: Mapping[str, torch.Tensor],
                          eval_delta: Mapping[str, torch.Tensor], task: str, limit: int | None,
                          data_dir: str | None = None, batch_size: int = 16) -> dict:
    """The global model ``W0 + base_delta + eval_delta`` (LoRA off) on the first ``limit`` questions of
    the multiple-choice ``task``: ``acc``, ``acc_norm``, ``questions`` and, per question, ``correct`` and
    ``correct_norm`` (0/1, in the task's order: paired comparisons between runs need them). Leaves
    the base at ``W0 + base_delta``."""
    from ..evaluate.zeroshot import zero_shot_details

    base.set_base_delta(merged_delta(base_delta, eval_delta))
    base.model.eval()
    try:
        with base.lora_disabled(), torch.no_grad():
            d = zero_shot_details(base.model, tokenizer, task, limit, batch_size=batch_size, data_dir=data_dir,
                                  progress=False)
    finally:
        base.set_base_delta(base_delta)
    return {"acc": d["acc"], "acc_norm": d["acc_norm"], "questions": d["examples"],
            "correct": [int(x.pred == x.label) for x in d["scores"]],
            "correct_norm": [int(x.pred_norm == x.label) for x in d["scores"]]}


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


def score_global(sim, task: str, questions: int | None, loss_examples: int) -> dict:
    """A simulation's global model (``sim``: :class:`~fedprune.federated.runtime.simulation.Simulation`):
    ``test_loss`` over its first ``loss_examples`` held-out records and, from
    :func:`global_choice_details`, ``task``'s accuracy with per-question correctness on its first
    ``questions``."""
    g = sim.global_
    out = evaluate_global(sim.base, sim.tokenizer, sim.test_records, EvalSettings(loss_examples=loss_examples,
                          rouge_examples=0, batch_size=8), sim.cfg.train.seq_len, g.base_delta,
                          sim.strategy.eval_delta(g), sim.cfg.data.dataset, sim.cfg.data.data_dir)
    return {"test_loss": out["test_loss"], "test_loss_questions": loss_examples,
            **global_choice_details(sim.base, sim.tokenizer, g.base_delta, sim.strategy.eval_delta(g), task,
                                    questions, sim.cfg.data.data_dir)}
