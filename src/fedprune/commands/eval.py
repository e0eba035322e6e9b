"""``fedprune eval``: perplexity and zero-shot accuracy, printed as a table and written as JSON.

``--output OUT`` is written once, atomically, when every task is done, with ``"complete": true``.
While running, the results so far go to ``OUT.partial`` with ``"complete": false`` (and, if the run
fails, ``"error"``), so a failed run never replaces a previous complete ``OUT`` with a partial one.

``--backend llama.cpp`` evaluates a ``.gguf`` file in llama.cpp itself (perplexity tasks only,
``fedprune.deploy.llamacpp_eval``); the default ``torch`` backend de-quantises a ``.gguf`` file to
float weights and runs PyTorch.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..models.device import DTYPE_CHOICES, device_option
from ..options import int_at_least, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="known name, HF directory, .gguf file or hub id (default smollm2-135m)")
    p.add_argument("--lora", metavar="RUN_DIR", default=None,
                   help="evaluate a federated run's global model: its base model (model.name of RUN_DIR/config.yaml) "
                        "with the run's global LoRA merged (instead of --model)")
    p.add_argument("--tasks", default="wikitext2,ptb,boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa",
                   help="comma-separated: wikitext2, ptb, c4, text:PATH, boolq, piqa, hellaswag, winogrande, "
                        "arc_easy, arc_challenge, openbookqa, siqa, commonsense_qa (lettered, as lm-eval), "
                        "commonsense_qa_cloze (answer texts scored)")
    p.add_argument("--seq-len", type=int_at_least(2), default=512,
                   help="perplexity window length in tokens (2 .. the model's context)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="first N windows of each perplexity task and first N examples of each zero-shot task")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="zero-shot requests per forward pass (shared-prefix scoring packs a question's choices "
                        "into one row; a pass then holds at most the tokens of that many padded requests)")
    p.add_argument("--ppl-batch-size", type=positive_int, default=1, help="perplexity windows per forward pass")
    p.add_argument("--scoring", default="shared-prefix", choices=("shared-prefix", "full"),
                   help="zero-shot scoring: shared-prefix runs the tokens a question's choices share once "
                        "(default; models it does not support use full), full runs every request in full as lm-eval")
    p.add_argument("--data-dir", default=None, help="data directory (default: $FEDPRUNE_DATA or ../shared/data)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    p.add_argument("--device", default="cpu", type=device_option(),
                   help="cpu, cuda, cuda:N or auto (CUDA when available)")
    p.add_argument("--backend", default="torch", choices=["torch", "llama.cpp"],
                   help="torch (default; a .gguf file is de-quantised) or llama.cpp (a .gguf file run by llama.cpp, "
                        "perplexity tasks only; --dtype, --batch-size and --ppl-batch-size do not apply)")
    p.add_argument("--threads", type=positive_int, default=None, help="llama.cpp threads (--backend llama.cpp)")
    p.add_argument("--output", default=None,
                   help="write the results JSON here when every task is done (progress goes to OUTPUT.partial)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")


OPTION_NAMES = {"seq_len": "--seq-len", "limit": "--limit", "batch_size": "--batch-size",
                "ppl_batch_size": "--ppl-batch-size"}


def _check_settings(args, tasks: list[str]) -> None:
    """Ranges of the numeric options, and --seq-len against the context in the model's config
    (read without the weights)."""
    from ..data.catalog import check_data_dir
    from ..evaluate.harness import check_eval_args
    from ..models.loading import load_model_config

    check_data_dir(args.data_dir)
    config = None if args.model == "tiny-llama" else load_model_config(args.model)
    check_eval_args(tasks, args.seq_len, args.limit, args.batch_size, args.ppl_batch_size,
                    config, OPTION_NAMES, str(args.model))


def resolve_model_args(args) -> None:
    """``--lora RUN_DIR`` takes the run's base model (refusing a different ``--model``);
    without it ``--model`` defaults to smollm2-135m."""
    if args.lora:
        from ..federated.runtime.run_state import stored_config

        base = stored_config(Path(args.lora)).model.name
        if args.model is not None and args.model != base:
            raise ValueError(f"--lora {args.lora} was trained on {base!r} (model.name in its config.yaml); "
                             f"drop --model {args.model}")
        args.model = base
    elif args.model is None:
        args.model = "smollm2-135m"


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


def partial_path(output: str | Path) -> Path:
    """Where an evaluation writes its progress: next to ``output``, which only a finished run writes."""
    output = Path(output)
    return output.with_name(output.name + ".partial")


class _ProgressWriter:
    """Writes each task's progress to ``OUTPUT.partial`` (``"complete": false``), the finished result to
    ``OUTPUT`` (``"complete": true``). A failed run never touches ``OUTPUT`` (a previous complete result
    stays), and leaves its partial result with the error for inspection."""

    def __init__(self, output: str | None):
        self.output = Path(output) if output else None
        self.last: dict | None = None

    def progress(self, result: dict) -> None:
        from .. import atomic

        self.last = result
        atomic.write_json(partial_path(self.output), {"complete": False, **result})

    def failed(self, exc: BaseException) -> None:
        from .. import atomic

        if self.output is not None and self.last is not None:
            atomic.write_json(partial_path(self.output),
                              {"complete": False, "error": f"{type(exc).__name__}: {exc}", **self.last})

    def done(self, result: dict) -> None:
        from .. import atomic

        atomic.write_json(self.output, {"complete": True, **result})
        partial_path(self.output).unlink(missing_ok=True)


def _check_llamacpp_args(args, tasks: list[str]) -> None:
    """--backend llama.cpp: a .gguf file on the CPU, perplexity tasks only (zero-shot ones refused by name)."""
    from ..data.catalog import check_data_dir
    from ..deploy.llamacpp import require_llama_cpp
    from ..deploy.llamacpp_eval import check_llamacpp_tasks
    from ..evaluate.harness import check_eval_args

    if args.lora:
        raise ValueError("--lora evaluates a merged PyTorch model; export it (fedprune export --lora RUN_DIR) and "
                         "give the .gguf file with --backend llama.cpp, or drop --backend llama.cpp")
    if args.model is None or not str(args.model).endswith(".gguf"):
        raise ValueError(f"--backend llama.cpp runs a .gguf file; --model {args.model} is not one "
                         "(fedprune export writes one)")
    if str(args.device).lower().startswith("cuda"):
        raise ValueError(f"--device {args.device}: llama.cpp runs on the CPU here; drop --device or use --backend torch")
    check_llamacpp_tasks(tasks)
    require_llama_cpp("--backend llama.cpp")
    check_data_dir(args.data_dir)
    check_eval_args(tasks, args.seq_len, args.limit, args.batch_size, args.ppl_batch_size, None, OPTION_NAMES)


def run(args) -> int:
    from .. import load_model, load_tokenizer
    from ..evaluate import evaluate, parse_tasks
    from ..outputs import check_file_output

    tasks = parse_tasks(args.tasks)  # fail on a typo before loading the model
    if args.backend == "llama.cpp":
        _check_llamacpp_args(args, tasks)
    else:
        resolve_model_args(args)
        _check_settings(args, tasks)  # and on a window longer than the model's context
    if args.output:  # and on an output that cannot or must not be written
        check_file_output(args.output, args.overwrite)
    writer = _ProgressWriter(args.output)
    if args.backend == "llama.cpp":
        from ..deploy.llamacpp_eval import evaluate_gguf

        return _score_and_write(writer, args, lambda on_result: evaluate_gguf(
            args.model, tasks, seq_len=args.seq_len, limit=args.limit, data_dir=args.data_dir,
            n_threads=args.threads, name=str(args.model), on_result=on_result))
    if args.lora:
        from ..federated.merged import load_merged_run

        model, tokenizer, _ = load_merged_run(args.lora, dtype=args.dtype, device=args.device)
    else:
        model = load_model(args.model, dtype=args.dtype, device=args.device)
        tokenizer = load_tokenizer(args.model)
    return _score_and_write(writer, args, lambda on_result: evaluate(
        model, tokenizer, tasks=tasks, seq_len=args.seq_len, limit=args.limit, batch_size=args.batch_size,
        data_dir=args.data_dir, ppl_batch_size=args.ppl_batch_size, scoring=args.scoring,
        name=f"{args.model}+lora:{args.lora}" if args.lora else str(args.model), on_result=on_result))


def _score_and_write(writer, args, score) -> int:
    """Run ``score(on_result)``, recording progress and failure in ``--output``, then print the table."""
    from rich.console import Console

    try:
        result = score(writer.progress if args.output else None)
    except BaseException as exc:
        writer.failed(exc)
        raise
    Console().print(results_table(result))
    if args.output:
        writer.done(result)
    return 0
