"""FedSpine vs pruned and dense baselines, measured the way the paper means it.

    .venv/bin/python benchmarks/fedspine/run.py --regime compute --seeds 0,1,2      # every method
    .venv/bin/python benchmarks/fedspine/run.py fedspine fedmp --regime comm --seeds 0
    .venv/bin/python benchmarks/fedspine/run.py fedspine --pilot 3                  # time 3 rounds
    .venv/bin/python benchmarks/fedspine/run.py --report --regime compute           # summary only

Regimes (``--regime``): ``compute`` models a LLaMA-2-7B-class deployment
(``federation.reference_params`` = 6.74e9: every round's FLOPs and LoRA bytes rescaled to that
size, learning dynamics of the model actually trained), where compute dominates a Jetson's round
as on the paper's testbed; ``comm`` keeps the trained model's own size, where communication
dominates and pruning buys little time. ``--speed-scale`` multiplies every device class's assumed
training throughput (the relative 1 : 2.5 : 6 stays), to show sensitivity to those assumptions.

Fleet: 24 devices (``tx2:9,xavier-nx:12,agx-xavier:3``), 6 per round, 80 rounds (4 warm-up and
4 cool-down rounds of pure tuning), so each device's bandit gets about 18 pulls; 16 local steps
of one example (<= 96 tokens), pruning every 4 steps and 4 recovery steps before upload.

Methods (same seeds, fleet, split, schedule and evaluation):
  fedit          FedIT, rank 8, no pruning (deploys the dense model)
  hetlora        HetLoRA, rank by device class (TX2 4, Xavier NX 8, AGX 16), no pruning
  fedit-prune    FedIT + the same iterative prune-and-tune at a uniform ratio P, rank 8
  hetlora-prune  HetLoRA aggregation (zero-padding) + uniform ratio P; each device keeps its class's
                 rank (TX2 4, Xavier NX 8, AGX 16) every round (``device_ranks``)
  fedmp          a bandit (S-UCB) over the ratio only, rank 8 (FedMP-style)
  fedspine       S-UCB over (ratio, rank), FlexLoRA reconciliation (the method)

Equal sparsity (``--equal-sparsity``, default ``fedspine``): the uniform ratio P of the pruned
baselines is the sparsity FedSpine reached in the same seed and regime, the mean
``deployed_sparsity`` of its cool-down rounds (masks fixed there; the last round when it has
none), so FedSpine runs first and a pruned baseline without FedSpine's result is refused; a number
fixes P instead (the earlier default was 0.3). Each result records its P (``equal_sparsity_p``).

Time to target is measured on what each method deploys: every round, the data-weighted mean
held-out loss of the participating devices' pruned models (base + global LoRA under each
device's masks; ``fedspine.evaluation.deployed_heldout_loss``); dense methods deploy the global
model. The target is half-way from the base model's loss to the best final deployed loss of any
method (per seed). One result file per (method, seed, regime, speed): results/<regime>/...json;
run directories under results/runs/ resume from their checkpoints.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
ROOT = HERE.parents[1]

REFERENCE = {"compute": 6.74e9, "comm": 0.0}  # LLaMA-2-7B-class deployment vs the trained model's own size
P_EQUAL = 0.3  # FedSpine's p_range centre; the pruned baselines' ratio only with --equal-sparsity 0.3
TARGET_FRACTION = 0.5
FLEET = "tx2:9,xavier-nx:12,agx-xavier:3"
DEFAULTS = {"rounds": 80, "per_round": 6, "local_steps": 16, "interval": 4, "recovery": 4, "warmup": 4,
            "cooldown": 4, "seq_len": 96, "eval_n": 16, "examples": 32}
HET_RANKS = {"tx2": 4, "xavier-nx": 8, "agx-xavier": 16}
BASELINES = ("fedit", "hetlora", "fedit-prune", "hetlora-prune", "fedmp")
PRUNED_BASELINES = ("fedit-prune", "hetlora-prune", "fedmp")
PRUNED_UNIFORM = ("fedit-prune", "hetlora-prune")  # run at FedSpine's reached sparsity
METHODS = ("fedspine",) + BASELINES  # FedSpine first: the uniform baselines take its sparsity


# ---- config ---------------------------------------------------------------------------------------
def spine_options(s: dict, **kw) -> dict:
    opts = {"interval": s["interval"], "recovery_steps": s["recovery"], "warmup_rounds": s["warmup"],
            "cooldown_rounds": s["cooldown"], "max_step_sparsity": 0.1, "p_range": [0.2, 0.4],
            "reward": "efficiency", "export": "none", "fleet_warmup": 0}
    opts.update(kw)
    return opts


def class_ranks(fleet: str) -> list[int]:
    """HetLoRA's rank of every device of ``fleet``, in fleet order (by device class)."""
    from fedprune.federated.devices import parse_fleet

    return [HET_RANKS[p.name.split("@")[0].split("*")[0]] for p in parse_fleet(fleet)]


