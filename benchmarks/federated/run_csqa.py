"""Federated LoRA aggregators on CommonsenseQA: FedIT, HetLoRA, FlexLoRA and FLoRA on SmolLM2-135M,
over seeds, with paired statistics against FedIT.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/federated/run_csqa.py --seeds 0,1,2  # all (resumes)
    .venv/bin/python benchmarks/federated/run_csqa.py --summary-only                              # tables only

The federation of ``configs/federated/csqa/<method>.yaml``: 10 Jetson devices (3 TX2, 4 Xavier NX,
3 AGX Xavier), the 9,741 CommonsenseQA training questions split Dirichlet(0.5) over question-concept
groups, 4 devices per round, LoRA on q/v (rank 8 for FedIT; ranks 4/8/16 by device id for the
heterogeneous-rank methods). ``federation.seed`` = the benchmark seed (partition, sampling, LoRA
initialisation, data order).

Score: the global model's cloze accuracy (``commonsense_qa_cloze``, acc_norm and acc) on the first
``--eval-questions`` validation questions (all 1,221 by default), each question's correctness saved,
and the held-out answer loss on 200 questions, by ``fedprune.federated.evaluation.score_global`` as in
``benchmarks/fedpruner/run_csqa.py``; CPU seconds are the Simulation's own ``totals["cpu_s"]``
(every segment of a resumed run) plus the evaluation's. The base model's row is read from that
benchmark's ``base.json`` when it exists (the same model, questions and scoring).

Files: one result per (method, seed) in results/csqa/<method>_seed<k>.json, written atomically when the
run and its evaluation end (a finished one is skipped, one with other settings refused); run
directories results/csqa/runs/<method>_seed<k>/ checkpoint every round and resume. After every result:
results/csqa/aggregators_csqa.{json,md}: per method the mean, sd and per-seed accuracy, simulated time,
MB moved and CPU seconds; each heterogeneous-rank method against FedIT, the paired 95 % t-interval over
seeds and the paired bootstrap interval over questions.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = HERE / "results" / "csqa"
BASE_RESULT = ROOT / "benchmarks/fedpruner/results/csqa/base.json"

METHODS = ["fedit", "hetlora", "flexlora", "flora"]
REFERENCE = "fedit"
ALL_QUESTIONS = 1221
TASK = "commonsense_qa_cloze"  # scored like benchmarks/fedpruner/run_csqa.py: acc_norm on the cloze task
LOSS_QUESTIONS = 200  # held-out answer loss on the first 200 validation questions, as there
DEFAULTS = {"rounds": 6}  # the configs' own; seed 0 of fedit is then the recovery benchmark's dense + fed LoRA run


def config_file(method: str) -> Path:
    return ROOT / "configs/federated/csqa" / f"{method}.yaml"


def overrides(method: str, seed: int, args) -> list[str]:
    return [f"federation.strategy={method}", f"federation.seed={seed}", f"federation.rounds={args.rounds}",
            f"eval.every={args.rounds}", "eval.loss_examples=0", "eval.rouge_examples=0", "eval.accuracy_examples=0"]


def settings(args) -> dict:
    """What a result must agree with to be reused."""
    return {"rounds": args.rounds, "eval_questions": args.eval_questions}


def result_path(out: Path, method: str, seed: int) -> Path:
    return out / f"{method}_seed{seed}.json"


def existing(path: Path, args) -> dict | None:
    if not path.exists():
        return None
    row = json.loads(path.read_text())
    if row.get("settings") != settings(args):
        raise SystemExit(f"{path} was made with other settings ({row.get('settings')} vs {settings(args)}): "
                         "delete it (and its run directory) to re-run, or run with its settings")
    return row


def run_one(method: str, seed: int, args) -> dict:
    from fedprune import atomic
    from fedprune.federated.config import load_config
    from fedprune.federated.evaluation import score_global
    from fedprune.federated.runtime.simulation import CHECKPOINT, Simulation

    cfg_file = config_file(method)
    over = overrides(method, seed, args)
    cfg = load_config(cfg_file, over)
    run_dir = args.out / "runs" / f"{method}_seed{seed}"
    t0 = time.perf_counter()
    sim = Simulation(cfg, run_dir)
    resume = (run_dir / CHECKPOINT).exists()
    logging.info("[%s seed %d] %s", method, seed, "resuming" if resume else "starting")
    sim.run(resume=resume, initial_metrics={"not_evaluated": True})
    row = {"method": method, "seed": seed, "settings": settings(args), "config": str(cfg_file.relative_to(ROOT)),
           "overrides": over, "ranks": list(cfg.federation.ranks or [cfg.lora.rank])}
    c0, w0 = time.process_time(), time.perf_counter()
    row.update(score_global(sim, TASK, args.eval_questions, LOSS_QUESTIONS))
    row.update(eval_cpu_s=time.process_time() - c0, eval_wall_s=time.perf_counter() - w0)
    ok = [c for c in atomic.read_jsonl(run_dir / "clients.jsonl") if c["status"] == "ok"]
    t = sim.totals
    row.update({"device_rounds": len(ok), "participation": len(ok) / (cfg.federation.rounds * cfg.federation.clients_per_round),
                "sim_time_s": t.get("sim_time_s"), "mb_moved": (t.get("bytes_up", 0) + t.get("bytes_down", 0)) / 1e6,
                "train_cpu_s": t.get("cpu_s"), "cpu_s": (t.get("cpu_s") or 0.0) + row["eval_cpu_s"],
                "process_wall_s": time.perf_counter() - t0})
    atomic.write_json(result_path(args.out, method, seed), row)
    logging.info("[%s seed %d] acc_norm %.4f acc %.4f, cpu %.0f s", method, seed, row["acc_norm"], row["acc"], row["cpu_s"])
    return row


# ---- summary ------------------------------------------------------------------------------------------
def load_results(out: Path) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {}
    for p in sorted(out.glob("*_seed*.json")):
        r = json.loads(p.read_text())
        if r.get("method") in METHODS:
            runs.setdefault(r["method"], {})[int(r["seed"])] = r
    return runs


def summarise(args) -> dict:
    from fedprune import atomic
    from fedprune.federated import stats

    runs = load_results(args.out)
    methods = {}
    for m in METHODS:
        by = runs.get(m)
        if not by:
            continue
        seeds = sorted(by)
        entry = {"seeds": seeds, "ranks": by[seeds[0]].get("ranks")}
        for key in ("acc_norm", "acc", "test_loss", "sim_time_s", "mb_moved", "cpu_s"):
            vals = {s: by[s][key] for s in seeds if by[s].get(key) is not None}
            if len(vals) == len(seeds):
                entry[key] = {**stats.mean_sd(list(vals.values())), "per_seed": {str(s): v for s, v in vals.items()}}
        methods[m] = entry
    res = {"task": "commonsense_qa_cloze (acc_norm; acc beside it)", "settings": settings(args), "methods": methods,
           "base_model": None, "against_fedit": {}}
    if BASE_RESULT.exists():
        b = json.loads(BASE_RESULT.read_text())
        if b.get("questions") == args.eval_questions:
            res["base_model"] = {k: b.get(k) for k in ("acc_norm", "acc", "test_loss", "questions")}
    score = {m: {s: r["acc_norm"] for s, r in by.items()} for m, by in runs.items()}
    correct = {m: {s: r["correct_norm"] for s, r in by.items()} for m, by in runs.items()}
    for m in METHODS:
        if m == REFERENCE or m not in runs or REFERENCE not in runs:
            continue
        if not set(runs[m]) & set(runs[REFERENCE]):
            continue
        c = stats.compare_to_baselines(score, m, [REFERENCE], correct)
        pt, bs = c["paired_t"], c["bootstrap"]
        if pt["low"] is not None and pt["low"] > 0:
            verdict = "above"
        elif pt["high"] is not None and pt["high"] < 0:
            verdict = "below"
        else:
            verdict = "no difference" if pt["low"] is not None else "undecided (one seed)"
        res["against_fedit"][m] = {"seeds": c["seeds"], "margin_points": c["margin_points"],
                                   "paired_t_95ci_points": [pt["low"], pt["high"]],
                                   "bootstrap_95ci_points": [bs["low"], bs["high"]], "verdict": verdict}
    res["shortcuts"] = shortcuts(args)
    atomic.write_json(args.out / "aggregators_csqa.json", res)
    atomic.write_text(args.out / "aggregators_csqa.md", markdown(res))
    return res


def shortcuts(args) -> str:
    return (f"SmolLM2-135M (float32) on CPU, one thread per process, shared 2-core machine (CPU seconds are the "
            f"process's own). 10 devices, Dirichlet(0.5) over question-concept groups, {args.rounds} rounds x 4 sampled "
            "devices, 8 local steps of batch 4 (seq_len 128; questions are ~40 tokens), lr 5e-4, LoRA on q/v, no "
            f"client dropout. Accuracy on the first {args.eval_questions} of the 1,221 validation questions; held-out "
            "answer loss on 200 questions spread over the file. Simulated time: the Jetson cost model at this model's "
            "own size (compute and LoRA bytes of SmolLM2-135M).")


def _f(x, p=1, scale=100):
    return "-" if x is None else f"{scale * x:.{p}f}"


def markdown(res: dict) -> str:
    lines = ["# Federated LoRA aggregators on CommonsenseQA (SmolLM2-135M, several seeds)", "",
             "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/federated/run_csqa.py --seeds 0,1,2`", "",
             f"Accuracy in % on `commonsense_qa_cloze` (acc_norm; acc beside it), the first "
             f"{res['settings']['eval_questions']} validation questions; mean, sample sd and per seed.", "",
             "| method | LoRA ranks | acc_norm mean | sd | per seed | acc mean | held-out answer loss | sim time (s) | MB moved | CPU s per run |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    b = res.get("base_model")
    if b:
        lines.append(f"| base model (no training) | - | {_f(b['acc_norm'])} | - | - | {_f(b['acc'])} | "
                     f"{_f(b.get('test_loss'), 4, 1)} | - | - | - |")
    for m, e in res["methods"].items():
        g = lambda k, p=1, scale=1: _f(e.get(k, {}).get("mean"), p, scale)  # noqa: E731
        per = " / ".join(_f(v) for v in e["acc_norm"]["per_seed"].values())
        lines.append(f"| {m} | {e.get('ranks')} | {_f(e['acc_norm']['mean'])} | {_f(e['acc_norm']['sd'], 2)} | {per} | "
                     f"{_f(e['acc']['mean'])} | {g('test_loss', 4)} | {g('sim_time_s', 0)} | {g('mb_moved', 1)} | "
                     f"{g('cpu_s', 0)} |")
    if res["against_fedit"]:
        lines += ["", "## Against FedIT (paired by seed)", ""]
        for m, c in res["against_fedit"].items():
            t, bs = c["paired_t_95ci_points"], c["bootstrap_95ci_points"]
            tt = "-" if t[0] is None else f"[{t[0]:.2f}, {t[1]:.2f}]"
            lines.append(f"- **{m}** - fedit over seeds {c['seeds']}: {c['margin_points']:+.2f} points, paired 95 % "
                         f"t-interval {tt}, paired bootstrap 95 % over questions [{bs[0]:.2f}, {bs[1]:.2f}]: "
                         f"**{c['verdict']}**.")
    lines += ["", "Shortcuts: " + res["shortcuts"], ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated federation seeds")
    ap.add_argument("--eval-questions", type=int, default=ALL_QUESTIONS,
                    help=f"validation questions scored (the first N; all {ALL_QUESTIONS} by default)")
    ap.add_argument("--rounds", type=int, default=DEFAULTS["rounds"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT, help="results folder (a pilot elsewhere)")
    ap.add_argument("--summary-only", action="store_true", help="only rebuild aggregators_csqa.{json,md}")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not 1 <= args.eval_questions <= ALL_QUESTIONS:
        raise SystemExit(f"--eval-questions must be in 1..{ALL_QUESTIONS}, got {args.eval_questions}")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summary_only:
        summarise(args)
        return
    import torch

    torch.set_num_threads(args.threads)
    for seed in seeds:  # seed-major: every finished seed adds a complete comparison
        for m in [m for m in METHODS if m in methods]:
            if existing(result_path(args.out, m, seed), args) is None:
                run_one(m, seed, args)
                summarise(args)
    summarise(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
