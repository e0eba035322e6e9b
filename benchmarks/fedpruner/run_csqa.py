"""FedPruner / FedPruner+ against the memory-aware baselines on CommonsenseQA, over seeds, with statistics.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fedpruner/run_csqa.py --seeds 0,1,2  # all (resumes)
    .venv/bin/python benchmarks/fedpruner/run_csqa.py --summary-only              # tables from finished runs

The fleet and setup of ``run.py`` (15 devices, 3 in each of the five memory classes budget-25 ..
budget-100, seq 256, batch 1, LoRA r=8 on all seven projections, the chunked loss), the federation of
``configs/federated/csqa/<method>.yaml`` (fedit_full: ``fedpruner.yaml`` with the strategy swapped):
the 9,741 CommonsenseQA training questions split Dirichlet(0.5) over question-concept groups.

Methods: ``fedpruner``, ``fedpruner_plus``, the memory-aware baselines ``depth_truncation`` and
``fedra``, ``fedit_full`` (full-model LoRA, only the devices that hold it) and ``base`` (no training,
evaluated once: no seed changes it). ``federation.seed`` = the benchmark seed: it draws the data
partition, the client sampling, the LoRA initialisation, the local data order and the per-device
plan draws.

Score: cloze accuracy (``commonsense_qa_cloze``; acc_norm, the task's metric, and acc) of the global
model on the first ``--eval-questions`` validation questions (default all 1,221), with each question's
correctness saved (for the paired bootstrap), and the held-out answer loss on 200 questions spread
over the file; with ``--letter`` also the lettered ``commonsense_qa`` accuracy (lm-eval's format) on the
same questions (off by default: it costs as much CPU as the cloze score, and training on cloze pairs
leaves it near chance).

Files: one result per (method, seed) in results/csqa/<method>_seed<k>.json, written atomically when
that run and its evaluation end (a finished one is skipped; one with other settings is refused);
run directories results/csqa/runs/<method>_seed<k>/ checkpoint every round and resume. After every
result: results/csqa/fedpruner_csqa.{json,md} (means, sds, per-seed scores, paired 95 % t-intervals
over seeds and paired bootstrap intervals over questions against the best memory-aware baseline,
``federation.stats``). CPU time: process CPU seconds per run (training, checkpointed with the run, so
a resumed run adds up; a segment cut short by a kill is not counted) and of its final evaluation.
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
DOLLY_RESULTS = HERE / "results" / "fedpruner.json"  # its measured memory rows: the same fleet and setup

METHODS = ["fedit_full", "depth_truncation", "fedra", "fedpruner", "fedpruner_plus"]
MEMORY_AWARE_BASELINES = ["depth_truncation", "fedra"]
OURS = ["fedpruner", "fedpruner_plus"]
CLASSES = ["budget-25", "budget-40", "budget-55", "budget-75", "budget-100"]
TASK, LETTER_TASK = "commonsense_qa_cloze", "commonsense_qa"
ALL_QUESTIONS = 1221
LOSS_QUESTIONS = 200
# chosen by a pilot: fedit_full (seed 0) moved acc_norm on the first 200 questions from 0.315 to 0.520 after
# 4 rounds and 0.525 after 8 (5 and 10 device-rounds of 32 examples)
DEFAULTS = {"rounds": 8, "local_steps": 8, "grad_accum": 4, "lr": 0.0005}


def config_file(method: str) -> Path:
    name = "fedpruner" if method == "fedit_full" else method
    return ROOT / "configs/federated/csqa" / f"{name}.yaml"


def overrides(method: str, seed: int, args) -> list[str]:
    return [f"federation.strategy={method}", f"federation.seed={seed}", f"federation.rounds={args.rounds}",
            f"train.local_steps={args.local_steps}", f"train.grad_accum={args.grad_accum}", f"train.lr={args.lr}",
            "federation.dropout=false", f"eval.every={args.rounds}", "eval.loss_examples=0",
            "eval.rouge_examples=0", "eval.accuracy_examples=0"]


def settings(args) -> dict:
    """What a result must agree with to be reused."""
    return {"rounds": args.rounds, "local_steps": args.local_steps, "grad_accum": args.grad_accum, "lr": args.lr,
            "eval_questions": args.eval_questions, "letter": args.letter}


def result_path(out: Path, method: str, seed: int | None) -> Path:
    return out / (f"{method}.json" if seed is None else f"{method}_seed{seed}.json")


# ---- evaluation ---------------------------------------------------------------------------------------
def final_eval(sim, args) -> dict:
    """Cloze (and lettered) accuracy with per-question correctness, and the held-out answer loss."""
    from fedprune.federated.evaluation import global_choice_details, score_global

    c0, t0 = time.process_time(), time.perf_counter()
    row = score_global(sim, TASK, args.eval_questions, LOSS_QUESTIONS)
    if args.letter:
        g = sim.global_
        e = global_choice_details(sim.base, sim.tokenizer, g.base_delta, sim.strategy.eval_delta(g), LETTER_TASK,
                                  args.eval_questions, sim.cfg.data.data_dir)
        row.update(letter_acc=e["acc"], letter_correct=e["correct"])
    row.update(eval_cpu_s=time.process_time() - c0, eval_wall_s=time.perf_counter() - t0)
    return row


# ---- one run ------------------------------------------------------------------------------------------
def make_simulation(cfg, run_dir: Path):
    """A Simulation that logs every device's plan (layers, sub-blocks, LoRA parameters, local losses) to
    plans.jsonl (the Simulation itself keeps the process CPU seconds in ``totals["cpu_s"]``)."""
    from fedprune import atomic
    from fedprune.federated.runtime.simulation import Simulation

    class PlanLoggingSimulation(Simulation):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            inner = self.strategy.client_trainer

            def traced(base, task, examples, settings, seed, pad_id, device_state=None):
                res, opt = inner(base, task, examples, settings, seed, pad_id, device_state)
                m = res.metrics
                atomic.append_jsonl(self.run_dir / "plans.jsonl", {
                    "round": task.round, "cid": task.cid, "device": self.fleet[task.cid].name,
                    "layers": sorted({int(k.split(".")[1]) for k in res.lora}),
                    "layers_trained": m.get("layers_trained"), "attn_blocks": m.get("attn_blocks"),
                    "mlp_blocks": m.get("mlp_blocks"), "lora_params": sum(t.numel() for t in res.lora.values()),
                    "train_loss_first": m["train_loss_first"], "train_loss_last": m["train_loss_last"],
                    "train_loss_mean": m["train_loss_mean"], "wall_s": m["wall_s"]})
                return res, opt

            self.strategy.client_trainer = traced

    return PlanLoggingSimulation(cfg, run_dir)


def per_class(run_dir: Path) -> dict:
    """Per device class: device-rounds trained, mean layers / sub-blocks / LoRA parameters held,
    mean local loss (first and last step) over its device-rounds (the last record of a (round, device))."""
    from fedprune import atomic

    p = run_dir / "plans.jsonl"
    recs = {(r["round"], r["cid"]): r for r in atomic.read_jsonl(p)} if p.exists() else {}
    ok = {(c["round"], c["cid"]) for c in atomic.read_jsonl(run_dir / "clients.jsonl") if c["status"] == "ok"}
    out = {}
    for cls in CLASSES:
        rs = [r for k, r in recs.items() if k in ok and r["device"] == cls]
        if not rs:
            out[cls] = {"device_rounds": 0}
            continue
        mean = lambda key: sum(float(r[key]) for r in rs if r.get(key) is not None) / len(rs)  # noqa: E731
        out[cls] = {"device_rounds": len(rs), "layers": mean("layers_trained") if rs[0].get("layers_trained") else
                    sum(len(r["layers"]) for r in rs) / len(rs),
                    "attn_blocks": mean("attn_blocks") if rs[0].get("attn_blocks") is not None else None,
                    "mlp_blocks": mean("mlp_blocks") if rs[0].get("mlp_blocks") is not None else None,
                    "lora_params": mean("lora_params"), "train_loss_first": mean("train_loss_first"),
                    "train_loss_last": mean("train_loss_last"), "train_loss_mean": mean("train_loss_mean")}
    return out


def run_one(method: str, seed: int, args) -> dict:
    from fedprune import atomic
    from fedprune.federated.config import load_config
    from fedprune.federated.runtime.simulation import CHECKPOINT

    cfg_file = config_file(method)
    over = overrides(method, seed, args)
    cfg = load_config(cfg_file, over)
    run_dir = args.out / "runs" / f"{method}_seed{seed}"
    t0 = time.perf_counter()
    sim = make_simulation(cfg, run_dir)
    resume = (run_dir / CHECKPOINT).exists()
    logging.info("[%s seed %d] %s", method, seed, "resuming" if resume else "starting")
    sim.run(resume=resume, initial_metrics={"not_evaluated": True})
    train_cpu = sim.totals.get("cpu_s")
    row = {"method": method, "seed": seed, "settings": settings(args), "config": str(cfg_file.relative_to(ROOT)),
           "overrides": over}
    row.update(final_eval(sim, args))
    clients = [json.loads(x) for x in (run_dir / "clients.jsonl").read_text().splitlines() if x.strip()]
    ok = [c for c in clients if c["status"] == "ok"]
    fed = cfg.federation
    row.update({
        "participation": len(ok) / (fed.rounds * fed.clients_per_round),
        "device_rounds": len(ok), "distinct_devices": len({c["cid"] for c in ok}), "num_devices": cfg.data.num_clients,
        "fallback_rounds": sim.global_.meta.get("fallback_rounds", 0),
        "layer_rounds_trained": sim.global_.meta.get("layer_rounds_trained"),
        "per_class": per_class(run_dir), "class_layers": class_layers(sim.strategy),
        "train_cpu_s": train_cpu, "train_wall_s": sim.totals.get("wall_s"),
        "cpu_s": (train_cpu or 0.0) + row["eval_cpu_s"], "process_wall_s": time.perf_counter() - t0,
        "resumes": sum(1 for x in (run_dir / "resumes.jsonl").read_text().splitlines() if x.strip())
        if (run_dir / "resumes.jsonl").exists() else 0,
    })
    atomic.write_json(result_path(args.out, method, seed), row)
    logging.info("[%s seed %d] acc_norm %.4f acc %.4f%s, cpu %.0f s", method, seed, row["acc_norm"], row["acc"],
                 f" letter {row['letter_acc']:.4f}" if "letter_acc" in row else "", row["cpu_s"])
    return row


def run_base(args) -> dict:
    """The untrained model (its global LoRA has B = 0): the same evaluation, once."""
    from fedprune import atomic
    from fedprune.federated.config import load_config
    from fedprune.federated.runtime.simulation import Simulation

    c0 = time.process_time()
    cfg = load_config(config_file("fedpruner"), overrides("fedpruner", 0, args))
    sim = Simulation(cfg, args.out / "runs" / "_base")  # never run
    row = {"method": "base", "seed": None, "settings": settings(args), **final_eval(sim, args)}
    row["cpu_s"] = time.process_time() - c0
    atomic.write_json(result_path(args.out, "base", None), row)
    logging.info("[base] acc_norm %.4f acc %.4f", row["acc_norm"], row["acc"])
    return row


def existing(path: Path, args) -> dict | None:
    if not path.exists():
        return None
    row = json.loads(path.read_text())
    if row.get("settings") != settings(args):
        raise SystemExit(f"{path} was made with other settings ({row.get('settings')} vs {settings(args)}): "
                         "delete it (and its run directory) to re-run, or run with its settings")
    return row


# ---- summary ------------------------------------------------------------------------------------------
def load_results(out: Path) -> tuple[dict, dict | None]:
    runs: dict[str, dict[int, dict]] = {}
    base = None
    for p in sorted(out.glob("*.json")):
        if p.name.startswith("fedpruner_csqa") or p.name.startswith("plus_"):
            continue
        r = json.loads(p.read_text())
        if r.get("method") == "base":
            base = r
        elif r.get("method"):
            runs.setdefault(r["method"], {})[int(r["seed"])] = r
    return runs, base


def memory_rows() -> dict:
    if not DOLLY_RESULTS.exists():
        return {}
    mem = json.loads(DOLLY_RESULTS.read_text()).get("memory", {})
    full = mem.get("budget-100", {}).get("peak_bytes")
    keep = ("budget_mib", "k", "what", "predicted_mib", "peak_bytes", "loss")
    return {n: {**{k: r.get(k) for k in keep}, "peak_mib": r["peak_bytes"] / 2**20 if r.get("peak_bytes") else None,
                "fraction_of_full": r["peak_bytes"] / full if r.get("peak_bytes") and full else None}
            for n, r in mem.items()}


def class_layers(strategy) -> dict:
    """K per device class as this run's strategy computes it from the declared budgets."""
    from fedprune.federated.devices import DEVICE_PROFILES
    from fedprune.federated.strategies import ClientInfo

    return {c: strategy.layers_for(ClientInfo(0, 1, DEVICE_PROFILES.get(c).memory_bytes)) for c in CLASSES}


