"""COMP, then federated recovery: prune, fine-tune the pruned model with federated LoRA on the
CommonsenseQA federation, merge, score, export (issue 16, items 3 and 4).

    nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recovery/run.py   # everything (resumes)
    .venv/bin/python benchmarks/recovery/run.py --summary-only                   # tables from finished stages
    .venv/bin/python benchmarks/recovery/run.py --rows dense,comp20 --limit 200 --rounds 2  # a quick look

Pipelines (``--rows``): ``dense`` (no pruning), ``comp20`` / ``comp30`` (COMP at 20 / 30 % of the
parameters) and ``llm_pruner20`` / ``llm_pruner30`` (LLM-Pruner, the best peer pruner). Per pipeline:

1. ``prune``: ``fedprune.pruning.prune`` of SmolLM2-135M with ``--nsamples`` x ``--seq-len`` C4
   calibration tokens drawn with ``--seed``, saved as a pruned checkpoint (``--work``/models/<row>);
2. ``eval``: ``commonsense_qa_cloze`` (acc, acc_norm) and ``commonsense_qa`` (lm-eval's lettered
   format, acc) on the first ``--limit`` validation questions (all 1,221 by default);
3. ``fed``: FedIT on ``configs/federated/csqa/fedit.yaml`` (10 clients, Dirichlet(0.5) over
   question-concept groups, 4 clients a round, 8 local steps of batch 4, LoRA r=8 on q/v) for
   ``--rounds`` rounds with the checkpoint as ``model.name``; the run directory
   (``--work``/runs/<row>) checkpoints every round and resumes;
4. ``eval_fed``: the same scores of the run's merged global model (``fedprune.federated.merged``,
   what ``fedprune eval --lora RUN_DIR`` scores);
5. ``export`` (``comp20`` only): the merged model to GGUF (``--outtype``), its file size;
6. ``zeroshot`` / ``zeroshot_fed`` (``--zeroshot-rows``, last): the seven-task average before and after
   fine-tuning on the first ``--eval-limit`` examples per task.

Every stage writes ``results/<row>.<stage>.json`` atomically when it ends (process CPU seconds, wall
seconds, the 1-minute load average at its start and end); a finished stage is skipped on a rerun,
one made with other settings is refused. After every stage ``results/recovery.{json,md}`` are rebuilt.
Models, run directories and GGUF files stay under ``--work`` (outputs/recovery, not committed).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = HERE / "results"
WORK = ROOT / "outputs" / "recovery"
FED_CONFIG = ROOT / "configs" / "federated" / "csqa" / "fedit.yaml"
CLOZE, LETTER = "commonsense_qa_cloze", "commonsense_qa"
ALL_QUESTIONS = 1221
# row -> (pruning method or None, ratio)
PIPELINES = {"dense": (None, 0.0), "comp20": ("comp", 0.2), "comp30": ("comp", 0.3),
             "llm_pruner20": ("llm_pruner", 0.2), "llm_pruner30": ("llm_pruner", 0.3)}
LABELS = {"dense": "dense", "comp20": "COMP 20 %", "comp30": "COMP 30 %", "llm_pruner20": "LLM-Pruner 20 %",
          "llm_pruner30": "LLM-Pruner 30 %"}
EXPORT_ROW = "comp20"
WITHIN_POINTS = 3.0


# ---- stages -------------------------------------------------------------------------------------
def model_dir(args, row: str) -> Path:
    return args.work / "models" / row


def run_dir(args, row: str) -> Path:
    return args.work / "runs" / row


def base_spec(args, row: str) -> str:
    """What the row fine-tunes and scores before fine-tuning: the model, or its pruned checkpoint."""
    return str(args.model) if PIPELINES[row][0] is None else str(model_dir(args, row))


def fed_overrides(args) -> list[str]:
    """Overrides of the federation config shared by every row (the model is added per row)."""
    return [f"federation.rounds={args.rounds}", f"eval.every={args.rounds}", "eval.accuracy_examples=0",
            *args.set]


def settings(args, row: str, stage: str) -> dict:
    """What a stage's result must agree with to be reused."""
    method, ratio = PIPELINES[row]
    s: dict = {"model": str(args.model)}
    if method:
        s["prune"] = {"method": method, "ratio": ratio, "calibration": {
            "corpus": "c4", "nsamples": args.nsamples, "seq_len": args.seq_len, "seed": args.seed}}
    if stage in ("fed", "eval_fed", "zeroshot_fed", "export"):
        s["federation"] = {"config": str(FED_CONFIG.relative_to(ROOT)), "overrides": fed_overrides(args)}
    if stage in ("eval", "eval_fed"):
        s["limit"] = args.limit
    if stage in ("zeroshot", "zeroshot_fed"):
        s["eval_limit"] = args.eval_limit
    if stage == "export":
        s["outtype"] = args.outtype
    return s