def reached_sparsity(entry: dict) -> float:
    """The sparsity a FedSpine run reached: the mean ``deployed_sparsity`` of its cool-down rounds
    (masks fixed there), or of its last round when it has none."""
    curve = [c for c in entry["curve"] if c.get("deployed_sparsity") is not None]
    if not curve:
        raise ValueError(f"{entry.get('method')} seed {entry.get('seed')}: no deployed_sparsity in its curve")
    cool = int(entry["settings"].get("cooldown", 0))
    last = curve[-cool:] if cool > 0 else curve[-1:]
    return statistics.fmean(float(c["deployed_sparsity"]) for c in last)


def equal_sparsity(equal: str, regime: str, seed: int, speed: float) -> float:
    """The pruned baselines' uniform ratio: a number, or (``fedspine``) FedSpine's reached sparsity."""
    if equal != "fedspine":
        try:
            p = float(equal)
        except ValueError:
            p = -1.0
        if not 0 <= p < 1:
            raise SystemExit(f"--equal-sparsity must be 'fedspine' or a ratio in [0, 1), got {equal}")
        return p
    path = result_path(regime, "fedspine", seed, speed)
    if not path.exists():
        raise SystemExit(f"the pruned baselines run at FedSpine's reached sparsity, but {path} does not exist: "
                         "run fedspine for this seed first, or give --equal-sparsity P")
    return round(reached_sparsity(json.loads(path.read_text())), 4)


def method_overrides(name: str, s: dict, p_equal: float = P_EQUAL) -> tuple[list[str], dict]:
    """(config overrides, federation.options) of one method; ``p_equal`` is the pruned baselines' ratio."""
    uniform = {"chooser": "random", "p_range": [p_equal, p_equal]}
    if name == "fedit":
        return ["federation.strategy=fedit", "federation.ranks=[]", "lora.rank=8"], {}
    if name == "hetlora":
        return ["federation.strategy=hetlora", f"federation.ranks={json.dumps(class_ranks(s['fleet']))}"], {}
    spine = ["federation.strategy=fedspine"]
    if name == "fedit-prune":
        return spine + ["federation.ranks=[8]"], spine_options(s, reconcile="fedavg", **uniform)
    if name == "hetlora-prune":
        return spine + ["federation.ranks=[4,8,16]"], spine_options(s, reconcile="hetlora",
                                                                    device_ranks=class_ranks(s["fleet"]), **uniform)
    if name == "fedmp":
        return spine + ["federation.ranks=[8]"], spine_options(s, chooser="s-ucb", reconcile="fedavg")
    if name == "fedspine":
        return spine + ["federation.ranks=[2,4,8,16]"], spine_options(s, chooser="s-ucb", reconcile="flexlora")
    raise SystemExit(f"unknown method {name!r}; known: {', '.join(METHODS)}")


