"""Federated LoRA on SmolLM2-135M: FedIT / HetLoRA / FlexLoRA / FLoRA vs the base model, and
the 80-client Jetson fleet (peak memory, server overhead share).

    .venv/bin/python benchmarks/federated/run.py            # all
    .venv/bin/python benchmarks/federated/run.py fedit      # some

Writes benchmarks/federated/results/{results.json,results.md,test_loss.png} after every run
and keeps each run directory under results/runs/<name>; interrupted runs resume from their
checkpoint, finished ones are skipped. Sizes are deliberately small (2 shared CPU cores):
every shortcut is listed in the markdown.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"

COMMON = ["train.local_steps=5", "train.grad_accum=2", "train.seq_len=256", "train.lr=0.0005",
          "federation.rounds=2", "federation.clients_per_round=2", "eval.every=2", "eval.loss_examples=16",
          "eval.rouge_examples=2", "eval.max_new_tokens=16"]
RUNS = {
    "fedit": ("configs/federated/fedit.yaml", COMMON),
    "hetlora": ("configs/federated/hetlora.yaml", COMMON),
    "flexlora": ("configs/federated/flexlora.yaml", COMMON),
    "flora": ("configs/federated/flora.yaml", COMMON),
    "fleet80": ("configs/federated/fleet80.yaml",
                ["train.local_steps=2", "federation.rounds=2", "federation.clients_per_round=4", "eval.every=2",
                 "eval.loss_examples=16", "eval.rouge_examples=2", "eval.max_new_tokens=16"]),
}
SHORTCUTS = (
    "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to float32) on 2 CPU cores shared with other jobs (wall times "
    "are inflated and not comparable); only 2 rounds x 2 of 10 clients (Shepherd split), 5 local steps of 2 x 1 "
    "examples of <= 256 tokens, lr 5e-4, LoRA on q/v (ranks 4/8/16 by client id for the heterogeneous methods, 8 for "
    "FedIT); evaluated before round 1 and after the last round only, held-out loss on 16 of the 80 test "
    "records (every 5th: 2 per category), Rouge-L on 2 records with 16 greedy tokens (far too few to rank methods); one seed. fleet80: Dirichlet(0.5) over 80 clients capped at 64 records each, 2 rounds x 4 "
    "clients x 2 steps, AdamW states kept per client, deadline 15 simulated s, dropout on."
)


def load_results() -> dict:
    p = OUT / "results.json"
    return json.loads(p.read_text()) if p.exists() else {}


def save(results: dict) -> dict:
    """Merge ``results`` into results.json (several invocations may run side by side) and redraw."""
    from fedprune import atomic

    results = {**load_results(), **results}
    atomic.write_json(OUT / "results.json", results)
    rows = ["| run | strategy | ranks | base test loss | final test loss | change | base Rouge-L | final Rouge-L | "
            "sim time (s) | wall (s) | MB up+down | peak RSS (MB) | server share |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['strategy']} | {r['ranks']} | {r['base_test_loss']:.4f} | {r['final_test_loss']:.4f} | "
                    f"{r['final_test_loss'] - r['base_test_loss']:+.4f} | {r['base_rouge_l']:.3f} | {r['final_rouge_l']:.3f} | "
                    f"{r['sim_time_s']:.1f} | {r['wall_s']:.0f} | {r['mb_moved']:.1f} | {r['peak_rss_mb']:.0f} | "
                    f"{100 * r['server_share']:.2f} % |")
    text = "# Federated LoRA benchmark\n\n" + "\n".join(rows) + "\n\nShortcuts: " + SHORTCUTS + \
        "\n\nCommand: `.venv/bin/python benchmarks/federated/run.py`\n\n![test loss](test_loss.png)\n"
    atomic.write_text(OUT / "results.md", text)
    _plot(results)
    return results


def _plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, r in results.items():
        pts = [(m["round"], m.get("sim_time_s", 0), m["test_loss"]) for m in r["curve"]]
        axes[0].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=name)
        axes[1].plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=name)
    axes[0].set_xlabel("round")
    axes[1].set_xlabel("simulated time (s)")
    for ax in axes:
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(OUT / "test_loss.png", dpi=100)
    plt.close(fig)


def base_metrics(cfg) -> dict | None:
    """The round-0 (base model) evaluation of an earlier run with the same model and eval settings."""
    import yaml

    for d in sorted((OUT / "runs").glob("*")):
        c, m = d / "config.yaml", d / "metrics.jsonl"
        if not (c.exists() and m.exists() and m.read_text().strip()):
            continue
        other = yaml.safe_load(c.read_text())
        if other["model"] == cfg.to_dict()["model"] and other["eval"] == cfg.to_dict()["eval"] and \
                other["train"]["seq_len"] == cfg.train.seq_len:
            first = json.loads(m.read_text().splitlines()[0])
            keys = ("test_loss", "test_ppl", "test_tokens", "rouge_l")
            if first.get("round") == 0 and all(k in first for k in keys):
                out = {k: first[k] for k in keys}
                out["reused_from"] = d.name
                return out
    return None


def run_one(name: str) -> dict:
    from fedprune.federated.config import load_config
    from fedprune.federated.report import summarise
    from fedprune.federated.runtime.simulation import CHECKPOINT, Simulation

    cfg_path, overrides = RUNS[name]
    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / cfg_path, overrides)
    run_dir = OUT / "runs" / name
    t = time.perf_counter()
    Simulation(cfg, run_dir).run(resume=(run_dir / CHECKPOINT).exists(), initial_metrics=base_metrics(cfg))
    s = summarise(run_dir)
    ev = [m for m in s["metrics"] if "test_loss" in m]
    last = s["metrics"][-1]
    return {
        "strategy": cfg.federation.strategy, "ranks": cfg.federation.ranks or [cfg.lora.rank],
        "config": cfg_path, "overrides": overrides, "rounds": s["rounds"],
        "base_test_loss": ev[0]["test_loss"], "final_test_loss": ev[-1]["test_loss"],
        "base_rouge_l": ev[0].get("rouge_l", float("nan")), "final_rouge_l": ev[-1].get("rouge_l", float("nan")),
        "sim_time_s": last["sim_time_s"], "wall_s": last["wall_s"], "bench_wall_s": time.perf_counter() - t,
        "mb_moved": (last["bytes_up"] + last["bytes_down"]) / 1e6, "peak_rss_mb": s["peak_rss_mb"],
        "server_share": s["server_share"], "client_status": s["status"],
        "curve": [{k: m.get(k) for k in ("round", "sim_time_s", "test_loss", "rouge_l")} for m in ev],
    }


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = argv or list(RUNS)
    OUT.mkdir(parents=True, exist_ok=True)
    results = load_results()
    for name in names:
        if name in results:
            logging.info("%s: already in results.json, skipped", name)
            continue
        results = save({name: run_one(name)})
        logging.info("%s: %s", name, {k: v for k, v in results[name].items() if k != "curve"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
