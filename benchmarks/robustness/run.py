"""Robust aggregation under a poisoning client: FedIT on SmolLM2-135M, Shepherd 10-client Dolly
split, every client every round; one client declares 10^12 examples and sends 50 x its update.

    .venv/bin/python benchmarks/robustness/run.py --threads 1           # all runs
    .venv/bin/python benchmarks/robustness/run.py honest attacked       # some

Each run writes results/runs/<name>.json when it finishes (its run directory under
results/runs/<name>/ resumes from its checkpoint), so an interrupted benchmark resumes run by
run; results.json and results.md are rebuilt from those files after every run. Besides the
held-out loss, each row keeps the poisoner's weight share and clip factor per round and the
spread of the honest clients' update sizes (the diagnostics behind the defaults).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
CONFIG = "configs/federated/fedit.yaml"
POISONER, SCALE, CLAIM = 3, 50.0, 10**12

COMMON = ["federation.rounds=5", "federation.clients_per_round=10", "federation.dropout=false",
          "train.local_steps=2", "train.grad_accum=1", "train.batch_size=2", "train.seq_len=128", "train.lr=0.001",
          "eval.every=5", "eval.loss_examples=80", "eval.rouge_examples=0"]
NO_DEFENCE = ["federation.max_weight_ratio=0", "federation.clip_norm_ratio=0"]
# name: (attacked?, overrides on top of COMMON, what it shows)
RUNS = {
    "honest": (False, [], "no poisoner, default defences"),
    "attacked": (True, NO_DEFENCE, "poisoner, no defence (declared sizes trusted, no clipping, mean)"),
    "defended": (True, [], "poisoner, defaults: weight cap 3 x median (and the partition size), clip 2 x median RMS"),
    "weight_cap_only": (True, ["federation.clip_norm_ratio=0"], "poisoner, weight cap only"),
    "clipping_only": (True, ["federation.max_weight_ratio=0"], "poisoner, clipping only (declared sizes trusted)"),
    "median": (True, NO_DEFENCE + ["federation.aggregation=median"], "poisoner, coordinate-wise median only"),
    "trimmed_mean": (True, NO_DEFENCE + ["federation.aggregation=trimmed_mean", "federation.trim_ratio=0.1"],
                     "poisoner, trimmed mean (1 of 10 dropped at each end) only"),
}
SETTINGS = (
    "SmolLM2-135M (float32) on 2 shared CPU cores, 1 thread; FedIT, LoRA rank 8 (alpha 16) on q/v; Shepherd split "
    "(10 clients, 1492-1494 records each); 5 rounds x all 10 clients; per round 2 local AdamW steps of 2 examples "
    f"(<= 128 tokens), lr 1e-3; held-out loss on all 80 Dolly test records after round 5; one seed (0). Poisoner: "
    f"client {POISONER} declares {CLAIM:.0e} examples and sends the global + {SCALE:g} x its update (simulator "
    "tamper hook)."
)


def run_one(name: str) -> dict:
    from fedprune.federated.config import load_config
    from fedprune.federated.report import summarise
    from fedprune.federated.robust import poisoning_client
    from fedprune.federated.runtime.simulation import CHECKPOINT, Simulation

    attacked, overrides, what = RUNS[name]
    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / CONFIG, COMMON + overrides)
    run_dir = OUT / "runs" / name
    sim = Simulation(cfg, run_dir)
    if attacked:  # FedIT sends every client the global: the update is the deviation from it
        sim.tamper = poisoning_client(POISONER, lambda r: sim.global_.tensors, SCALE, CLAIM)
    t = time.perf_counter()
    sim.run(resume=(run_dir / CHECKPOINT).exists(), initial_metrics=base_metrics())
    s = summarise(run_dir)
    ev = [m for m in s["metrics"] if "test_loss" in m]
    ok = [c for c in s["clients"] if c["status"] == "ok"]
    honest = [c for c in ok if c["cid"] != POISONER or not attacked]
    rms = sorted(c["update_rms"] for c in honest)
    return {
        "what": what, "attacked": attacked, "overrides": overrides, "base_test_loss": ev[0]["test_loss"],
        "test_loss": ev[-1]["test_loss"], "rounds": s["rounds"], "bench_wall_s": time.perf_counter() - t,
        "poisoner": [{k: c.get(k) for k in ("round", "declared", "weight", "weight_share", "update_rms", "clip_scale")}
                     for c in ok if c["cid"] == POISONER] if attacked else [],
        "honest_rms_max_over_median": rms[-1] / rms[(len(rms) - 1) // 2],
        "honest_clipped": sum(c["clip_scale"] < 1 for c in honest),
        "status": s["status"],
    }


def base_metrics() -> dict | None:
    """The round-0 evaluation (the base model) of the first finished run: the same for every run."""
    for p in sorted((OUT / "runs").glob("*/metrics.jsonl")):
        first = json.loads(p.read_text().splitlines()[0]) if p.read_text().strip() else {}
        if first.get("round") == 0 and "test_loss" in first:
            return {k: first[k] for k in ("test_loss", "test_ppl", "test_tokens") if k in first}
    return None


def update_distances(names: list[str]) -> dict[str, float]:
    """``||g_run - g_honest|| / ||g_honest - g_0||`` over the final global LoRA factors: how far each run's
    model moved from the honest one, relative to how far the honest one moved (0 = identical)."""
    import torch

    from fedprune.federated.lora import init_lora_state
    from fedprune.federated.runtime.simulation import CHECKPOINT

    def final(name):
        return torch.load(OUT / "runs" / name / CHECKPOINT, weights_only=False)["tensors"]

    honest = final("honest")
    mods = sorted(k[: -len(".lora_A")] for k in honest if k.endswith(".lora_A"))
    shapes = {m: (honest[m + ".lora_B"].shape[0], honest[m + ".lora_A"].shape[1]) for m in mods}
    g0 = init_lora_state(shapes, honest[mods[0] + ".lora_A"].shape[0], 0)

    def dist(a, b):
        return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5

    moved = dist(honest, g0)
    return {n: dist(final(n), honest) / moved for n in names if (OUT / "runs" / n / CHECKPOINT).exists()}


def collect() -> dict:
    """results.json and results.md from the finished runs' files."""
    from fedprune import atomic

    rows = {p.stem: json.loads(p.read_text()) for p in sorted((OUT / "runs").glob("*.json"))}
    res: dict = {"settings": SETTINGS, "command": ".venv/bin/python benchmarks/robustness/run.py --threads 1",
                 "runs": rows}
    for key, name in (("honest_loss", "honest"), ("attacked_loss", "attacked"), ("defended_loss", "defended")):
        if name in rows:
            res[key] = rows[name]["test_loss"]
    if "honest_loss" in res and "defended_loss" in res:
        res["defended_vs_honest"] = res["defended_loss"] / res["honest_loss"] - 1
    if "honest" in rows:
        for name, d in update_distances(list(rows)).items():
            rows[name]["distance_from_honest"] = d
    atomic.write_json(OUT / "results.json", res)
    h = res.get("honest_loss")
    lines = ["| run | what | held-out loss | vs honest | distance from honest model | poisoner weight share (rounds) | "
             "poisoner clip factor (rounds) | honest updates clipped |", "|---|---|---:|---:|---:|---|---|---:|"]
    for name in RUNS:
        if name not in rows:
            continue
        r = rows[name]
        share = ", ".join(f"{p['weight_share']:.2f}" for p in r["poisoner"]) or "-"
        clip = ", ".join(f"{p['clip_scale']:.3f}" for p in r["poisoner"]) or "-"
        vs = f"{100 * (r['test_loss'] / h - 1):+.2f} %" if h else "-"
        dist = f"{r['distance_from_honest']:.2f}" if "distance_from_honest" in r else "-"
        lines.append(f"| {name} | {r['what']} | {r['test_loss']:.4f} | {vs} | {dist} | {share} | {clip} | "
                     f"{r['honest_clipped']} of {r['status'].get('ok', 0) - len(r['poisoner'])} |")
    base = next(iter(rows.values()))["base_test_loss"] if rows else float("nan")
    spread = max((r["honest_rms_max_over_median"] for r in rows.values()), default=float("nan"))
    wall = sum(r["bench_wall_s"] for r in rows.values())
    text = ("# Robust aggregation under a poisoning client\n\n" + "\n".join(lines) +
            f"\n\nBase model (before round 1): held-out loss {base:.4f}. Distance from honest model: "
            "||g - g_honest|| / ||g_honest - g_0|| over the final global LoRA factors (g_0: the initial global). "
            f"Largest honest update RMS over its round's median, any run: {spread:.3f} (the clip bound is 2). "
            f"Benchmark wall time: {wall / 60:.0f} min.\n\n"
            f"Settings: {SETTINGS}\n\n"
            f"Command: `{res['command']}`\n")
    atomic.write_text(OUT / "results.md", text)
    return res


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help=f"runs to do (default: all of {', '.join(RUNS)})")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    unknown = [n for n in args.runs if n not in RUNS]
    if unknown:
        ap.error(f"unknown run(s) {unknown}; known: {', '.join(RUNS)}")
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (OUT / "runs").mkdir(parents=True, exist_ok=True)
    from fedprune import atomic

    for name in args.runs or list(RUNS):
        done = OUT / "runs" / f"{name}.json"
        if done.exists():
            logging.info("%s: done already (%s), skipped", name, done.name)
            continue
        row = run_one(name)
        atomic.write_json(done, row)
        logging.info("%s: test loss %.4f", name, row["test_loss"])
        collect()
    res = collect()
    logging.info("honest %.4f attacked %.4f defended %.4f", res.get("honest_loss", float("nan")),
                 res.get("attacked_loss", float("nan")), res.get("defended_loss", float("nan")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