def method_config(name: str, s: dict, seed: int, regime: str, p_equal: float = P_EQUAL):
    import yaml

    from fedprune.federated.config import FederatedConfig, apply_overrides

    d = yaml.safe_load((ROOT / "configs/federated/fedspine.yaml").read_text())
    overrides, options = method_overrides(name, s, p_equal)
    n = sum(int(x.split(":")[1]) for x in s["fleet"].split(","))
    common = [
        f"model.name={s['model']}", f"model.tokenizer={'tiny-bpe' if s['model'] == 'tiny-llama' else s['model']}", "data.partition=dirichlet",
        f"data.num_clients={n}", f"data.max_examples_per_client={s['examples']}",
        f"train.local_steps={s['local_steps']}", "train.grad_accum=1", "train.batch_size=1",
        f"train.seq_len={s['seq_len']}", "train.lr=0.0005", f"federation.rounds={s['rounds']}",
        f"federation.clients_per_round={s['per_round']}", f"federation.fleet={s['fleet']}", "federation.links=device",
        "federation.dropout=false", "federation.deadline_s=0", f"federation.seed={seed}",
        f"federation.reference_params={REFERENCE[regime]}", "eval.every=1", f"eval.loss_examples={s['eval_n']}",
        "eval.rouge_examples=0", "eval.batch_size=8",
    ]
    d = apply_overrides(d, common + overrides)
    d["federation"]["options"] = options
    return FederatedConfig.from_dict(d)


def scaled_fleet(fleet: str, speed: float) -> str:
    if speed == 1.0:
        return fleet
    return ",".join(f"{e.split(':')[0]}*{speed:g}:{e.split(':')[1]}" for e in fleet.split(","))


# ---- the run, evaluated on the deployed models ---------------------------------------------------------
def deployed_simulation_class():
    from fedprune.federated.runtime.simulation import Simulation

    class DeployedSimulation(Simulation):
        """Each evaluation also scores what the round's devices deploy (their pruned models)."""

        def evaluate(self) -> dict:
            out = super().evaluate()
            out["deployed_loss"] = out["test_loss"]
            trace = self.global_.meta.get("trace")
            if self.round == 0 or trace is None:  # before any round, or a dense method: the global model
                return out
            from fedprune.fedspine.device import full_unit_masks, unit_masks_from_lora_masks
            from fedprune.fedspine.evaluation import deployed_heldout_loss

            t = time.perf_counter()
            ad = self.base.adapter
            cids = sorted({e["device"] for e in trace if e["round"] == self.round})
            masks = {c: full_unit_masks(ad, *unit_masks_from_lora_masks(ad, self.global_.meta["masks"][str(c)]))
                     for c in cids}
            weights = {c: self.clients[c].num_examples for c in cids}
            res = deployed_heldout_loss(self.base, self.tokenizer, self.test_records, self.cfg.train.seq_len,
                                        self.cfg.eval.batch_size, self.global_.base_delta,
                                        self.strategy.eval_delta(self.global_), masks, weights,
                                        self.cfg.eval.loss_examples)
            out["deployed_loss"] = res["deployed_loss"]
            out["deployed_sparsity"] = (sum(weights[c] * self.global_.meta["sparsity"][str(c)] for c in cids)
                                        / max(sum(weights.values()), 1))
            out["deployed_eval_s"] = time.perf_counter() - t
            return out

    return DeployedSimulation


def result_path(regime: str, name: str, seed: int, speed: float) -> Path:
    tag = f"{name}-s{seed}" + ("" if speed == 1.0 else f"-x{speed:g}")
    return OUT / regime / f"{tag}.json"


