"""``evaluate``: perplexity and zero-shot tasks in one call, shaped for JSON.

Result::

    {"model": "smollm2-135m",
     "settings": {"tasks": [...], "seq_len": 512, "limit": 100, "batch_size": 8, ...,
                  "counts": {"wikitext2": 40, "piqa": 100}, "seconds": {...}},
     "results": {"wikitext2": {"ppl": 29.1}, "piqa": {"acc": 0.64, "acc_norm": 0.62}, ...},
     "average": 0.48}

``average`` is the mean of the reported metric (evaluation.md: acc for boolq, piqa,
winogrande, arc_easy; acc_norm for hellaswag, arc_challenge, openbookqa) over those of the
seven tasks that were run; ``None`` when none was. ``counts`` are windows for perplexity
tasks and examples for zero-shot tasks. With ``log_samples=True`` the result also holds
``"samples": {"piqa": {"correct": "0110..."}}``: one character per example, in dataset order,
``1`` where the task's reported metric counted it correct (for paired comparisons of two models
on the same examples).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Iterable

from .perplexity import perplexity_details
from .zeroshot import zero_shot_details

DEFAULT_TASKS = ("wikitext2", "ptb", "boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                 "openbookqa")


def parse_tasks(tasks: str | Iterable[str]) -> list[str]:
    """``"wikitext2,piqa"`` or a list -> validated task names (an unknown name raises KeyError)."""
    from ..data import get_dataset, is_text_dataset

    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ValueError("no tasks given")
    for name in names:
        if name.startswith("text:"):
            from ..data.text import text_file

            text_file(name)  # a missing file fails now, not after the model has loaded
        elif not is_text_dataset(name) and get_dataset(name).kind != "choice":
            raise ValueError(f"{name!r} is not an evaluation task (a text corpus or a zero-shot task)")
    return names


def check_eval_args(tasks: list[str], seq_len: int, limit: int | None, batch_size: int, ppl_batch_size: int,
                    config=None, option_names: dict[str, str] | None = None, model: str | None = None) -> None:
    """Refuse settings out of range before any task runs (the CLI calls this with the model's
    config before loading its weights). ``seq_len`` matters only when a perplexity task is
    asked for, and must then fit the model's context; ``option_names`` maps the argument
    names to the ones the user typed (``{"seq_len": "--seq-len"}``)."""
    from ..options import require_int

    opt = {"seq_len": "seq_len", "limit": "limit", "batch_size": "batch_size", "ppl_batch_size": "ppl_batch_size",
           **(option_names or {})}
    if limit is not None:
        require_int(opt["limit"], limit, 1)
    require_int(opt["batch_size"], batch_size, 1)
    require_int(opt["ppl_batch_size"], ppl_batch_size, 1)
    if any(reported_metric(t) == "ppl" for t in tasks):
        require_int(opt["seq_len"], seq_len, 2)
        if config is not None:
            from ..models.loading import check_context

            check_context(config, seq_len, opt["seq_len"], model)


def reported_metric(task: str) -> str:
    """The metric quoted for ``task``: ``ppl`` for corpora, acc or acc_norm for zero-shot tasks."""
    from ..data import get_dataset, is_text_dataset

    return "ppl" if is_text_dataset(task) else get_dataset(task).reported


def correct_string(scores, metric: str) -> str:
    """``"0110..."``: per example, ``1`` where ``metric`` (``acc`` or ``acc_norm``) counts it correct."""
    if metric not in ("acc", "acc_norm"):
        raise ValueError(f"metric must be acc or acc_norm, not {metric!r}")
    return "".join("1" if (s.pred_norm if metric == "acc_norm" else s.pred) == s.label else "0" for s in scores)


def zero_shot_average(results: dict[str, dict[str, float]]) -> float | None:
    """Mean reported metric over the seven headline tasks present in ``results``."""
    from ..data import SEVEN_TASKS, get_dataset

    values = [results[t][get_dataset(t).reported] for t in SEVEN_TASKS if t in results]
    return sum(values) / len(values) if values else None


def model_name(model) -> str:
    return getattr(model, "_fedprune_spec", None) or getattr(model.config, "_name_or_path", "") or type(model).__name__


def evaluate(model, tokenizer, tasks: str | Iterable[str] = DEFAULT_TASKS, seq_len: int = 512,
             limit: int | None = None, batch_size: int = 8, data_dir: str | os.PathLike | None = None,
             ppl_batch_size: int = 1, add_bos_token: bool | None = None, name: str | None = None,
             progress: bool = True, on_result: Callable[[dict], None] | None = None,
             scoring: str = "shared-prefix", log_samples: bool = False) -> dict:
    """Evaluate ``model`` on ``tasks``; returns the dict described in the module docstring.

    limit: first N windows of a perplexity task, first N examples of a zero-shot task.
    batch_size: (context, continuation) requests per forward pass for zero-shot tasks;
    ppl_batch_size: windows per forward pass for perplexity. on_result: called with the
    partial result after each task (for incremental writing). scoring: how zero-shot requests
    are run, ``shared-prefix`` (default) or ``full`` (:func:`~fedprune.evaluate.loglik.loglikelihoods`).
    log_samples: also return each zero-shot example's correctness (module docstring).
    """
    from .loglik import scoring_path

    names = parse_tasks(tasks)
    path = scoring_path(model, scoring)  # an unknown name fails before any task runs
    check_eval_args(names, seq_len, limit, batch_size, ppl_batch_size, getattr(model, "config", None))
    param = next(model.parameters())
    out = {
        "model": name or model_name(model),
        "settings": {"tasks": names, "seq_len": seq_len, "limit": limit, "batch_size": batch_size,
                     "ppl_batch_size": ppl_batch_size, "scoring": path, "dtype": str(param.dtype).replace("torch.", ""),
                     "device": str(param.device), "add_bos_token": add_bos_token,
                     "data_dir": str(_data_root(data_dir)), "counts": {}, "seconds": {}},
        "results": {},
        "average": None,
    }
    for task in names:
        start = time.perf_counter()
        if reported_metric(task) == "ppl":
            try:
                d = perplexity_details(model, tokenizer, task, seq_len, limit, ppl_batch_size, data_dir, progress)
            except ValueError as exc:
                if task in str(exc):
                    raise
                raise ValueError(f"task {task}: {exc}") from exc  # say which text was too short
            out["results"][task], count = {"ppl": d["ppl"]}, d["windows"]
        else:
            d = zero_shot_details(model, tokenizer, task, limit, batch_size, data_dir, add_bos_token, progress, path)
            out["results"][task], count = {"acc": d["acc"], "acc_norm": d["acc_norm"]}, d["examples"]
            if log_samples:
                out.setdefault("samples", {})[task] = {"correct": correct_string(d["scores"], reported_metric(task))}
        out["settings"]["counts"][task] = count
        out["settings"]["seconds"][task] = round(time.perf_counter() - start, 2)
        out["average"] = zero_shot_average(out["results"])
        if on_result is not None:
            on_result(out)
    return out


def _data_root(data_dir):
    from ..data import resolve_root

    return resolve_root(data_dir)
