"""Dense baseline: fedprune's evaluation next to lm-evaluation-harness's HFLM on the same examples.

For every task both implementations score the same model (loaded once) on the same local
examples, one after the other, and the script records their metrics, how far apart their
per-request log-likelihoods are, and their throughput (wall time, examples/s):

- zero-shot tasks: fedprune builds its requests (``fedprune.data``) and scores them with
  ``fedprune.evaluate.score_examples``; lm-eval builds its own requests from the same records
  with its task YAMLs (``fedprune.evaluate.lm_eval_bridge``), scores them with
  ``HFLM.loglikelihood`` and computes acc / acc_norm with its own ``process_results``;
- perplexity tasks: fedprune's ``perplexity_of_tokens`` against HFLM's
  ``_loglikelihood_tokens`` on the same non-overlapping windows (first token as context,
  the other ``seq_len - 1`` tokens as continuation), ppl = exp(mean token NLL) for both.

Results are written after every task to ``results/baseline.json`` and ``results/baseline.md``.

    python benchmarks/eval/run_baseline.py --limit 100 --ppl-limit 40 --seq-len 512
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from fedprune import atomic, load_model, load_tokenizer  # noqa: E402
from fedprune.data import SEVEN_TASKS, is_text_dataset, load_examples, load_records, load_text  # noqa: E402
from fedprune.evaluate import (accuracy, parse_tasks, perplexity_of_tokens, reported_metric,  # noqa: E402
                               score_examples, score_flat, zero_shot_average)
from fedprune.evaluate.lm_eval_bridge import lm_eval_metrics, lm_eval_requests, lm_eval_task  # noqa: E402
from fedprune.evaluate.perplexity import tokenize_text, windows  # noqa: E402

HERE = Path(__file__).resolve().parent
NINE = "wikitext2,ptb,boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=NINE)
    p.add_argument("--limit", type=int, default=100, help="first N examples of each zero-shot task")
    p.add_argument("--ppl-limit", type=int, default=40, help="first N windows of each perplexity task")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="zero-shot requests per forward pass (both sides)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--resume", action="store_true",
                   help="keep the tasks already in baseline.json and run only the others (each row states its n)")
    return p.parse_args(argv)


def hflm(model, tokenizer, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def perplexity_pair(model, tokenizer, task: str, args) -> dict:
    """fedprune and HFLM perplexity on the same windows, with timings."""
    tokens = tokenize_text(tokenizer, load_text(task, args.data_dir))
    wins = windows(tokens, args.seq_len, args.ppl_limit)  # [n, seq_len]
    ours, t_ours = timed(lambda: perplexity_of_tokens(model, tokens, args.seq_len, args.ppl_limit, batch_size=1,
                                                       desc=f"fedprune {task}"))
    lm = hflm(model, tokenizer, batch_size=1)
    reqs = [(("", ""), w[:1].tolist(), w[1:].tolist()) for w in wins]
    lls, t_lm = timed(lambda: [ll for ll, _ in lm._loglikelihood_tokens(reqs)])
    n_tok = wins.shape[0] * (args.seq_len - 1)
    ppl_lm = math.exp(-sum(lls) / n_tok)
    return {
        "n": wins.shape[0], "unit": "windows",
        "fedprune": {"ppl": ours["ppl"]}, "lm_eval": {"ppl": ppl_lm},
        "agreement": {"ppl_relative_difference": abs(ours["ppl"] - ppl_lm) / ppl_lm},
        "throughput": {"fedprune": _rate(wins.shape[0], t_ours, n_tok), "lm_eval": _rate(wins.shape[0], t_lm, n_tok)},
    }


def zero_shot_pair(model, tokenizer, task: str, args) -> dict:
    """fedprune and HFLM (with lm-eval's own task code) on the same first ``limit`` examples."""
    examples = load_examples(task, args.data_dir, args.limit)
    scores, t_ours = timed(lambda: score_examples(model, tokenizer, examples, args.batch_size, desc=f"fedprune {task}"))
    lm_task = lm_eval_task(task, load_records(task, args.data_dir)[:args.limit])
    per_doc = lm_eval_requests(lm_task)
    flat = [inst for insts in per_doc for inst in insts]
    lm = hflm(model, tokenizer, batch_size=args.batch_size)
    lls, t_lm = timed(lambda: [ll for ll, _ in lm.loglikelihood(flat)])
    ours_lls = [ll for s in scores for ll in s.loglikelihoods]
    same_requests = [inst.arguments for inst in flat] == [r for ex in examples for r in ex.requests]
    lm_preds = [(s.pred, s.pred_norm) for s in score_flat(examples, lls)]
    n_tok = sum(len(tokenizer.encode(c + x)) for c, x in (inst.arguments for inst in flat))
    return {
        "n": len(examples), "unit": "examples",
        "fedprune": accuracy(scores), "lm_eval": lm_eval_metrics(lm_task, per_doc, lls),
        "agreement": {"same_requests": same_requests,
                      "max_abs_loglik_difference": max(abs(a - b) for a, b in zip(ours_lls, lls)),
                      "same_predictions": lm_preds == [(s.pred, s.pred_norm) for s in scores]},
        "throughput": {"fedprune": _rate(len(examples), t_ours, n_tok), "lm_eval": _rate(len(examples), t_lm, n_tok)},
    }


def _rate(n: int, seconds: float, tokens: int) -> dict:
    return {"seconds": round(seconds, 2), "per_s": n / seconds, "tokens_per_s": tokens / seconds,
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"# Dense baseline: {report['model']}",
        "",
        f"`{s['command']}`",
        "",
        f"{s['date']}; {s['machine']}; torch {s['torch']} ({s['threads']} threads), lm-eval {s['lm_eval']}, "
        f"{s['dtype']}. Zero-shot: the first n examples of each task (--limit {s['limit']}), batch {s['batch_size']}. "
        f"Perplexity: the first n non-overlapping windows of {s['seq_len']} tokens (--ppl-limit {s['ppl_limit']}).",
        "",
        "| task | n | metric | fedprune | lm-eval HFLM | agreement | fedprune s | lm-eval s | fedprune /s | lm-eval /s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, r in report["tasks"].items():
        metric = reported_metric(task)
        a = r["agreement"]
        agree = (f"rel. diff {a['ppl_relative_difference']:.1e}" if metric == "ppl" else
                 f"max abs Δll {a['max_abs_loglik_difference']:.1e}, "
                 f"{'same' if a['same_predictions'] else 'DIFFERENT'} predictions")
        fmt = "{:.3f}" if metric == "ppl" else "{:.4f}"
        tf, tl = r["throughput"]["fedprune"], r["throughput"]["lm_eval"]
        lines.append(f"| {task} | {r['n']} {r['unit']} | {metric} | {fmt.format(r['fedprune'][metric])} | "
                     f"{fmt.format(r['lm_eval'][metric])} | {agree} | {tf['seconds']:.1f} | {tl['seconds']:.1f} | "
                     f"{tf['per_s']:.2f} | {tl['per_s']:.2f} |")
    fa, la = report["average"]["fedprune"], report["average"]["lm_eval"]
    if fa is not None:
        lines.append(f"| avg zero-shot ({report['average']['tasks']} tasks) | | reported | {fa:.4f} | {la:.4f} | | | | | |")
    tot = report["wall_seconds"]
    lines += ["", f"Wall time of the scoring: fedprune {tot['fedprune']:.0f} s, lm-eval HFLM {tot['lm_eval']:.0f} s "
              "(/s = examples or windows per second; the machine was shared, see load_avg_1min in baseline.json)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import lm_eval

    tasks = parse_tasks(args.tasks)
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    out_dir = Path(args.out_dir)
    command = "python benchmarks/eval/run_baseline.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "model": args.model,
        "settings": {
            "command": command,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "lm_eval": lm_eval.__version__,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "tasks": tasks,
            "limit": args.limit, "ppl_limit": args.ppl_limit, "seq_len": args.seq_len, "batch_size": args.batch_size,
        },
        "tasks": {},
        "average": {"fedprune": None, "lm_eval": None, "tasks": 0},
        "wall_seconds": {"fedprune": 0.0, "lm_eval": 0.0},
    }
    if args.resume and (out_dir / "baseline.json").is_file():
        previous = json.loads((out_dir / "baseline.json").read_text())
        report["tasks"] = {t: v for t, v in previous["tasks"].items() if t in tasks}
        report["settings"]["command"] = previous["settings"]["command"] + f"; then {command}"
        for key in ("limit", "ppl_limit", "date"):
            before = previous["settings"][key]
            merged = (before if isinstance(before, list) else [before]) + [report["settings"][key]]
            report["settings"][key] = sorted(set(merged))
    for task in tasks:
        if task in report["tasks"]:
            continue
        pair = perplexity_pair if is_text_dataset(task) else zero_shot_pair
        report["tasks"][task] = r = pair(model, tokenizer, task, args)
        report["tasks"] = {t: report["tasks"][t] for t in tasks if t in report["tasks"]}  # task order
        report["wall_seconds"] = {side: sum(v["throughput"][side]["seconds"] for v in report["tasks"].values())
                                  for side in ("fedprune", "lm_eval")}
        zs = {t: v for t, v in report["tasks"].items() if not is_text_dataset(t)}
        report["average"] = {side: zero_shot_average({t: v[side] for t, v in zs.items()})
                             for side in ("fedprune", "lm_eval")}
        report["average"]["tasks"] = sum(1 for t in zs if t in SEVEN_TASKS)
        atomic.write_json(out_dir / "baseline.json", report)
        atomic.write_text(out_dir / "baseline.md", markdown(report))
        print(f"{task}: {r['fedprune']} vs lm-eval {r['lm_eval']} ({r['agreement']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