def run_one(name: str, s: dict, seed: int, regime: str, speed: float, stop_after: int | None = None,
            equal: str = "fedspine") -> dict:
    from fedprune import atomic
    from fedprune.federated.runtime.simulation import CHECKPOINT

    p_equal = equal_sparsity(equal, regime, seed, speed) if name in PRUNED_UNIFORM else None
    s = dict(s, fleet=scaled_fleet(s["fleet"], speed))
    cfg = method_config(name, s, seed, regime, P_EQUAL if p_equal is None else p_equal)
    tag = result_path(regime, name, seed, speed).stem
    run_dir = OUT / "runs" / regime / tag
    if stop_after is not None:  # a pilot: a fresh directory of its own, never mixed with a real run
        run_dir = OUT / "runs" / "pilot" / f"{regime}-{tag}-{int(time.time())}"
    sim = deployed_simulation_class()(cfg, run_dir)
    t0 = time.perf_counter()
    sim.run(resume=(run_dir / CHECKPOINT).exists(), stop_after=stop_after)
    wall = time.perf_counter() - t0
    curve = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    keys = ("round", "test_loss", "deployed_loss", "deployed_sparsity", "sim_time_s", "round_sim_time_s",
            "compute_share", "round_wall_s", "eval_s", "deployed_eval_s", "bytes_up", "bytes_down")
    entry = {"method": name, "seed": seed, "regime": regime, "speed_scale": speed,
             "reference_params": REFERENCE[regime], "cost_scale": sim.cost_scale.to_dict(), "settings": s,
             "equal_sparsity_p": p_equal,
             "curve": [{k: m[k] for k in keys if k in m} for m in curve], "wall_s": wall,
             "rounds_done": sim.round}
    trace = sim.global_.meta.get("trace")
    if trace:
        pulls: dict[int, int] = {}
        for e in trace:
            if e.get("chosen_by") in ("device", "fleet"):
                pulls[e["device"]] = pulls.get(e["device"], 0) + 1
        entry["pulls_per_device"] = pulls
        entry["trace"] = trace
    if stop_after is None:
        atomic.write_json(result_path(regime, name, seed, speed), entry)
    return entry


# ---- summary ----------------------------------------------------------------------------------------------
def time_to(curve: list[dict], target: float, key: str = "deployed_loss") -> float | None:
    for m in curve:
        if m.get(key) is not None and m[key] <= target:
            return float(m["sim_time_s"])
    return None


def t_interval(xs: list[float]) -> dict:
    """Mean and 95 % Student-t interval (``None`` bounds with fewer than 2 values)."""
    if not xs:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    from scipy import stats

    half = stats.t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(xs)}


def summarise(regime: str, speed: float = 1.0) -> dict:
    runs: dict[int, dict[str, dict]] = {}
    for p in sorted((OUT / regime).glob("*.json")) if (OUT / regime).exists() else []:
        e = json.loads(p.read_text())
        if e.get("speed_scale", 1.0) == speed:
            runs.setdefault(int(e["seed"]), {})[e["method"]] = e
    per_seed, gains, shares = {}, [], {}
    for seed, by in sorted(runs.items()):
        if "fedspine" not in by:
            continue
        base = by["fedspine"]["curve"][0]["deployed_loss"]
        best = min(e["curve"][-1]["deployed_loss"] for e in by.values())
        target = base - TARGET_FRACTION * (base - best)
        times = {m: time_to(e["curve"], target) for m, e in by.items()}
        done = [times[b] for b in BASELINES if b in by and times[b] is not None]
        best_base = min(done) if done else None
        ft = times["fedspine"]
        per_seed[seed] = {"target": target, "times": times,
                          "speedup": (best_base / ft) if (ft and best_base) else None}
        pruned = [by[b]["curve"][-1]["deployed_loss"] for b in PRUNED_BASELINES if b in by]
        if pruned:  # held-out loss: lower is better, so the gain is baseline minus FedSpine
            gains.append(min(pruned) - by["fedspine"]["curve"][-1]["deployed_loss"])
        for m, e in by.items():
            vals = [c["compute_share"]["all"] for c in e["curve"] if c.get("compute_share")]
            if vals:
                shares.setdefault(m, []).append(statistics.fmean(vals))
    speedups = [v["speedup"] for v in per_seed.values() if v["speedup"] is not None]
    return {"regime": regime, "reference_params": REFERENCE[regime], "speed_scale": speed,
            "seeds": sorted(per_seed),
            "speedup_vs_best_baseline": statistics.fmean(speedups) if speedups else None,
            "speedup_per_seed": {s: v["speedup"] for s, v in per_seed.items()},
            "accuracy_gain_at_equal_sparsity": {**t_interval(gains), "metric": "held-out loss of the deployed "
                                                "models, best pruned baseline minus FedSpine (positive = FedSpine "
                                                "better)"},
            "compute_share": {m: statistics.fmean(v) for m, v in shares.items()},
            "per_seed": per_seed}