def stage_path(args, row: str, stage: str) -> Path:
    return args.out / f"{row}.{stage}.json"


def run_stage(args, row: str, stage: str, fn) -> dict:
    """The stage's result: the finished one (same settings), else ``fn()`` timed and written atomically."""
    from fedprune import atomic

    path, want = stage_path(args, row, stage), settings(args, row, stage)
    if path.exists():
        rec = json.loads(path.read_text())
        if rec.get("settings") != want:
            raise SystemExit(f"{path} was made with other settings ({rec.get('settings')} vs {want}): delete it "
                             "(and what depends on it) to re-run, or run with its settings")
        logging.info("[%s %s] done before: skipped", row, stage)
        return rec
    logging.info("[%s %s] starting", row, stage)
    load0, c0, t0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
    rec = {"row": row, "stage": stage, "settings": want, **fn()}
    rec.setdefault("cpu_s", time.process_time() - c0)
    rec.update(wall_s=time.perf_counter() - t0, load_avg_1m={"start": load0, "end": os.getloadavg()[0]})
    atomic.write_json(path, rec)
    logging.info("[%s %s] done: cpu %.0f s, wall %.0f s%s", row, stage, rec["cpu_s"], rec["wall_s"],
                 "".join(f", {k} {rec[k]['acc_norm']:.4f}" for k in ("cloze",) if k in rec))
    summarise(args)
    return rec


def num_params(model) -> int:
    from fedprune.adapters import get_adapter

    return get_adapter(model).num_parameters()


def do_prune(args, row: str) -> dict:
    import fedprune
    from fedprune.pruning import prune

    method, ratio = PIPELINES[row]
    out = model_dir(args, row)
    model, tok = fedprune.load_model(args.model), fedprune.load_tokenizer(args.model)
    # the benchmark's own work folder: a checkpoint left by a prune cut short is replaced
    res = prune(model, method, ratio, tokenizer=tok, calibration="c4", nsamples=args.nsamples, seq_len=args.seq_len,
                seed=args.seed, data_dir=args.data_dir, output=out, overwrite=out.exists())
    rep = res.report if isinstance(res.report, dict) else {}
    return {"method": method, "ratio": ratio, "achieved_ratio": res.achieved_ratio, "params_before": res.params_before,
            "params_after": res.params_after, "prune_wall_s": res.wall_time_s,
            "removed_layers": rep.get("removed_layers") or rep.get("pruned_layers")}