def layer_coverage(counts) -> dict:
    """How evenly a method's device-rounds updated the layers: ``counts[i]`` = device-rounds that trained
    layer i (mean over seeds). ``cv`` = sd / mean over layers (0: every layer equally often)."""
    import numpy as np

    c = np.asarray(counts, dtype=float)
    return {"per_layer": [round(float(x), 3) for x in c], "min": float(c.min()), "max": float(c.max()),
            "cv": float(c.std() / c.mean()) if c.mean() > 0 else None}


def summarise(args) -> dict:
    import numpy as np

    from fedprune import atomic
    from fedprune.federated import stats

    runs, base = load_results(args.out)
    methods = {}
    for m in METHODS:
        if m not in runs:
            continue
        by = runs[m]
        seeds = sorted(by)
        entry = {"seeds": seeds}
        for key in ("acc_norm", "acc", "letter_acc", "test_loss"):
            if all(by[s].get(key) is not None for s in seeds):
                vals = {s: by[s][key] for s in seeds}
                entry[key] = {**stats.mean_sd(list(vals.values())), "per_seed": {str(s): v for s, v in vals.items()}}
        entry["participation"] = stats.mean_sd([by[s]["participation"] for s in seeds])["mean"]
        entry["cpu_s"] = {str(s): by[s]["cpu_s"] for s in seeds}
        pc = lambda s, c: by[s].get("per_class", {}).get(c, {})  # noqa: E731
        entry["per_class"] = {c: {k: stats.mean_sd([pc(s, c)[k] for s in seeds])["mean"]
                                  for k in ("device_rounds", "layers", "attn_blocks", "mlp_blocks", "lora_params",
                                            "train_loss_first", "train_loss_last")
                                  if all(pc(s, c).get(k) is not None for s in seeds)}
                              for c in CLASSES}
        cov = [by[s].get("layer_rounds_trained") for s in seeds]
        if all(cov):
            entry["layer_coverage"] = layer_coverage(np.mean(np.array(cov, dtype=float), axis=0))
        methods[m] = entry
    res = {"task": f"{TASK} (acc_norm; also acc) and {LETTER_TASK} (lettered, acc)", "settings": settings(args),
           "methods": methods, "base_model": None, "memory": memory_rows(), "summary": {}}
    if base:
        res["base_model"] = {k: base.get(k) for k in ("acc_norm", "acc", "letter_acc", "test_loss", "questions")}
    ks = [r["class_layers"] for by in runs.values() for r in by.values() if r.get("class_layers")]
    res["class_layers"] = ks[0] if ks and all(k == ks[0] for k in ks) else (ks or None)
    score = lambda m: {s: r["acc_norm"] for s, r in runs.get(m, {}).items()}  # noqa: E731
    correct = {m: {s: r["correct_norm"] for s, r in runs[m].items()} for m in runs}
    summary: dict = {"metric": f"{TASK} acc_norm", "seeds": sorted(set().union(*(runs[m] for m in runs))) if runs else []}
    for ours in OURS:
        if score(ours) and any(score(b) for b in MEMORY_AWARE_BASELINES):
            cmp = stats.compare_to_baselines({m: score(m) for m in runs}, ours, MEMORY_AWARE_BASELINES, correct)
            summary[ours] = cmp
    if score("fedpruner_plus") and score("fedpruner"):
        # the finer variant against the layer-level one: does choosing blocks separately pay?
        summary["fedpruner_plus_vs_fedpruner"] = stats.compare_to_baselines(
            {m: score(m) for m in runs}, "fedpruner_plus", ["fedpruner"], correct)
    if "fedpruner" in summary:
        c = summary["fedpruner"]
        summary.update(seeds=c["seeds"], beats_best_memory_aware_baseline=c["beats_best_memory_aware_baseline"],
                       margin_points=c["margin_points"], best_memory_aware_baseline=c["best_baseline"],
                       margin_95ci_points=[c["paired_t"]["low"], c["paired_t"]["high"]],
                       bootstrap_95ci_points=[c["bootstrap"]["low"], c["bootstrap"]["high"]])
    else:
        summary.update(beats_best_memory_aware_baseline=False, margin_points=None,
                       note=f"not decided: finished methods {sorted(runs)}")
    if base and "fedit_full" in runs:
        fs = sorted(runs["fedit_full"])
        gains = [runs["fedit_full"][s]["acc_norm"] - base["acc_norm"] for s in fs]
        b = np.array([base["correct_norm"]] * len(fs))
        a = np.array([runs["fedit_full"][s]["correct_norm"] for s in fs])
        boot = stats.paired_bootstrap(a, b)
        summary["fedit_full_gain_over_base_points"] = {
            "mean": 100 * stats.mean_sd(gains)["mean"], "per_seed": {str(s): 100 * g for s, g in zip(fs, gains)},
            "bootstrap_95ci": [100 * boot["low"], 100 * boot["high"]]}
    res["summary"] = summary
    res["shortcuts"] = shortcuts(args)
    atomic.write_json(args.out / "fedpruner_csqa.json", res)
    atomic.write_text(args.out / "fedpruner_csqa.md", markdown(res))
    return res


