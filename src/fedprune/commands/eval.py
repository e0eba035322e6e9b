"""``fedprune eval``: perplexity and zero-shot accuracy, printed as a table and written as JSON."""
from __future__ import annotations

import argparse

from ..options import int_at_least, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="known name, HF directory, .gguf file or hub id")
    p.add_argument("--tasks", default="wikitext2,ptb,boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa",
                   help="comma-separated: wikitext2, ptb, c4, text:PATH, boolq, piqa, hellaswag, winogrande, "
                        "arc_easy, arc_challenge, openbookqa, siqa")
    p.add_argument("--seq-len", type=int_at_least(2), default=512,
                   help="perplexity window length in tokens (2 .. the model's context)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="first N windows of each perplexity task and first N examples of each zero-shot task")
    p.add_argument("--batch-size", type=positive_int, default=8, help="zero-shot requests per forward pass")
    p.add_argument("--ppl-batch-size", type=positive_int, default=1, help="perplexity windows per forward pass")
    p.add_argument("--data-dir", default=None, help="data directory (default: $FEDPRUNE_DATA or ../shared/data)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--output", default=None, help="write the results JSON here (atomically)")


OPTION_NAMES = {"seq_len": "--seq-len", "limit": "--limit", "batch_size": "--batch-size",
                "ppl_batch_size": "--ppl-batch-size"}


def _check_settings(args, tasks: list[str]) -> None:
    """Ranges of the numeric options, and --seq-len against the context in the model's config
    (read without the weights)."""
    from ..evaluate.harness import check_eval_args
    from ..models.loading import load_model_config

    check_eval_args(tasks, args.seq_len, args.limit, args.batch_size, args.ppl_batch_size,
                    load_model_config(args.model), OPTION_NAMES)


def results_table(result: dict):
    """A rich Table of one ``evaluate`` result."""
    from rich.table import Table

    from ..evaluate import reported_metric

    s = result["settings"]
    t = Table(title=f"{result['model']} (seq_len {s['seq_len']}, limit {s['limit']}, {s['dtype']})")
    for col in ("task", "n", "metric", "value", "acc", "acc_norm", "seconds"):
        t.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for task, r in result["results"].items():
        metric = reported_metric(task)
        fmt = (lambda v: f"{v:.3f}") if metric == "ppl" else (lambda v: f"{v:.4f}")
        t.add_row(task, str(s["counts"].get(task, "")), metric, fmt(r[metric]),
                  f"{r['acc']:.4f}" if "acc" in r else "", f"{r['acc_norm']:.4f}" if "acc_norm" in r else "",
                  f"{s['seconds'].get(task, 0):.1f}")
    if result["average"] is not None:
        t.add_row("avg zero-shot", "", "reported", f"{result['average']:.4f}", "", "", "")
    return t


def run(args) -> int:
    from rich.console import Console

    from .. import atomic, load_model, load_tokenizer
    from ..evaluate import evaluate, parse_tasks

    tasks = parse_tasks(args.tasks)  # fail on a typo before loading the model
    _check_settings(args, tasks)  # and on a window longer than the model's context
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(args.model)
    result = evaluate(model, tokenizer, tasks=tasks, seq_len=args.seq_len, limit=args.limit,
                      batch_size=args.batch_size, data_dir=args.data_dir, ppl_batch_size=args.ppl_batch_size,
                      name=str(args.model),
                      on_result=(lambda r: atomic.write_json(args.output, r)) if args.output else None)
    Console().print(results_table(result))
    if args.output:
        atomic.write_json(args.output, result)
    return 0