def score_csqa(model, tok, args) -> dict:
    """Cloze (acc, acc_norm) and lettered (acc) CommonsenseQA accuracy, with per-question correctness
    (strings of 0/1, for paired intervals) and the first question's per-choice log-likelihoods."""
    import torch

    from fedprune.evaluate.zeroshot import zero_shot_details

    model.eval()
    out: dict = {"params": num_params(model)}
    with torch.no_grad():
        for task, key in ((CLOZE, "cloze"), (LETTER, "letter")):
            d = zero_shot_details(model, tok, task, args.limit, batch_size=16, data_dir=args.data_dir, progress=False)
            sc = d["scores"]
            out[key] = {"task": task, "acc": d["acc"], "acc_norm": d["acc_norm"], "questions": d["examples"],
                        "correct": "".join(str(int(s.pred == s.label)) for s in sc),
                        "correct_norm": "".join(str(int(s.pred_norm == s.label)) for s in sc),
                        "first_loglikelihoods": list(sc[0].loglikelihoods)}
    return out


def do_eval(args, row: str) -> dict:
    import fedprune

    spec = base_spec(args, row)
    return {"model": spec if PIPELINES[row][0] is None else f"<work>/models/{row}",
            **score_csqa(fedprune.load_model(spec), fedprune.load_tokenizer(spec), args)}


def do_fed(args, row: str) -> dict:
    from fedprune.federated.config import load_config
    from fedprune.federated.runtime.simulation import CHECKPOINT, Simulation

    spec = base_spec(args, row)
    over = [f"model.name={spec}", f"model.tokenizer={spec}", *fed_overrides(args)]
    cfg = load_config(FED_CONFIG, over)
    rd = run_dir(args, row)
    sim = Simulation(cfg, rd)
    resume = (rd / CHECKPOINT).exists()
    logging.info("[%s fed] %s", row, "resuming" if resume else "starting")
    sim.run(resume=resume, initial_metrics={"not_evaluated": True})
    last = json.loads((rd / "metrics.jsonl").read_text().strip().splitlines()[-1])
    clients = [json.loads(x) for x in (rd / "clients.jsonl").read_text().splitlines() if x.strip()]
    resumes = rd / "resumes.jsonl"
    rec = {"rounds": sim.round, "device_rounds": sum(c["status"] == "ok" for c in clients),
           "heldout_answer_loss": last.get("test_loss"), "train_wall_s": sim.totals.get("wall_s"),
           "cpu_s": sim.totals.get("cpu_s"),  # every segment of the run, resumes included
           "resumes": sum(1 for x in resumes.read_text().splitlines() if x.strip()) if resumes.exists() else 0,
           "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "target_modules": list(cfg.lora.target_modules)},
           "train": {"local_steps": cfg.train.local_steps, "batch_size": cfg.train.batch_size,
                     "grad_accum": cfg.train.grad_accum, "seq_len": cfg.train.seq_len, "lr": cfg.train.lr},
           "federation": {"clients": cfg.data.num_clients, "clients_per_round": cfg.federation.clients_per_round,
                          "partition": cfg.data.partition, "alpha": cfg.data.alpha, "seed": cfg.federation.seed}}
    del sim
    gc.collect()
    return rec


def do_eval_fed(args, row: str) -> dict:
    from fedprune.federated.merged import load_merged_run

    model, tok, info = load_merged_run(run_dir(args, row))
    return {"model": f"<work>/runs/{row} (merged, round {info['round']})", **score_csqa(model, tok, args)}


def do_zeroshot(args, row: str, fed: bool) -> dict:
    import torch

    import fedprune
    from fedprune.data import SEVEN_TASKS
    from fedprune.evaluate import evaluate

    if fed:
        from fedprune.federated.merged import load_merged_run

        model, tok, _ = load_merged_run(run_dir(args, row))
    else:
        spec = base_spec(args, row)
        model, tok = fedprune.load_model(spec), fedprune.load_tokenizer(spec)
    model.eval()
    with torch.no_grad():
        r = evaluate(model, tok, tasks=list(SEVEN_TASKS), limit=args.eval_limit, batch_size=16,
                     data_dir=args.data_dir, progress=False)
    return {"results": r["results"], "average": r["average"], "counts": r["settings"]["counts"]}


def gguf_path(args, row: str) -> Path:
    return args.work / f"{row}_fed.{args.outtype}.gguf"


