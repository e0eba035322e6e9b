"""Zero-shot scoring speed: fedprune's shared-prefix scoring against lm-evaluation-harness's HFLM.

For each of the seven multiple-choice tasks, both implementations score the same first
``--limit`` examples with the same model (loaded once), the same batch size and the same
number of torch threads:

- fedprune: ``fedprune.evaluate.score_examples`` (its own requests from ``fedprune.data``,
  ``--scoring``, default shared-prefix: what ``fedprune eval`` runs);
- lm-eval: lm-eval's own requests from its task YAMLs over the same records
  (``fedprune.evaluate.lm_eval_bridge``), scored with ``HFLM.loglikelihood``.

The runs of a task are alternated (fedprune first on even tasks, lm-eval first on odd ones;
with ``--repeats R`` each side runs R times, still alternating, and its fastest run counts)
and the 1-minute load average is recorded before each run, because the machine may be shared.
Each run records its wall time and the process CPU time. Reported per task and overall (all
examples over all seconds): examples/s of each side, their ratio (fedprune / lm-eval), the
largest per-request log-likelihood difference and whether acc and acc_norm predictions are
the same. ``--with-full`` adds fedprune's ``full`` path (every request in full, as lm-eval)
as a third run per task. Written after every task to ``results/speed.json`` and ``results/speed.md``.

    python benchmarks/eval/run_speed.py --limit 50 --threads 1
"""
from __future__ import annotations

import argparse
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
from fedprune.data import SEVEN_TASKS, load_examples, load_records  # noqa: E402
from fedprune.evaluate import score_examples, score_flat  # noqa: E402
from fedprune.evaluate.lm_eval_bridge import lm_eval_requests, lm_eval_task  # noqa: E402
from fedprune.evaluate.loglik import scoring_path  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=",".join(SEVEN_TASKS))
    p.add_argument("--limit", type=int, default=50, help="first N examples of each task")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (both sides)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    p.add_argument("--scoring", default="shared-prefix", choices=("shared-prefix", "full"))
    p.add_argument("--with-full", action="store_true", help="also time fedprune's full path")
    p.add_argument("--repeats", type=int, default=1, help="runs per side and task (alternated); the fastest counts")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--name", default="speed", help="output file stem")
    return p.parse_args(argv)


def timed(fn) -> tuple[object, dict]:
    """``fn()`` and its timing: wall and process CPU seconds, the 1-minute load average before."""
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
                 "load_avg_1min_before": round(load, 2)}


def predictions(examples, lls) -> list[tuple[int, int]]:
    return [(s.pred, s.pred_norm) for s in score_flat(examples, lls)]


def run_task(task: str, index: int, model, tokenizer, lm, args) -> dict:
    examples = load_examples(task, args.data_dir, args.limit)
    per_doc = lm_eval_requests(lm_eval_task(task, load_records(task, args.data_dir)[:args.limit]))
    flat = [inst for insts in per_doc for inst in insts]

    def fedprune_run(scoring):
        def run():
            scores = score_examples(model, tokenizer, examples, args.batch_size, progress=False, scoring=scoring)
            return [ll for s in scores for ll in s.loglikelihoods]
        return run

    def lm_eval_run():
        return [ll for ll, _ in lm.loglikelihood(flat, disable_tqdm=True)]

    runs = [("fedprune", fedprune_run(args.scoring)), ("lm_eval", lm_eval_run)]
    if index % 2:
        runs.reverse()
    if args.with_full:
        runs.append(("fedprune_full", fedprune_run("full")))
    lls, timing, order = {}, {}, []
    for _ in range(args.repeats):
        for side, fn in runs:
            lls[side], t = timed(fn)
            order.append(side)
            timing.setdefault(side, {"runs": []})["runs"].append(t)
    for side, t in timing.items():
        t.update(min(t["runs"], key=lambda r: r["seconds"]))  # the fastest run counts
        t["per_s"] = len(examples) / t["seconds"]
    preds = {side: predictions(examples, v) for side, v in lls.items()}
    row = {
        "n": len(examples), "requests": len(flat), "order": order,
        "same_requests": [inst.arguments for inst in flat] == [r for ex in examples for r in ex.requests],
        "timing": timing,
        "ratio": timing["lm_eval"]["seconds"] / timing["fedprune"]["seconds"],
        "cpu_ratio": timing["lm_eval"]["cpu_seconds"] / timing["fedprune"]["cpu_seconds"],
        "same_predictions": preds["fedprune"] == preds["lm_eval"],
        "max_abs_loglik_difference": max(abs(a - b) for a, b in zip(lls["fedprune"], lls["lm_eval"])),
    }
    if args.with_full:
        row["full_ratio"] = timing["lm_eval"]["seconds"] / timing["fedprune_full"]["seconds"]
        row["full_same_predictions"] = preds["fedprune_full"] == preds["lm_eval"]
    return row


def overall(tasks: dict) -> dict:
    n = sum(r["n"] for r in tasks.values())
    out = {"n": n}
    for side in ("fedprune", "lm_eval", "fedprune_full"):
        if all(side in r["timing"] for r in tasks.values()):
            secs = sum(r["timing"][side]["seconds"] for r in tasks.values())
            cpu = sum(r["timing"][side]["cpu_seconds"] for r in tasks.values())
            out[side] = {"seconds": secs, "cpu_seconds": cpu, "per_s": n / secs}
    out["ratio"] = out["lm_eval"]["seconds"] / out["fedprune"]["seconds"]
    out["geomean_task_ratio"] = math.prod(r["ratio"] for r in tasks.values()) ** (1 / len(tasks))
    out["cpu_ratio"] = out["lm_eval"]["cpu_seconds"] / out["fedprune"]["cpu_seconds"]
    if "fedprune_full" in out:
        out["full_ratio"] = out["lm_eval"]["seconds"] / out["fedprune_full"]["seconds"]
    out["same_predictions"] = all(r["same_predictions"] for r in tasks.values())
    out["max_abs_loglik_difference"] = max(r["max_abs_loglik_difference"] for r in tasks.values())
    return out


