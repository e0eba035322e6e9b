"""Why FedPruner+ trails FedPruner: what each memory class holds, and what one round of it does.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fedpruner/plus_blocks.py

On CommonsenseQA with the settings of ``run_csqa.py`` (fleet, seq 256, LoRA r=8 on all seven
projections, local steps, lr), for each memory class that does not hold the whole model
(budget-25 .. budget-75) and each of its devices, from the *base* model (round 1, seed 0):

1. the plan each method draws (the device's own statistics on its local batch, the run's per-device
   random draw): layers in the forward pass, attention and FFN blocks trained, LoRA parameters;
2. the plan's forward without training: the submodel's answer loss on the device's first
   ``--probe`` training questions (how far the device's forward is from the full model's);
3. one local round (the benchmark's local steps) on that plan, then the update alone applied to
   the global model as a one-device round: the full model's held-out answer loss on ``--questions``
   validation questions spread over the file, against the untrained model's.

Results: results/csqa/plus_blocks.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = HERE / "results" / "csqa"
CLASSES = ["budget-25", "budget-40", "budget-55", "budget-75"]
METHODS = ["fedpruner", "fedpruner_plus"]
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=100, help="validation questions for the held-out loss")
    ap.add_argument("--probe", type=int, default=16, help="local questions for the untrained submodel's loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    sys.path.insert(0, str(HERE))
    import run_csqa as bench
    from fedprune import atomic
    from fedprune.federated.config import load_config
    from fedprune.federated.evaluation import EvalSettings, evaluate_global
    from fedprune.federated.local.chunked_loss import causal_lm_loss
    from fedprune.federated.partition import collate
    from fedprune.federated.runtime.server import build_strategy, client_seed
    from fedprune.federated.runtime.simulation import Simulation
    from fedprune.fedpruner.submodel import skip_blocks

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ns = argparse.Namespace(rounds=1, local_steps=bench.DEFAULTS["local_steps"], grad_accum=bench.DEFAULTS["grad_accum"],
                            lr=bench.DEFAULTS["lr"])
    cfgs = {m: load_config(bench.config_file(m), bench.overrides(m, args.seed, ns)) for m in METHODS}
    sim = Simulation(cfgs["fedpruner"], OUT / "runs" / "_plus_blocks")  # never run: the base model and data
    strategies = {m: build_strategy(cfgs[m], sim.base.model.config) for m in METHODS}
    g0 = sim.global_
    ev = EvalSettings(loss_examples=args.questions, rouge_examples=0, batch_size=8)

    def heldout(global_) -> float:
        return evaluate_global(sim.base, sim.tokenizer, sim.test_records, ev, 256, global_.base_delta,
                               strategies["fedpruner"].eval_delta(global_), "commonsense_qa")["test_loss"]

    def probe_loss(examples, plan) -> float:
        sim.base.load_lora(g0.tensors, 8)
        sim.base.model.eval()
        tot = n = 0.0
        with torch.no_grad(), skip_blocks(sim.base.model, attn=plan.skip_attn, mlp=plan.skip_mlp), \
                sim.base.adapter.only_layers(plan.layers):
            for e in examples:
                b = collate([e], sim.tokenizer.pad_token_id)
                k = int((b["labels"] != -100).sum())
                tot += float(causal_lm_loss(sim.base.peft, b, 64, adapter=sim.base.adapter)) * k
                n += k
        return tot / n

    base_loss = heldout(g0)
    rows = []
    for cid, prof in enumerate(sim.fleet):
        if prof.name not in CLASSES:
            continue
        info = sim.clients[cid]
        ex = sim.examples(cid)
        seed = client_seed(args.seed, 1, cid)
        for m in METHODS:
            s = strategies[m]
            task = s.configure_train(1, [info], g0, args.seed)[0]
            plan = s.device_plan(sim.base, task, ex, sim.tokenizer.pad_token_id, seed)
            probe = probe_loss(ex[:args.probe], plan)
            res, _ = s.client_trainer(sim.base, task, ex, cfgs[m].train, seed, sim.tokenizer.pad_token_id)
            g1 = s.aggregate_train(1, [res], g0)
            lora_attn = sum(t.numel() for k, t in res.lora.items() if k.split(".lora_")[0].rsplit(".", 1)[-1] in ATTN)
            row = {"class": prof.name, "cid": cid, "method": m, "layers": plan.layers,
                   "forward_layers": len(plan.layers),
                   "attn_blocks": len(plan.layers) - len(plan.skip_attn), "mlp_blocks": len(plan.layers) - len(plan.skip_mlp),
                   "lora_params": sum(t.numel() for t in res.lora.values()), "lora_params_attn": lora_attn,
                   "probe_loss_untrained": probe, "local_loss_first": res.metrics["train_loss_first"],
                   "local_loss_last": res.metrics["train_loss_last"], "local_loss_mean": res.metrics["train_loss_mean"],
                   "heldout_loss_after": heldout(g1)}
            row["heldout_gain"] = base_loss - row["heldout_loss_after"]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
    out = {"seed": args.seed, "round": 1, "heldout_questions": args.questions, "probe_questions": args.probe,
           "base_heldout_loss": base_loss, "rows": rows, "wall_s": time.perf_counter() - t0,
           "settings": {"local_steps": ns.local_steps, "grad_accum": ns.grad_accum, "lr": ns.lr}}
    out["by_class"] = {}
    for c in CLASSES:
        for m in METHODS:
            rs = [r for r in rows if r["class"] == c and r["method"] == m]
            mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
            out["by_class"][f"{c} {m}"] = {k: mean(k) for k in ("forward_layers", "attn_blocks", "mlp_blocks",
                                                                 "lora_params", "probe_loss_untrained", "local_loss_first",
                                                                 "local_loss_last", "heldout_gain")}
    atomic.write_json(OUT / "plus_blocks.json", out)
    atomic.write_text(OUT / "plus_blocks.md", markdown(out))


def markdown(out: dict) -> str:
    lines = ["# FedPruner vs FedPruner+: what each memory class trains in round 1 (CommonsenseQA, seed "
             f"{out['seed']})", "", "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fedpruner/plus_blocks.py`", "",
             f"Mean over the class's 3 devices. 'untrained submodel loss': answer loss of the device's forward (its plan, "
             f"no training) on its first {out['probe_questions']} local questions. 'held-out gain': the untrained model's "
             f"held-out answer loss ({out['base_heldout_loss']:.3f} on {out['heldout_questions']} validation questions) minus "
             "the full model's after that device's round-1 update alone (higher is better).", "",
             "| class | method | layers in forward | attn blocks | FFN blocks | LoRA params | untrained submodel loss | "
             "local loss first -> last step | held-out gain |", "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for key, r in out["by_class"].items():
        c, m = key.split(" ")
        lines.append(f"| {c} | {m} | {r['forward_layers']:.1f} | {r['attn_blocks']:.1f} | {r['mlp_blocks']:.1f} | "
                     f"{r['lora_params'] / 1e3:.0f} k | {r['probe_loss_untrained']:.3f} | {r['local_loss_first']:.3f} -> "
                     f"{r['local_loss_last']:.3f} | {r['heldout_gain']:+.4f} |")
    lines += ["", f"Settings: {out['settings']}; wall {out['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