def shortcuts(args) -> str:
    return (f"SmolLM2-135M (float32) on CPU, one thread per process, shared machine (wall times contended; CPU "
            f"seconds are the process's own). 15 devices (3 per memory class), Dirichlet(0.5) over question-concept "
            f"groups, <= 256 training questions per device; {args.rounds} rounds x 5 sampled devices (devices whose "
            f"budget holds nothing for a method are left out of that round), {args.local_steps} local steps x "
            f"{args.grad_accum} accumulated examples of batch 1 (seq_len 256 for the memory budgets; questions are ~40 "
            f"tokens), lr {args.lr}, LoRA r=8 on all seven projections, no client dropout. Accuracy on the first "
            f"{args.eval_questions} of the 1,221 validation questions; held-out answer loss on {LOSS_QUESTIONS} "
            "questions spread over the file. Memory rows are those of the Dolly benchmark (results/fedpruner.json): "
            "the same fleet, budgets and setup (seq 256, batch 1, rank 8 on all seven projections, chunked loss).")


def _f(x, p=1, scale=100):
    return "-" if x is None else f"{scale * x:.{p}f}"


def markdown(res: dict) -> str:
    s = res["summary"]
    lines = ["# FedPruner on CommonsenseQA (SmolLM2-135M, memory-budgeted fleet, several seeds)", "",
             "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fedpruner/run_csqa.py "
             "--seeds 0,1,2`", "",
             f"Accuracy in % on `{TASK}` (acc_norm, the task's metric; acc beside it), the first "
             f"{res['settings']['eval_questions']} validation questions; mean, sample sd and per seed. Lettered "
             f"`{LETTER_TASK}` (lm-eval's format): " + ("scored on the same questions." if res["settings"]["letter"] else
                                                       "not scored (`--letter`)."), "",
             "| method | acc_norm mean | sd | per seed | acc mean | lettered acc | held-out answer loss | device-rounds | CPU s per run |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    b = res.get("base_model")
    if b:
        lines.append(f"| base model (no training) | {_f(b['acc_norm'])} | - | - | {_f(b['acc'])} | "
                     f"{_f(b.get('letter_acc'))} | {_f(b.get('test_loss'), 4, 1)} | - | - |")
    for m, e in res["methods"].items():
        per = " / ".join(_f(v) for v in e["acc_norm"]["per_seed"].values())
        cpu = sum(e["cpu_s"].values()) / len(e["cpu_s"])
        lines.append(f"| {m} | {_f(e['acc_norm']['mean'])} | {_f(e['acc_norm']['sd'], 2)} | {per} | "
                     f"{_f(e['acc']['mean'])} | {_f(e.get('letter_acc', {}).get('mean'))} | "
                     f"{_f(e.get('test_loss', {}).get('mean'), 4, 1)} | {100 * e['participation']:.0f} % | {cpu:.0f} |")
    lines += ["", "## Against the best memory-aware baseline (paired by seed)", ""]
    for ours in OURS:
        c = s.get(ours)
        if not c:
            continue
        pt, bs = c["paired_t"], c.get("bootstrap", {})
        if c["beats_best_memory_aware_baseline"]:
            sig = "significantly above (the t-interval lies above zero)"
        elif pt["high"] is not None and pt["high"] < 0:
            sig = "significantly below over seeds (the t-interval lies below zero)"
        else:
            sig = "no significant difference (the t-interval contains zero)"
        lines.append(f"- **{ours}** vs {c['best_baseline']} (best memory-aware baseline by mean acc_norm over seeds "
                     f"{c['seeds']}): margin **{c['margin_points']:+.2f} points**, paired 95 % t-interval over seeds "
                     f"[{_f(pt['low'], 2, 1)}, {_f(pt['high'], 2, 1)}], paired bootstrap 95 % interval over "
                     f"{bs.get('questions', '-')} questions [{_f(bs.get('low'), 2, 1)}, {_f(bs.get('high'), 2, 1)}]: "
                     f"{sig}.")
    c = s.get("fedpruner_plus_vs_fedpruner")
    if c:
        pt, bs = c["paired_t"], c.get("bootstrap", {})
        lines.append(f"- fedpruner_plus - fedpruner over seeds {c['seeds']}: {c['margin_points']:+.2f} points, paired 95 % "
                     f"t-interval [{_f(pt['low'], 2, 1)}, {_f(pt['high'], 2, 1)}], bootstrap over questions "
                     f"[{_f(bs.get('low'), 2, 1)}, {_f(bs.get('high'), 2, 1)}].")
    g = s.get("fedit_full_gain_over_base_points")
    if g:
        lines.append(f"- fedit_full over the base model: {g['mean']:+.1f} points (per seed "
                     f"{', '.join(f'{v:+.1f}' for v in g['per_seed'].values())}; bootstrap 95 % over questions "
                     f"[{g['bootstrap_95ci'][0]:.1f}, {g['bootstrap_95ci'][1]:.1f}]).")
    cov = {m: e["layer_coverage"] for m, e in res["methods"].items() if e.get("layer_coverage")}
    if cov:
        lines += ["", "## Layer coverage (device-rounds that updated each layer, mean over seeds)", "",
                  "| method | fewest | most | coefficient of variation over layers |", "|---|---:|---:|---:|"]
        lines += [f"| {m} | {c['min']:.1f} | {c['max']:.1f} | {_f(c['cv'], 2, 1)} |" for m, c in cov.items()]
    lines += ["", "## Per device class (mean over seeds of the per-run means)", "",
              "| method | class | device-rounds | layers | attn blocks | FFN blocks | LoRA params | local loss first -> last step |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for m, e in res["methods"].items():
        for c, r in e["per_class"].items():
            if not r.get("device_rounds"):
                continue
            lines.append(f"| {m} | {c} | {r['device_rounds']:.1f} | {r.get('layers', 0):.1f} | "
                         f"{_f(r.get('attn_blocks'), 1, 1)} | {_f(r.get('mlp_blocks'), 1, 1)} | "
                         f"{r.get('lora_params', 0) / 1e3:.0f} k | {r['train_loss_first']:.3f} -> {r['train_loss_last']:.3f} |")
    lines += ["", "## Memory per device class (measured in the Dolly benchmark: same fleet and setup)", "",
              "| class | budget MiB | submodel | predicted MiB | measured peak MiB | / full-model LoRA |",
              "|---|---:|---|---:|---:|---:|"]
    for n, r in res["memory"].items():
        lines.append(f"| {n} | {r['budget_mib']:.0f} | {r['what']} | {_f(r.get('predicted_mib'), 0, 1)} | "
                     f"{_f(r.get('peak_mib'), 0, 1)} | {_f(r.get('fraction_of_full'), 3, 1)} |")
    lines += ["", f"Layers per class as the CommonsenseQA runs compute them: `{res.get('class_layers')}`. The `budget-25+` "
              "row is a representative FedPruner+ plan drawn with uniform statistics (for its memory); the blocks "
              "the runs' devices held are in the per-class table above, and round-1 plans with real statistics in "
              "[plus_blocks.md](plus_blocks.md).", "",
              "## Summary", "", "```json",
              json.dumps({k: v for k, v in s.items() if k not in OURS}, indent=1), "```", "",
              "Shortcuts: " + res["shortcuts"], ""]
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(["base"] + METHODS),
                    help="comma-separated: base and/or " + ", ".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated federation seeds")
    ap.add_argument("--eval-questions", type=int, default=ALL_QUESTIONS,
                    help=f"validation questions scored (the first N; all {ALL_QUESTIONS} by default)")
    ap.add_argument("--rounds", type=int, default=DEFAULTS["rounds"])
    ap.add_argument("--local-steps", type=int, default=DEFAULTS["local_steps"])
    ap.add_argument("--grad-accum", type=int, default=DEFAULTS["grad_accum"])
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--letter", action="store_true", help="also the lettered commonsense_qa score (as costly as the cloze)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT, help="results folder (a pilot elsewhere)")
    ap.add_argument("--summary-only", action="store_true", help="only rebuild fedpruner_csqa.{json,md}")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ["base"] + METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from base, {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not 1 <= args.eval_questions <= ALL_QUESTIONS:
        raise SystemExit(f"--eval-questions must be in 1..{ALL_QUESTIONS}, got {args.eval_questions}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summary_only:
        summarise(args)
        return
    import torch

    torch.set_num_threads(args.threads)
    if "base" in methods and existing(result_path(args.out, "base", None), args) is None:
        run_base(args)
        summarise(args)
    for seed in seeds:  # seed-major: every finished seed adds a complete comparison
        for m in [m for m in METHODS if m in methods]:
            if existing(result_path(args.out, m, seed), args) is None:
                run_one(m, seed, args)
                summarise(args)
    summarise(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