def markdown(report: dict) -> str:
    s = report["settings"]
    full = s["with_full"]
    lines = [
        f"# Zero-shot scoring speed: fedprune ({s['scoring']}) vs lm-eval HFLM, {report['model']}",
        "",
        f"`{s['command']}`",
        "",
        f"{s['date']}; {s['machine']}; torch {s['torch']} ({s['threads']} thread(s)), lm-eval {s['lm_eval']}, "
        f"{s['dtype']}, batch {s['batch_size']}; the first {s['limit']} examples of each task, "
        f"{s['repeats']} run(s) per side and task, alternated (order column), the fastest counts; "
        "load = the 1-minute load average before the counted run (the machine is shared). "
        "ratio = fedprune examples/s / lm-eval examples/s (wall time); CPU ratio = the same with process CPU time.",
        "",
        "| task | n | order | load before (fedprune / lm-eval) | fedprune s | lm-eval s | fedprune ex/s | lm-eval ex/s "
        "| ratio | CPU ratio |" + (" full-path ratio |" if full else "") + " same predictions | max abs Δll |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if full else "") + "---|---|",
    ]
    for task, r in report["tasks"].items():
        tf, tl = r["timing"]["fedprune"], r["timing"]["lm_eval"]
        order = " then ".join("fedprune" if o == "fedprune" else "lm-eval" for o in r["order"][:2])
        lines.append(
            f"| {task} | {r['n']} | {order} | {tf['load_avg_1min_before']:.2f} / {tl['load_avg_1min_before']:.2f} | "
            f"{tf['seconds']:.1f} | {tl['seconds']:.1f} | {tf['per_s']:.2f} | {tl['per_s']:.2f} | "
            f"**{r['ratio']:.2f}** | {r['cpu_ratio']:.2f} |" + (f" {r['full_ratio']:.2f} |" if full else "")
            + f" {'yes' if r['same_predictions'] else 'NO'} | {r['max_abs_loglik_difference']:.1e} |")
    o = report["overall"]
    if o:
        lines.append(
            f"| **all {len(report['tasks'])} tasks** | {o['n']} | | | {o['fedprune']['seconds']:.1f} | "
            f"{o['lm_eval']['seconds']:.1f} | {o['fedprune']['per_s']:.2f} | {o['lm_eval']['per_s']:.2f} | "
            f"**{o['ratio']:.2f}** | {o['cpu_ratio']:.2f} |" + (f" {o['full_ratio']:.2f} |" if full else "")
            + f" {'yes' if o['same_predictions'] else 'NO'} | {o['max_abs_loglik_difference']:.1e} |")
        lines += ["", f"Overall (all examples over all seconds): fedprune {o['fedprune']['per_s']:.2f} examples/s, "
                  f"lm-eval {o['lm_eval']['per_s']:.2f}: **{o['ratio']:.2f}x** (CPU time {o['cpu_ratio']:.2f}x; "
                  f"geometric mean of the task ratios {o['geomean_task_ratio']:.2f}x)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in SEVEN_TASKS]
    if unknown:
        raise SystemExit(f"not one of the seven multiple-choice tasks: {', '.join(unknown)}")
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    command = "python benchmarks/eval/run_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "model": args.model,
        "settings": {
            "command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "lm_eval": lm_eval.__version__,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "tasks": tasks,
            "limit": args.limit, "batch_size": args.batch_size,
            "scoring": scoring_path(model, args.scoring), "with_full": args.with_full, "repeats": args.repeats,
        },
        "tasks": {},
        "overall": {},
    }
    # warm-up (untimed): first calls allocate and initialise
    warm = load_examples("arc_easy", args.data_dir, 2)
    score_examples(model, tokenizer, warm, args.batch_size, progress=False, scoring=args.scoring)
    lm.loglikelihood([i for d in lm_eval_requests(lm_eval_task("arc_easy", load_records("arc_easy", args.data_dir)[:2]))
                      for i in d], disable_tqdm=True)
    out_dir = Path(args.out_dir)
    for index, task in enumerate(tasks):
        report["tasks"][task] = r = run_task(task, index, model, tokenizer, lm, args)
        report["overall"] = overall(report["tasks"])
        atomic.write_json(out_dir / f"{args.name}.json", report)
        atomic.write_text(out_dir / f"{args.name}.md", markdown(report))
        print(f"{task}: ratio {r['ratio']:.2f} (CPU {r['cpu_ratio']:.2f}), same predictions {r['same_predictions']}, "
              f"max |dll| {r['max_abs_loglik_difference']:.1e}, load {r['timing']['fedprune']['load_avg_1min_before']}",
              flush=True)
    o = report["overall"]
    print(f"overall: {o['fedprune']['per_s']:.2f} vs {o['lm_eval']['per_s']:.2f} examples/s, ratio {o['ratio']:.2f} "
          f"(CPU {o['cpu_ratio']:.2f}), same predictions {o['same_predictions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
