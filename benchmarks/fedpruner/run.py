"""FedPruner / FedPruner+ against memory-aware baselines on SmolLM2-135M, Dolly Dirichlet split.

    MALLOC_MMAP_THRESHOLD_=65536 .venv/bin/python benchmarks/fedpruner/run.py          # everything
    .venv/bin/python benchmarks/fedpruner/run.py --only memory fedpruner                # some parts

Fleet: 15 devices in five memory classes (``budget-25`` .. ``budget-100``: 25 %, 40 %, 55 %,
75 %, 100 % of full-model LoRA training memory as predicted by ``fedpruner.memory`` at the
benchmark's setup: seq 256, batch 1, LoRA r=8 on all seven projections, AdamW, float32, the
chunked loss of local training, ``train.chunked_loss``).

Per method (one federated run each, the same seeded client sampling): final held-out loss and
Rouge-L (``federated.evaluation``), zero-shot average over the seven headline tasks at a small
``--zs-limit``, participation. Per device class: measured peak memory of a few real training
steps of that class's submodel in a fresh subprocess (weights of the layers it does not hold
are dropped first), ``MALLOC_MMAP_THRESHOLD_=65536`` as in ``validate_memory_model.py``, with
the same loss as the federated runs (the chunked loss; full-model training, the denominator of
every fraction, included); one extra row measures full-model training with the full-logits loss.
A class is measured again when its submodel or loss changed (``--only memory``).

Results go to benchmarks/fedpruner/results/{fedpruner.json,fedpruner.md,accuracy.png,memory.png}
after every part; run directories live under results/runs/<method> and resume from their
checkpoints, finished parts are skipped.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = HERE / "results"
RESULTS = OUT / "fedpruner.json"

METHODS = ["fedpruner", "depth_truncation", "fedra", "fedpruner_plus", "fedit_full", "hetlora_full"]
# 2 CPU cores shared by ~7 jobs (load average 18): the base model is evaluated once, each run once at its end
MEMORY_AWARE_BASELINES = ["depth_truncation", "fedra"]  # use every device the budget allows
ZS_TASKS = ["boolq", "piqa", "winogrande", "arc_easy"]  # 4 of the 7 headline tasks (short contexts: CPU time)
CLASSES = ["budget-25", "budget-40", "budget-55", "budget-75", "budget-100"]
COMMON = ["data.num_clients=15", "data.max_examples_per_client=48", "train.local_steps=4", "train.grad_accum=1",
          "train.seq_len=256", "train.lr=0.001", "federation.rounds=8", "federation.clients_per_round=5",
          "federation.dropout=false", "eval.every=8", "eval.loss_examples=0", "eval.rouge_examples=0"]
# evaluated once after the last round (and once for the base model), not inside every run
FINAL_EVAL = {"loss_examples": 48, "rouge_examples": 4, "max_new_tokens": 16}
EXTRA = {"hetlora_full": ["federation.ranks=[4,8]"]}
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
FULL_LOGITS_ROW = "budget-100 full-logits"  # reference row: full-model training with the full-logits loss


# The accuracy rows of the committed results were produced before the chunked loss: local
# training with Hugging Face's full-logits loss, and class budgets that were fractions of
# full-logits full-model training (budget-25 .. budget-100: 310 / 496 / 681 / 928 / 1237 MiB,
# holding 0 / 5 / 11 / 19 / 30 layers). Rows without a "loss" field are those.
EARLIER_ACCURACY = (
    "The accuracy rows ({names}) come from the earlier run and were not re-run: local training then used "
    "the full-logits loss and the classes' earlier budgets (fractions of full-logits full-model training: "
    "310 / 496 / 681 / 928 / 1237 MiB holding 0 / 5 / 11 / 19 / 30 layers, so budget-25 devices sat out). "
    "The memory part was re-measured after local training switched to the chunked loss (LM head in "
    "checkpointed 64-token chunks of supervised tokens, never the full tokens x vocabulary logits): "
    "budgets are now fractions of chunked-loss full-model training, whose measured peak is the denominator.")


MEASUREMENT_CHANGE = (
    "Measured before the device held only its own LoRA (the simulator's task copy of every layer's LoRA and the "
    "dropped layers' LoRA still allocated) and before the memory model's LoRA-dropout term was corrected "
    "(PyTorch's CPU dropout saves a float mask, and the un-dropped inputs are then not saved), budget-25 "
    "(3 layers, 272 MiB budget) peaked at 289 MiB = 0.253 of 1142 MiB.")


def memory_note(res: dict) -> str:
    """How measured peaks compare with the model's prediction and the budgets (from the rows)."""
    rows = {n: r for n, r in res.get("memory", {}).items() if r.get("peak_bytes") and r.get("predicted_mib")}
    if not rows:
        return ""
    gaps = [r["peak_bytes"] / 2**20 - r["predicted_mib"] for r in rows.values()]
    over = [n for n, r in rows.items() if n != FULL_LOGITS_ROW and r["peak_bytes"] / 2**20 > r["budget_mib"]]
    return (f" Measured peaks exceed the memory model's prediction by {min(gaps):.0f}-{max(gaps):.0f} MiB (memory the "
            "model loading leaves besides the weights; the model's fixed term is fitted above the post-load RSS by "
            "validate_memory_model.py)" + (f", so {', '.join(over)} exceed their budgets by up to "
                                           f"{max(rows[n]['peak_bytes'] / 2**20 / rows[n]['budget_mib'] - 1 for n in over):.1%}"
                                           if over else "") + ". " + MEASUREMENT_CHANGE)