def do_export(args, row: str) -> dict:
    from fedprune.deploy import export_gguf
    from fedprune.federated.merged import load_merged_run

    model, tok, info = load_merged_run(run_dir(args, row))
    path = gguf_path(args, row)
    rep = export_gguf(model, path, args.outtype, tokenizer=tok, n_threads=args.threads)
    return {"file": f"<work>/{path.name}", "outtype": args.outtype, "bytes": path.stat().st_size,
            "mib": path.stat().st_size / 2**20, "params": num_params(model), "round": info["round"],
            "report": {k: v for k, v in rep.items() if k != "path"}}


def run_row(args, row: str) -> None:
    if PIPELINES[row][0] is not None:
        run_stage(args, row, "prune", lambda: do_prune(args, row))
    run_stage(args, row, "eval", lambda: do_eval(args, row))
    run_stage(args, row, "fed", lambda: do_fed(args, row))
    run_stage(args, row, "eval_fed", lambda: do_eval_fed(args, row))
    if row == EXPORT_ROW and args.outtype != "none":
        run_stage(args, row, "export", lambda: do_export(args, row))


def run_zeroshot(args, row: str) -> None:
    if PIPELINES[row][0] is not None:  # finished already when the row was in --rows
        run_stage(args, row, "prune", lambda: do_prune(args, row))
    run_stage(args, row, "zeroshot", lambda: do_zeroshot(args, row, fed=False))
    run_stage(args, row, "fed", lambda: do_fed(args, row))
    run_stage(args, row, "zeroshot_fed", lambda: do_zeroshot(args, row, fed=True))


# ---- summary ------------------------------------------------------------------------------------
def load_stages(out: Path) -> dict[str, dict[str, dict]]:
    stages: dict[str, dict[str, dict]] = {}
    for p in sorted(out.glob("*.*.json")):
        r = json.loads(p.read_text())
        if r.get("row") in PIPELINES and r.get("stage"):
            stages.setdefault(r["row"], {})[r["stage"]] = r
    return stages


def table_rows(stages: dict) -> list[dict]:
    """One row per (pipeline, before / after federated LoRA) with a finished score."""
    rows = []
    for row in PIPELINES:
        st = stages.get(row, {})
        for fed, ev, zs, cost in ((False, "eval", "zeroshot", "prune"), (True, "eval_fed", "zeroshot_fed", "fed")):
            e = st.get(ev)
            if e is None:
                continue
            c = st.get(cost)
            rows.append({
                "name": row + ("_fed" if fed else ""), "pipeline": row, "fed_lora": fed,
                "label": LABELS[row] + (" + fed LoRA" if fed else ""), "params": e["params"],
                "cloze_acc_norm": e["cloze"]["acc_norm"], "cloze_acc": e["cloze"]["acc"],
                "letter_acc": e["letter"]["acc"], "questions": e["cloze"]["questions"],
                "seven_task_avg": st[zs]["average"] if zs in st else None,
                "six_task_avg_without_boolq": without_boolq(st[zs]["results"]) if zs in st else None,
                "seven_task": st[zs]["results"] if zs in st else None,
                "cpu_s": {cost: c["cpu_s"] if c else None, "score": e["cpu_s"],
                          **({"zeroshot": st[zs]["cpu_s"]} if zs in st else {})},
                "load_avg_1m": {k: st[k]["load_avg_1m"] for k in (cost, ev, zs) if k in st},
                "achieved_ratio": st["prune"]["achieved_ratio"] if "prune" in st else 0.0})
    return rows


def without_boolq(results: dict) -> float | None:
    """The seven-task average without BoolQ: on 100 questions a small model's BoolQ accuracy swings
    between the majority answer (0.62) and its opposite, which moves the average by ~5 points."""
    from fedprune.evaluate.harness import zero_shot_average

    return zero_shot_average({t: r for t, r in results.items() if t != "boolq"})