# ---- CLI -----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("methods", nargs="*", help=f"subset of {', '.join(METHODS)} (default: all)")
    ap.add_argument("--regime", choices=sorted(REFERENCE), default="compute")
    ap.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    ap.add_argument("--speed-scale", type=float, default=1.0, help="multiply every class's assumed throughput")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--fleet", default=FLEET)
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    ap.add_argument("--pilot", type=int, default=0, help="run only this many rounds of the first method and seed "
                                                         "(fresh directory), report its CPU time, write no result")
    ap.add_argument("--report", action="store_true", help="only print the summary of finished runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--equal-sparsity", default="fedspine",
                    help="the uniform pruned baselines' ratio: 'fedspine' (its reached sparsity, same seed) or a number")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = {k: getattr(args, k) for k in DEFAULTS} | {"model": args.model, "fleet": args.fleet}
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    methods = sorted(args.methods or METHODS, key=lambda m: METHODS.index(m) if m in METHODS else -1)
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    if not args.report:
        import torch

        from fedprune.memory_usage import peak_rss_bytes

        torch.set_num_threads(args.threads)
        if args.pilot:
            t_cpu, t0 = time.process_time(), time.perf_counter()
            e = run_one(methods[0], s, seeds[0], args.regime, args.speed_scale, stop_after=args.pilot,
                        equal=args.equal_sparsity)
            cpu, wall = time.process_time() - t_cpu, time.perf_counter() - t0
            rounds = [c for c in e["curve"] if c["round"] > 0]
            per_round = statistics.fmean(c["round_wall_s"] for c in rounds)
            out = {"method": methods[0], "regime": args.regime, "rounds": len(rounds), "cpu_s": cpu, "wall_s": wall,
                   "mean_round_wall_s": per_round, "peak_rss_mb": peak_rss_bytes() / 2**20, "cost_scale": e["cost_scale"],
                   "curve": e["curve"],
                   "cpu_s_per_round": cpu / len(rounds),
                   "estimate_full_cpu_h": cpu / len(rounds) * s["rounds"] * len(METHODS) * 2 / 3600,
                   "estimate_note": "CPU seconds per pilot round (model loading included) x rounds x methods x "
                                    "2 regimes, one seed, one thread; dense methods skip the per-device "
                                    "evaluation and pruning, so this is an upper bound"}
            OUT.mkdir(parents=True, exist_ok=True)
            from fedprune import atomic

            atomic.write_json(OUT / f"pilot-{args.regime}-{methods[0]}.json", out)
            print(json.dumps({k: v for k, v in out.items() if k != "curve"}, indent=1))
            return 0
        for seed in seeds:
            for m in methods:
                if result_path(args.regime, m, seed, args.speed_scale).exists():
                    logging.info("%s seed %d (%s): done already", m, seed, args.regime)
                    continue
                logging.info("=== %s, seed %d, regime %s ===", m, seed, args.regime)
                run_one(m, s, seed, args.regime, args.speed_scale, equal=args.equal_sparsity)
    summary = summarise(args.regime, args.speed_scale)
    from fedprune import atomic

    OUT.mkdir(parents=True, exist_ok=True)
    name = f"summary-{args.regime}" + ("" if args.speed_scale == 1.0 else f"-x{args.speed_scale:g}")
    atomic.write_json(OUT / f"{name}.json", {"summary": summary})
    print(json.dumps({k: v for k, v in summary.items() if k != "per_seed"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