def shortcuts(args, res: dict | None = None) -> str:
    old = [n for n, r in (res or {}).get("methods", {}).items() if "loss" not in r]
    note = (" " + EARLIER_ACCURACY.format(names=", ".join(old))) if old else ""
    note += memory_note(res or {})
    return (
        "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to float32), one thread on a 2-core CPU shared with one or two other "
        "benchmark processes (wall times are contended); "
        "15 devices (3 per memory class), Dirichlet(0.5) over Dolly categories, <= 48 records per device; "
        "8 rounds x 5 sampled devices (devices whose budget holds nothing are left out of that round), 4 local "
        "steps of 1 example (<= 256 tokens), lr 1e-3, LoRA r=8 (HetLoRA: r=4/8 by budget) on all seven projections; "
        "no client dropout; one seed; FedPruner statistics on 128 tokens of 2 local examples per device and round, temperature 0.5. "
        f"Held-out loss on {FINAL_EVAL['loss_examples']} of the 80 test records (spread over categories), Rouge-L on "
        f"{FINAL_EVAL['rouge_examples']} records x {FINAL_EVAL['max_new_tokens']} greedy tokens (far too few to rank methods); "
        f"zero-shot average over {len(ZS_TASKS)} tasks at --limit {args.zs_limit} examples each (standard error "
        f"~{100 * (0.25 / args.zs_limit) ** 0.5:.0f} points per task: differences below that are noise). "
        "Peak memory: one subprocess per class, 3 training steps on 256 random tokens, RSS high-water mark above the "
        "process's RSS before the model was loaded (after a load-and-free that imports the loader's libraries), MALLOC_MMAP_THRESHOLD_=65536; "
        "the device holds only its layers' LoRA (dropped layers' LoRA freed; the task carries the adapter's own "
        "tensors, not a copy of every layer's) and trains with the chunked loss (full-model training included)." + note)


# ---- results file ---------------------------------------------------------------------------------
def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"methods": {}, "memory": {}}