def summary(stages: dict, rows: list[dict]) -> dict:
    """Points are 100 x accuracy differences on the cloze acc_norm; the gap has a paired bootstrap
    95 % interval over the questions."""
    import numpy as np

    from fedprune.federated import stats

    by = {r["name"]: r for r in rows}
    s: dict = {"metric": f"{CLOZE} acc_norm, points"}
    d, c = by.get("dense_fed"), by.get("comp20_fed")
    if d and c:
        gap = 100 * (d["cloze_acc_norm"] - c["cloze_acc_norm"])
        s["comp20_fed_gap_to_dense_fed_points"] = gap
        s["within_3_points"] = bool(gap <= WITHIN_POINTS)
        a = [int(x) for x in stages["dense"]["eval_fed"]["cloze"]["correct_norm"]]
        b = [int(x) for x in stages["comp20"]["eval_fed"]["cloze"]["correct_norm"]]
        if len(a) == len(b):
            boot = stats.paired_bootstrap(np.array(a), np.array(b))
            s["comp20_fed_gap_bootstrap_95ci_points"] = [100 * boot["low"], 100 * boot["high"]]
    else:
        s.update(comp20_fed_gap_to_dense_fed_points=None, within_3_points=None,
                 note="not decided: dense + fed LoRA and COMP 20 % + fed LoRA are not both scored yet")
    per = {}
    for row in PIPELINES:
        before, after = by.get(row), by.get(row + "_fed")
        e = {}
        if before and after:
            e["fed_gain_points"] = 100 * (after["cloze_acc_norm"] - before["cloze_acc_norm"])
            if before["seven_task_avg"] is not None and after["seven_task_avg"] is not None:
                e["seven_task_change_points"] = 100 * (after["seven_task_avg"] - before["seven_task_avg"])
                e["six_task_without_boolq_change_points"] = 100 * (after["six_task_avg_without_boolq"]
                                                                    - before["six_task_avg_without_boolq"])
        if row != "dense" and before and by.get("dense"):
            e["pruning_loss_points"] = 100 * (by["dense"]["cloze_acc_norm"] - before["cloze_acc_norm"])
        if row != "dense" and after and by.get("dense_fed"):
            e["gap_to_dense_fed_points"] = 100 * (by["dense_fed"]["cloze_acc_norm"] - after["cloze_acc_norm"])
        if e:
            per[row] = e
    s["per_pipeline"] = per
    ex = stages.get(EXPORT_ROW, {}).get("export")
    if ex:
        s["comp20_fed_gguf"] = {"outtype": ex["outtype"], "bytes": ex["bytes"], "mib": ex["mib"],
                                "bits_per_weight": ex["report"].get("bits_per_weight"),
                                "fallbacks": len(ex["report"].get("fallbacks") or []),
                                "matrices": ex["report"].get("matrices")}
    return s


def meta(args) -> dict:
    return {"model": str(args.model), "calibration": {"corpus": "c4", "nsamples": args.nsamples,
                                                      "seq_len": args.seq_len, "seed": args.seed},
            "federation": {"config": str(FED_CONFIG.relative_to(ROOT)), "strategy": "fedit",
                           "overrides": fed_overrides(args)},
            "rounds": args.rounds, "limit": args.limit, "eval_limit": args.eval_limit, "threads": args.threads, "outtype": args.outtype}


def summarise(args) -> dict:
    from fedprune import atomic

    stages = load_stages(args.out)
    rows = table_rows(stages)
    res = {"task": f"{CLOZE} (acc_norm, acc) and {LETTER} (lettered, acc); seven-task zero-shot average",
           "meta": meta(args), "rows": rows, "summary": summary(stages, rows),
           "stages": {r: sorted(st) for r, st in stages.items()}, "shortcuts": shortcuts(args)}
    atomic.write_json(args.out / "recovery.json", res)
    atomic.write_text(args.out / "recovery.md", markdown(res))
    return res