def save(res: dict, args, replace_memory: bool = False) -> None:
    """Merge with what is on disk (parts may run in parallel processes) and write everything.
    ``replace_memory``: this process's memory rows are the whole memory section (stale rows go)."""
    import fcntl

    from fedprune import atomic

    with open(OUT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        disk = load()
        res["methods"] = {**disk.get("methods", {}), **res.get("methods", {})}
        for f in sorted((OUT / "runs").glob("*/result.json")):
            res["methods"].setdefault(f.parent.name, json.loads(f.read_text()))
        if not replace_memory:
            res["memory"] = {**disk.get("memory", {}), **res.get("memory", {})}
        if "base_model" in disk and "base_model" not in res:
            res["base_model"] = disk["base_model"]
        _write(res, args)


def _write(res: dict, args) -> None:
    from fedprune import atomic

    res["shortcuts"] = shortcuts(args, res)
    res["summary"] = summary(res)
    atomic.write_json(RESULTS, res)
    atomic.write_text(OUT / "fedpruner.md", markdown(res))
    plots(res)


def summary(res: dict) -> dict:
    out: dict = {}
    mem = res.get("memory", {})
    full = mem.get("budget-100", {}).get("peak_bytes")
    trained = [c for c in CLASSES if mem.get(c, {}).get("peak_bytes")]
    if full and trained:
        smallest = trained[0]
        out["smallest_budget_peak_memory_fraction"] = mem[smallest]["peak_bytes"] / full
        out["smallest_budget_class"] = smallest
        if smallest == CLASSES[0]:
            out["smallest_budget_class_note"] = (
                f"{smallest}, the smallest class, trains {mem[smallest]['what']} (budget "
                f"{mem[smallest]['budget_mib']:.0f} MiB, measured peak {mem[smallest]['peak_bytes'] / 2**20:.0f} MiB "
                f"vs {full / 2**20:.0f} MiB for full-model LoRA training, both with the chunked loss)")
        else:
            first = mem.get(CLASSES[0], {})
            out["smallest_budget_class_note"] = (
                f"{smallest} is the smallest class that can train at all; {CLASSES[0]} holds no layer: embeddings + "
                f"LM head + loss alone are {first.get('fixed_mib', float('nan')):.0f} MiB of its "
                f"{first.get('budget_mib', float('nan')):.0f} MiB budget")
        if mem.get(smallest + "+", {}).get("peak_bytes"):
            out["smallest_budget_peak_memory_fraction_plus"] = mem[smallest + "+"]["peak_bytes"] / full
    m = res.get("methods", {})
    ours = {k: m[k] for k in ("fedpruner", "fedpruner_plus") if k in m}
    base = {k: m[k] for k in MEMORY_AWARE_BASELINES if k in m}
    if not (ours and base):
        out["beats_best_memory_aware_baseline"] = {
            "value": None, "note": f"not decided: finished methods {sorted(m)}; needs FedPruner(+) and at least one "
                                   f"of {MEMORY_AWARE_BASELINES} (the runs did not finish in the time budget)"}
    if ours and base:
        def best(d, key, lower):
            items = [(v[key], k) for k, v in d.items() if v.get(key) is not None]
            return (min if lower else max)(items) if items else (None, None)

        ol, on = best(ours, "final_test_loss", True)
        bl, bn = best(base, "final_test_loss", True)
        oz, ozn = best(ours, "zs_average", False)
        bz, bzn = best(base, "zs_average", False)
        loss_win = ol is not None and bl is not None and ol < bl
        zs_win = oz is not None and bz is not None and oz > bz
        out["beats_best_memory_aware_baseline"] = {
            "value": bool(loss_win or zs_win),
            "held_out_loss": {"ours": ol, "ours_method": on, "best_baseline": bl, "baseline_method": bn,
                              "margin": None if ol is None or bl is None else bl - ol},
            "zero_shot_average": {"ours": oz, "ours_method": ozn, "best_baseline": bz, "baseline_method": bzn,
                                  "margin": None if oz is None or bz is None else oz - bz},
            "baselines_considered": sorted(base),
            "note": "memory-aware = baselines that train every device its budget allows (depth truncation, FedRA); "
                    "FedIT/HetLoRA on the full model leave the smaller devices out",
        }
    return out


def markdown(res: dict) -> str:
    lines = ["# FedPruner benchmark (SmolLM2-135M, Dolly Dirichlet, memory-budgeted fleet)", "",
             "Command: `MALLOC_MMAP_THRESHOLD_=65536 .venv/bin/python benchmarks/fedpruner/run.py`", "",
             "## Accuracy per method", "",
             "| method | final held-out loss | Rouge-L | zero-shot avg | participation (device-rounds) | distinct devices | layers trained per device-round | wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    b = res.get("base_model")
    if b:
        lines.append(f"| base model (no training) | {b['final_test_loss']:.4f} | {b['final_rouge_l']:.3f} | "
                     f"{100 * b['zs_average']:.1f} | - | - | - | - |")
    for name, r in res.get("methods", {}).items():
        zs = r.get("zs_average")
        lines.append(f"| {name} | {r['final_test_loss']:.4f} | {r['final_rouge_l']:.3f} | "
                     f"{'-' if zs is None else f'{100 * zs:.1f}'} | {100 * r['participation']:.0f} % | "
                     f"{r['distinct_devices']}/{r['num_devices']} | {r['mean_layers']:.1f} | {r['wall_s']:.0f} |")
    lines += ["", "## Peak memory per device class (measured)", "",
              "Every row trains with the loss in its `loss` field (JSON); '/ full-model LoRA' divides by the measured "
              "peak of `budget-100` (full-model LoRA training, same loss). "
              f"`{FULL_LOGITS_ROW}` is a reference row, not a class: full-model training with the full-logits loss.", "",
              "| class | budget MiB | submodel | predicted MiB | measured peak MiB | / full-model LoRA |",
              "|---|---:|---|---:|---:|---:|"]
    mem = res.get("memory", {})
    full = mem.get("budget-100", {}).get("peak_bytes")
    for name, r in mem.items():
        if r.get("peak_bytes"):
            frac = f"{r['peak_bytes'] / full:.3f}" if full else "-"
            lines.append(f"| {name} | {r['budget_mib']:.0f} | {r['what']} | {r['predicted_mib']:.0f} | "
                         f"{r['peak_bytes'] / 2**20:.0f} | {frac} |")
        else:
            lines.append(f"| {name} | {r['budget_mib']:.0f} | {r['what']} | - | - | - |")
    lines += ["", "## Summary", "", "```json", json.dumps(res.get("summary", {}), indent=1), "```", "",
              "Shortcuts: " + res.get("shortcuts", ""), "", "![accuracy](accuracy.png) ![memory](memory.png)", ""]
    return "\n".join(lines)


def plots(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = res.get("methods", {})
    if m:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        names = list(m)
        axes[0].bar(names, [m[n]["final_test_loss"] for n in names], color="tab:blue")
        axes[0].set_ylabel("final held-out loss (lower is better)")
        lo = min(m[n]["final_test_loss"] for n in names)
        axes[0].set_ylim(lo - 0.05, max(m[n]["final_test_loss"] for n in names) + 0.02)
        zs = [100 * (m[n].get("zs_average") or 0) for n in names]
        axes[1].bar(names, zs, color="tab:green")
        axes[1].set_ylabel("zero-shot average (%)")
        for ax in axes:
            ax.tick_params(axis="x", rotation=30)
            ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(OUT / "accuracy.png", dpi=110)
        plt.close(fig)
    mem = {k: v for k, v in res.get("memory", {}).items() if v.get("peak_bytes")}
    if mem:
        fig, ax = plt.subplots(figsize=(7, 3.8))
        names = list(mem)
        ax.bar(names, [mem[n]["peak_bytes"] / 2**20 for n in names], color="tab:orange", label="measured peak")
        ax.plot(names, [mem[n]["budget_mib"] for n in names], "k_", markersize=30, label="budget")
        ax.set_ylabel("MiB")
        ax.legend()
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(OUT / "memory.png", dpi=110)
        plt.close(fig)


# ---- measured peak memory per device class ----------------------------------------------------------
def memory_worker(spec: dict) -> dict:
    """A device of one class: hold only its submodel's weights, take a few real training steps."""
    import torch

    from fedprune import load_model
    from fedprune.memory_usage import current_rss_bytes, peak_rss_bytes, reset_peak_rss
    from fedprune.federated.local import ClientTask, TrainSettings, train_client
    from fedprune.federated.lora import LoraSettings, SharedBaseModel
    from fedprune.fedpruner.materialise import materialise_submodel
    from fedprune.fedpruner.submodel import skip_blocks

    torch.set_num_threads(1)
    # Load once and free it, so that the libraries the loader imports (transformers, peft,
    # gguf: ~190 MiB of code and Python objects) sit in the baseline, not in the device's peak.
    warm = load_model("smollm2-135m")
    del warm
    gc.collect()
    rss0 = current_rss_bytes()
    model = load_model("smollm2-135m")
    model.config.use_cache = False
    lora = LoraSettings(rank=8, alpha=16, dropout=0.05,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    base = SharedBaseModel(model, lora)
    base.base_original = {}  # the simulator's copy for merged deltas: not part of a device
    keep, attn, mlp = set(spec["layers"]), set(spec["skip_attn"]), set(spec["skip_mlp"])
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()  # anonymous memory (a lazily mapped file would charge weights to training)
    # a dropped layer's LoRA goes too (the device never holds it); a skipped sub-block's LoRA stays
    # (its layer's keys are in the task; < 0.2 MiB each)
    materialise_submodel(model, sorted(keep), sorted(attn), sorted(mlp))
    gc.collect()
    rss_loaded = current_rss_bytes()
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): the peak would not be training's own")
    g = torch.Generator().manual_seed(0)
    seq = spec["seq_len"]
    examples = []
    for _ in range(4):
        ids = torch.randint(3, model.config.vocab_size, (seq,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    # the device starts from the LoRA it holds: the task carries the adapter's own tensors, not
    # a second copy of every layer's LoRA as the simulator's tasks do (load_lora copies in place)
    task = ClientTask(0, 1, 8, {k: p.detach() for k, p in base.named_trainable().items()}, layers=sorted(keep))
    settings = TrainSettings(local_steps=spec["steps"], batch_size=1, grad_accum=1, seq_len=seq,
                             chunked_loss=spec.get("chunked_loss", True))
    t0 = time.perf_counter()
    with skip_blocks(model, attn=sorted(attn), mlp=sorted(mlp)):
        res, _ = train_client(base, task, examples, settings, seed=0, pad_id=0)
    peak = peak_rss_bytes()
    return {"peak_bytes": peak - rss0, "loaded_bytes": rss_loaded - rss0, "train_s": time.perf_counter() - t0,
            "train_loss_last": res.metrics["train_loss_last"]}


def class_specs() -> dict:
    """Per class: budget, K (FedPruner) and, for the smallest class that trains, a FedPruner+ unit plan."""
    from dataclasses import replace

    import numpy as np

    from fedprune.federated.devices import DEVICE_PROFILES
    from fedprune.federated.strategies.fedpruner import REFERENCE_SHAPE as shape, REFERENCE_SETUP as setup
    from fedprune.fedpruner import plan as fp
    from fedprune.fedpruner.memory import training_memory

    L = shape.num_layers
    specs = {}
    fixed = training_memory(shape, setup, 1)
    loss = f"chunked ({setup.loss_chunk_tokens}-token chunks)" if setup.chunked_loss else "full logits"
    for name in CLASSES:
        budget = DEVICE_PROFILES.get(name).memory_bytes
        k = fp.layers_for_budget(budget, shape, setup)
        layers = sorted({round(i * (L - 1) / max(k - 1, 1)) for i in range(k)}) if 0 < k < L else list(range(k))
        specs[name] = {"budget_mib": budget / 2**20, "k": k, "layers": layers, "skip_attn": [], "skip_mlp": [],
                       "what": f"{k} layers" if k else "nothing fits",
                       "predicted_mib": fp.predicted_peak(shape, setup, k) / 2**20 if k else None,
                       "fixed_mib": (fixed.embed_head + fixed.transient) / 2**20, "loss": loss,
                       "chunked_loss": setup.chunked_loss}
    # FedPruner+ on the smallest training class: a representative unit plan (uniform statistics)
    name = next(n for n in CLASSES if specs[n]["k"] > 0)
    budget = DEVICE_PROFILES.get(name).memory_bytes
    costs = fp.unit_costs(shape, setup)
    stats = fp.LayerStats(*[__import__("torch").ones(L, L, dtype=__import__("torch").float64)] +
                          [__import__("torch").ones(L, dtype=__import__("torch").float64)] * 3)
    p = fp.fedpruner_plus_plan(stats, fp.unit_budget(budget, shape, setup), costs, 1.0, np.random.default_rng(0))
    units = 2 * len(p.layers) - len(p.skip_attn) - len(p.skip_mlp)
    spent = sum(costs["attn"] for i in p.layers if i not in p.skip_attn) + \
        sum(costs["mlp"] for i in p.layers if i not in p.skip_mlp)
    specs[name + "+"] = {"budget_mib": budget / 2**20, "k": len(p.layers), "layers": p.layers,
                         "skip_attn": p.skip_attn, "skip_mlp": p.skip_mlp,
                         "what": f"FedPruner+: {units} sub-blocks in {len(p.layers)} layers "
                                 f"({len(p.layers) - len(p.skip_attn)} attn, {len(p.layers) - len(p.skip_mlp)} FFN)",
                         "predicted_mib": (fp.predicted_peak(shape, setup, 0) + fixed.transient + spent) / 2**20,
                         "fixed_mib": specs[name]["fixed_mib"], "loss": loss, "chunked_loss": setup.chunked_loss}
    # reference only (not a class): full-model training with the full-logits loss (labels=)
    full_logits = replace(setup, chunked_loss=False)
    specs[FULL_LOGITS_ROW] = {**specs["budget-100"], "what": f"{L} layers, full-logits loss",
                              "predicted_mib": fp.predicted_peak(shape, full_logits, L) / 2**20,
                              "fixed_mib": (fixed.embed_head + training_memory(shape, full_logits, 1).transient) / 2**20,
                              "loss": "full logits", "chunked_loss": False}
    return specs


SPEC_KEYS = ("budget_mib", "k", "layers", "skip_attn", "skip_mlp", "loss")


def run_memory(res: dict, args) -> None:
    """Measure every class whose stored row is missing or was measured for another submodel or loss;
    rows of classes that no longer exist (e.g. an earlier smallest class's FedPruner+ row) are dropped."""
    specs = class_specs()
    res["memory"] = {n: r for n, r in res["memory"].items() if n in specs}
    for name, spec in specs.items():
        old = res["memory"].get(name)
        same = old is not None and all(old.get(k) == spec[k] if k != "budget_mib" else
                                       abs(old.get(k, 0) - spec[k]) < 1e-6 for k in SPEC_KEYS)
        if same and (old.get("peak_bytes") or not spec["k"]):
            continue
        row = dict(spec)
        if spec["k"]:
            spec = {**spec, "seq_len": 256, "steps": 3}
            cmd = [sys.executable, __file__, "--memory-worker", json.dumps(spec)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", **MMAP_ENV}
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if p.returncode:
                raise SystemExit(f"memory worker {name} failed:\n{p.stderr[-3000:]}")
            row.update(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"[memory] {name}: {row['what']}: peak {row['peak_bytes'] / 2**20:.0f} MiB "
                  f"(predicted {row['predicted_mib']:.0f}, budget {row['budget_mib']:.0f})", flush=True)
        res["memory"][name] = row
        save(res, args, replace_memory=True)
    save(res, args, replace_memory=True)


# ---- federated runs ------------------------------------------------------------------------------------
def evaluate_zero_shot(sim, limit: int) -> dict:
    import torch

    from fedprune.evaluate.harness import evaluate
    from fedprune.federated.evaluation import merged_delta

    sim.base.set_base_delta(merged_delta(sim.global_.base_delta, sim.strategy.eval_delta(sim.global_)))
    sim.base.model.eval()
    try:
        with sim.base.lora_disabled(), torch.no_grad():
            out = evaluate(sim.base.model, sim.tokenizer, ZS_TASKS, limit=limit, batch_size=8, progress=False)
    finally:
        sim.base.set_base_delta(sim.global_.base_delta)
    return {"zs_average": out["average"], "zs_tasks": {t: v for t, v in out["results"].items()}}


def run_method(name: str, res: dict, args) -> None:
    from fedprune.federated.config import load_config
    from fedprune.federated.runtime.simulation import CHECKPOINT, Simulation

    cfg_file = ROOT / "configs/federated" / ("fedpruner_plus.yaml" if name == "fedpruner_plus" else "fedpruner.yaml")
    over = COMMON + [f"federation.strategy={name}"] + EXTRA.get(name, [])
    cfg = load_config(cfg_file, over)
    run_dir = OUT / "runs" / name
    t0 = time.perf_counter()
    sim = Simulation(cfg, run_dir)
    sim.run(resume=(run_dir / CHECKPOINT).exists())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    final = final_eval(sim)
    clients = [json.loads(x) for x in (run_dir / "clients.jsonl").read_text().splitlines() if x.strip()]
    ok = [c for c in clients if c["status"] == "ok"]
    fed = cfg.federation
    layers = sim.global_.meta.get("layer_rounds_trained")
    row = {
        "strategy": name, "config": str(cfg_file.relative_to(ROOT)), "overrides": over,
        "final_test_loss": final["test_loss"], "final_rouge_l": final.get("rouge_l"),
        "participation": len(ok) / (fed.rounds * fed.clients_per_round),
        "distinct_devices": len({c["cid"] for c in ok}), "num_devices": cfg.data.num_clients,
        "devices_per_class": {d: len({c["cid"] for c in ok if c["device"] == d}) for d in CLASSES},
        "mean_layers": _mean_layers(name, sim, ok),
        "layer_rounds_trained": layers, "fallback_rounds": sim.global_.meta.get("fallback_rounds", 0),
        "loss": f"chunked ({cfg.train.loss_chunk_tokens}-token chunks)" if cfg.train.chunked_loss else "full logits",
        "sim_time_s": metrics[-1]["sim_time_s"], "bytes_up": metrics[-1]["bytes_up"],
        "bytes_down": metrics[-1]["bytes_down"], "train_wall_s": metrics[-1]["wall_s"],
    }
    print(f"[{name}] final held-out loss {row['final_test_loss']:.4f}; zero-shot ...", flush=True)
    row.update(evaluate_zero_shot(sim, args.zs_limit))
    row["wall_s"] = time.perf_counter() - t0
    res["methods"][name] = row
    from fedprune import atomic

    atomic.write_json(run_dir / "result.json", row)
    save(res, args)
    print(f"[{name}] zero-shot avg {row['zs_average']:.4f}, participation {row['participation']:.2f}", flush=True)


def final_eval(sim) -> dict:
    from fedprune.federated.evaluation import EvalSettings, evaluate_global

    return evaluate_global(sim.base, sim.tokenizer, sim.test_records, EvalSettings(**FINAL_EVAL),
                           sim.cfg.train.seq_len, sim.global_.base_delta, sim.strategy.eval_delta(sim.global_))


def _mean_layers(name, sim, ok) -> float:
    counts = sim.global_.meta.get("layer_rounds_trained")
    if counts and ok:
        return sum(counts) / len(ok)
    return float(sim.base.adapter.num_layers)


def run_base(res: dict, args) -> None:
    """The base model (no LoRA update): held-out loss, Rouge-L and zero-shot at the same sizes."""
    from fedprune.federated.config import load_config
    from fedprune.federated.runtime.simulation import Simulation

    cfg = load_config(ROOT / "configs/federated/fedpruner.yaml", COMMON)
    sim = Simulation(cfg, OUT / "runs" / "_base")  # never run: its global LoRA has B = 0
    row = {"final_test_loss": None, "final_rouge_l": None}
    ev = final_eval(sim)
    row.update(final_test_loss=ev["test_loss"], final_rouge_l=ev.get("rouge_l"))
    row.update(evaluate_zero_shot(sim, args.zs_limit))
    res["base_model"] = row
    save(res, args)
    print(f"[base] loss {row['final_test_loss']:.4f}, zero-shot avg {row['zs_average']:.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="parts: memory, base, and method names")
    ap.add_argument("--zs-limit", type=int, default=40, help="examples per zero-shot task")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    OUT.mkdir(parents=True, exist_ok=True)
    res = load()
    parts = args.only or (["memory"] + METHODS[:4] + ["base"] + METHODS[4:])
    for part in parts:
        if part == "memory":
            run_memory(res, args)
        elif part == "base":
            if "base_model" not in res:
                run_base(res, args)
        elif part not in res["methods"]:
            run_method(part, res, args)
    save(res, args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