def shortcuts(args) -> str:
    return (f"SmolLM2-135M (float32) on CPU, {args.threads} thread(s) per process, on a shared 2-core machine (wall "
            f"times contended; CPU seconds are the process's own, the 1-minute load average per stage is in the "
            f"JSON). Calibration: {args.nsamples} x {args.seq_len} C4 tokens, seed {args.seed} (smaller than the "
            f"pruning benchmark's 128 x 512). Federation: FedIT, {args.rounds} rounds x 4 of 10 clients "
            f"(Dirichlet(0.5) over question-concept groups) x 8 local steps of batch 4, seq 128, lr 5e-4, LoRA r=8 "
            f"on q/v, one seed (0). CommonsenseQA scores on the first {args.limit} of {ALL_QUESTIONS} validation "
            f"questions; seven-task average on the first {args.eval_limit} examples per task.")


def _pct(x, p=1):
    return "-" if x is None else f"{100 * x:.{p}f}"


def markdown(res: dict) -> str:
    m, s = res["meta"], res["summary"]
    lines = ["# COMP, then federated recovery (SmolLM2-135M, CommonsenseQA federation)", "",
             "Command: `nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recovery/run.py` "
             f"(this table: `--limit {m['limit']} --eval-limit {m['eval_limit']} "
             f"--rounds {m['rounds']}`)", "",
             f"Accuracy in %: `{CLOZE}` (the question, each answer's text scored; acc_norm is its metric) and "
             f"`{LETTER}` (lm-eval's lettered format), first {m['limit']} validation questions; seven-task "
             f"average (boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa; first "
             f"{m['eval_limit']} examples each) where measured, and the same without BoolQ (whose accuracy on so few "
             "questions swings between the majority answer, 62 %, and its opposite). Fed LoRA: FedIT on "
             f"`{m['federation']['config']}`, then the global LoRA merged (what `fedprune eval --lora RUN_DIR` "
             "scores). CPU s: pruning or federated training + scoring (process CPU seconds).", "",
             "| model | params (M) | removed | cloze acc_norm | cloze acc | lettered acc | seven-task avg | "
             "six-task avg (no BoolQ) | CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        c = r["cpu_s"]
        first = c.get("fed", c.get("prune"))
        cpu = (f"{first:.0f} + " if first is not None else "") + f"{c['score']:.0f}"
        if "zeroshot" in c:
            cpu += f" (+ {c['zeroshot']:.0f} seven-task)"
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.1f} | {_pct(r['achieved_ratio'])} % | "
                     f"{_pct(r['cloze_acc_norm'])} | {_pct(r['cloze_acc'])} | {_pct(r['letter_acc'])} | "
                     f"{_pct(r['seven_task_avg'])} | {_pct(r['six_task_avg_without_boolq'])} | {cpu} |")
    lines += ["", "## Summary", ""]
    gap = s.get("comp20_fed_gap_to_dense_fed_points")
    if gap is not None:
        ci = s.get("comp20_fed_gap_bootstrap_95ci_points")
        lines.append(f"- COMP 20 % + fed LoRA vs dense + fed LoRA on cloze acc_norm: **{gap:.1f} points** behind"
                     + (f" (paired bootstrap 95 % over the questions [{ci[0]:.1f}, {ci[1]:.1f}])" if ci else "")
                     + f": {'within' if s['within_3_points'] else 'not within'} {WITHIN_POINTS:.0f} points.")
    else:
        lines.append(f"- {s.get('note')}")
    for row, e in s.get("per_pipeline", {}).items():
        parts = []
        if "pruning_loss_points" in e:
            parts.append(f"pruning costs {e['pruning_loss_points']:.1f} points")
        if "fed_gain_points" in e:
            parts.append(f"fed LoRA adds {e['fed_gain_points']:+.1f}")
        if "gap_to_dense_fed_points" in e:
            parts.append(f"{e['gap_to_dense_fed_points']:.1f} behind dense + fed LoRA")
        if "seven_task_change_points" in e:
            parts.append(f"seven-task average {e['seven_task_change_points']:+.1f} after fine-tuning "
                         f"({e['six_task_without_boolq_change_points']:+.1f} without BoolQ)")
        lines.append(f"- {LABELS[row]}: " + "; ".join(parts) + ".")
    g = s.get("comp20_fed_gguf")
    if g:
        bits = f", {g['bits_per_weight']:.2f} bits per weight" if g.get("bits_per_weight") else ""
        if g.get("fallbacks"):
            bits += (f" ({g['fallbacks']} of {g['matrices']} weight tensors stored in another type than asked: "
                     "llama.cpp's k-quants need rows of a multiple of 256 values; SmolLM2-135M's are 576 wide or pruned)")
        lines.append(f"- COMP 20 % + fed LoRA merged, exported to GGUF ({g['outtype']}): {g['mib']:.1f} MiB{bits} "
                     f"(`fedprune export --lora RUN_DIR --outtype {g['outtype']}`).")
    lines += ["", "```json", json.dumps({k: v for k, v in s.items() if k != "per_pipeline"}, indent=1), "```", "",
              "Shortcuts: " + res["shortcuts"], ""]
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------
def parse_rows(text: str, flag: str) -> list[str]:
    rows = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in rows if r not in PIPELINES]
    if bad:
        raise SystemExit(f"{flag}: unknown row(s) {bad}; choose from {', '.join(PIPELINES)}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(PIPELINES), help="comma-separated pipelines: " + ", ".join(PIPELINES))
    ap.add_argument("--zeroshot-rows", default="dense,comp20",
                    help="pipelines scored on the seven tasks before and after fine-tuning, after all --rows ('' none)")
    ap.add_argument("--limit", type=int, default=ALL_QUESTIONS, help="CommonsenseQA validation questions scored (first N)")
    ap.add_argument("--eval-limit", type=int, default=100, help="examples per seven-task zero-shot task (first N)")
    ap.add_argument("--rounds", type=int, default=6, help="federated rounds (fedit.yaml's default 6)")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration samples")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample")
    ap.add_argument("--seed", type=int, default=0, help="calibration seed")
    ap.add_argument("--outtype", default="q4_k_m", help="GGUF type of the COMP 20 %% + fed LoRA export ('none': skip)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="further override of the federation config, for every row (e.g. train.local_steps=4)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=OUT, help="results folder")
    ap.add_argument("--work", type=Path, default=WORK, help="models, run directories and GGUF files")
    ap.add_argument("--summary-only", action="store_true", help="only rebuild recovery.{json,md}")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    rows, zs_rows = parse_rows(args.rows, "--rows"), parse_rows(args.zeroshot_rows, "--zeroshot-rows")
    if not 1 <= args.limit <= ALL_QUESTIONS:
        raise SystemExit(f"--limit must be in 1..{ALL_QUESTIONS}, got {args.limit}")
    from fedprune.deploy.gguf_export import OUTTYPES

    if args.outtype != "none" and args.outtype not in OUTTYPES:
        raise SystemExit(f"--outtype {args.outtype!r}: choose from none, {', '.join(OUTTYPES)}")
    for flag, v in (("--eval-limit", args.eval_limit), ("--rounds", args.rounds), ("--nsamples", args.nsamples),
                    ("--seq-len", args.seq_len), ("--threads", args.threads)):
        if v < 1:
            raise SystemExit(f"{flag} must be >= 1, got {v}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summary_only:
        return summarise(args)
    import torch

    torch.set_num_threads(args.threads)
    for row in rows:
        run_row(args, row)
    for row in zs_rows:
        run_zeroshot(args, row)
    return summarise(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
