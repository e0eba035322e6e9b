"""Side-by-side pruning benchmark on SmolLM2-135M: COMP, its ablations and its peers.

Every (method, ratio) runs in a fresh subprocess so its peak resident memory is its own:
load the model, note the resident memory, prune with the shared calibration set, note the
peak, then evaluate (WikiText-2 perplexity, the seven-task zero-shot average) and measure
prefill/decode throughput next to the dense model in the same process. Each run writes
``results/runs/<name>.json`` as soon as it finishes (a cut-off benchmark keeps what it
finished; re-running skips finished runs), then ``results/pruning.{json,md,png}`` are
rebuilt from all runs.

    python benchmarks/pruning/run.py                       # the default grid
    python benchmarks/pruning/run.py --only comp@0.2 --eval-limit 50
    python benchmarks/pruning/run.py --nsamples 128 --seq-len 512 --seeds 0,1,2 --seed-methods comp,llm_pruner --ablations '' \
        --methods comp,llm_pruner,wanda_sp_official,flap_official,llm_pruner_official --ratios 0.2,0.3

The calibration seed is part of every result's key (``runs/NAME@RATIO@seedS.json``), so ``--seeds``
runs resume one by one; ``seeds.md`` and ``pruning.json``'s ``by_seed`` give the mean, sample sd,
95 % t-interval and per-seed values over the seeds a row ran with. Perplexity is measured on every
``--ppl-tasks`` dataset (WikiText-2 and PTB by default). ``<peer>_official`` rows run a peer with
``preset=official``: its official code's structure rules *and* calibration sizes (not the
benchmark's ``--nsamples``/``--seq-len``; each row records what it used).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"  # --results-dir overrides

def _registered_peers() -> list[str]:
    from fedprune.pruning import available_methods  # the registry: a new method joins the grid

    return [m for m in available_methods() if m != "comp"]


PEERS = _registered_peers()
# name -> (method, options)
VARIANTS: dict[str, tuple[str, dict]] = {
    "comp": ("comp", {}),
    "comp_no_mask_tuning": ("comp", {"mask_tuning": False}),
    "comp_layers_only": ("comp", {"layer_fraction": 1.0}),
    "comp_neurons_only": ("comp", {"layer_fraction": 0.0}),
    "comp_uniform_allocation": ("comp", {"allocation_strength": 0.0}),
    "comp_with_heads": ("comp", {"head_sparsity": None}),
    "comp_metric_energy": ("comp", {"neuron_metric": "energy"}),  # the default since the full protocol
    # the neuron criterion that was the default before (its full-protocol rows keep their seeds)
    "comp_metric_rescale_obs": ("comp", {"neuron_metric": "rescale_obs"}),
    "comp_metric_rescale_obs_no_mask_tuning": ("comp", {"neuron_metric": "rescale_obs", "mask_tuning": False}),
    "comp_metric_rescale_obs_mask_local_bias": ("comp", {"neuron_metric": "rescale_obs", "mask_target": "local",
                                                         "mask_bias": True}),
    "comp_metric_vif": ("comp", {"neuron_metric": "vif"}),
    "comp_metric_compensated": ("comp", {"neuron_metric": "compensated"}),
    "comp_metric_top_eig_energy": ("comp", {"neuron_metric": "top_eig_energy"}),
    "comp_metric_cond_greedy": ("comp", {"neuron_metric": "cond_greedy"}),
    # mask-tuning variants (mask_tuning.py): target, joint bias, damping fallback / held-out damping
    "comp_mask_global": ("comp", {"mask_target": "global"}),  # the default before the local target
    "comp_mask_local": ("comp", {"mask_target": "local"}),
    "comp_mask_global_bias": ("comp", {"mask_target": "global", "mask_bias": True}),
    "comp_mask_local_bias": ("comp", {"mask_target": "local", "mask_bias": True}),
    "comp_mask_local_bias_heldout": ("comp", {"mask_target": "local", "mask_bias": True, "mask_damp": "heldout",
                                              "mask_fallback": "retry"}),
    "comp_mask_retry": ("comp", {"mask_fallback": "retry"}),
    "comp_with_heads_mask_global": ("comp", {"head_sparsity": None, "mask_target": "global"}),
    "comp_with_heads_no_mask_tuning": ("comp", {"head_sparsity": None, "mask_tuning": False}),
    "comp_with_heads_local_bias": ("comp", {"head_sparsity": None, "mask_target": "local", "mask_bias": True}),
    "comp_heads_auto": ("comp", {"head_sparsity": "auto"}),  # each layer: heads only where cheaper than channels
    **{p: (p, {}) for p in PEERS},
}


def _official_peers() -> list[str]:
    """Peers whose options take ``preset``: each also runs as ``<peer>_official`` (its official code's
    structure rules and calibration sizes, :mod:`fedprune.pruning.methods.presets`)."""
    from fedprune.pruning import METHODS

    return [p for p in PEERS if "preset" in {f.name for f in dataclasses.fields(METHODS.get(p).options)}]


OFFICIAL = [f"{p}_official" for p in _official_peers()]
VARIANTS.update({f"{p}_official": (p, {"preset": "official"}) for p in _official_peers()})
ABLATIONS = [k for k in VARIANTS if k.startswith("comp_")]


def calibration(method: str | None, opts: dict, args) -> tuple[int, int]:
    """Calibration windows and length of a run: the benchmark's (``--nsamples``/``--seq-len``), except
    for an ``official`` preset, which brings its code's own sizes (every row says which it used)."""
    if method is None or opts.get("preset") != "official":
        return args.nsamples, args.seq_len
    reduced = parse_sizes(getattr(args, "official_calibration", "") or "")
    if method in reduced:  # a reduced official calibration (SLEB's 128 x 2048 takes hours on a CPU)
        return reduced[method]
    from fedprune.pruning import method_options
    from fedprune.pruning.methods import calibration_sizes

    return calibration_sizes(method_options(method, opts), None, None)


def parse_sizes(text: str) -> dict[str, tuple[int, int]]:
    """``"sleb=8x2048,flap=256x128"`` -> ``{"sleb": (8, 2048), "flap": (256, 128)}``; a bad entry is refused by name."""
    out = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, _, size = item.partition("=")
        n, _, length = size.partition("x")
        if not (name and n.isdigit() and length.isdigit() and int(n) > 0 and int(length) > 0):
            raise SystemExit(f"--official-calibration: {item!r} is not PEER=NxLEN (for example sleb=8x2048)")
        out[name] = (int(n), int(length))
    return out


def run_path(name: str, ratio: float, seed: int) -> Path:
    """One result file per (variant, ratio, calibration seed)."""
    return RESULTS / "runs" / f"{name}@{ratio}@seed{seed}.json"


def worker(args) -> dict:
    import torch

    import fedprune
    from fedprune.evaluate import evaluate, speed
    from fedprune.memory_usage import current_rss_bytes, peak_rss_bytes, reset_peak_rss
    from fedprune.pruning import prune

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    method, opts = VARIANTS[args.name] if args.name != "dense" else (None, {})
    tok = fedprune.load_tokenizer(args.model)
    model = fedprune.load_model(args.model)
    # copy weights out of the safetensors memory map so resident memory reflects the model
    for p in model.parameters():
        p.data = p.data.clone()
    import gc

    gc.collect()
    nsamples, seq_len = calibration(method, opts, args)
    rec: dict = {"name": args.name, "method": method, "ratio": args.ratio, "options": opts, "seed": args.seed,
                 "calibration": {"corpus": "c4", "nsamples": nsamples, "seq_len": seq_len, "seed": args.seed}}
    dense_speed = None if args.ppl_only else speed(model, tok, prompt_len=args.prompt_len, gen_len=args.gen_len,
                                                   repeats=args.repeats)
    if method is not None:
        from fedprune.pruning import get_calibration

        calib = get_calibration(tok, "c4", nsamples, seq_len, args.seed)
        import gc

        gc.collect()
        rss_loaded = current_rss_bytes()
        reset_peak_rss()  # the peak is the pruning step's own
        res = prune(model, method, args.ratio, calib_ids=calib, **opts)
        peak = peak_rss_bytes()
        rec.update(achieved_ratio=res.achieved_ratio, params_before=res.params_before, params_after=res.params_after,
                   prune_wall_s=res.wall_time_s, rss_after_load=rss_loaded, prune_peak_rss=peak,
                   prune_overhead_bytes=peak - rss_loaded,
                   removed_layers=res.report.get("removed_layers"), layer_fraction=res.report.get("layer_fraction"))
        if "layers" in res.report:  # COMP's per-layer record: units kept, mask-tuning errors and scales
            rec["layers"] = res.report["layers"]
    # perplexity over the first N windows, zero-shot over the first M examples per task
    if args.no_eval:
        rec["speed"] = dense_speed
        return rec
    def measure_speed() -> dict:
        sp = speed(model, tok, prompt_len=args.prompt_len, gen_len=args.gen_len, repeats=args.repeats)
        return dict(speed=sp, dense_speed=dense_speed,
                    prefill_speedup=sp["prefill_tokens_per_s"] / dense_speed["prefill_tokens_per_s"],
                    decode_speedup=sp["decode_tokens_per_s"] / dense_speed["decode_tokens_per_s"])

    if args.speed_only:
        rec.update(measure_speed())
        return rec
    ppl_tasks = [t for t in args.ppl_tasks.split(",") if t]
    ppl = evaluate(model, tok, tasks=ppl_tasks, seq_len=512, limit=args.ppl_windows, progress=False)
    rec.update({f"{t}_ppl": ppl["results"][t]["ppl"] for t in ppl_tasks})
    if args.ppl_only:
        rec.update(settings={"ppl_windows": args.ppl_windows, "ppl_seq_len": 512, "ppl_tasks": ppl_tasks,
                             "threads": args.threads})
        return rec
    zs = evaluate(model, tok, tasks=args.tasks, seq_len=512, limit=args.eval_limit, batch_size=args.batch_size,
                  progress=False, log_samples=True)
    rec.update(zero_shot=zs["results"], zero_shot_avg=zs["average"], **measure_speed(),
               zero_shot_correct={t: s["correct"] for t, s in zs["samples"].items()},  # for paired comparisons
               settings={"ppl_windows": args.ppl_windows, "ppl_seq_len": 512, "ppl_tasks": ppl_tasks,
                         "eval_limit": args.eval_limit,
                         "tasks": args.tasks, "threads": args.threads})
    return rec


def run_one(args, name: str, ratio: float, seed: int) -> dict | None:
    out = run_path(name, ratio, seed)
    legacy = RESULTS / "runs" / f"{name}@{ratio}.json"  # before the seed was part of the key: seed 0
    if not args.force:
        if out.exists():
            return json.loads(out.read_text())
        if seed == 0 and legacy.exists():
            return json.loads(legacy.read_text())
    cmd = [sys.executable, __file__, "--worker", "--name", name, "--ratio", str(ratio),
           "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len), "--seed", str(seed),
           "--ppl-windows", str(args.ppl_windows), "--ppl-tasks", args.ppl_tasks, "--eval-limit", str(args.eval_limit),
           "--tasks", args.tasks, "--threads", str(args.threads), "--model", args.model,
           "--official-calibration", args.official_calibration]
    if args.no_eval:
        cmd.append("--no-eval")
    if args.speed_only:
        cmd.append("--speed-only")
    if args.ppl_only:
        cmd.append("--ppl-only")
    cmd += ["--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len), "--repeats", str(args.repeats)]
    t0 = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {name} @ {ratio}, seed {seed} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["wall_s_total"] = time.time() - t0
    from fedprune import atomic

    atomic.write_json(out, rec)
    print(f"   ppl {rec.get('wikitext2_ppl', float('nan')):.2f} avg {rec.get('zero_shot_avg') or float('nan'):.4f} "
          f"ratio {rec.get('achieved_ratio', 0):.4f} peak {rec.get('prune_peak_rss', 0) / 2**20:.0f} MiB "
          f"in {rec['wall_s_total']:.0f}s", flush=True)
    return rec


def table(records: list[dict]) -> str:
    head = ("| method | ratio | seed | achieved | WikiText-2 ppl | PTB ppl | 7-task avg | prune time (s) | prune peak RSS (MiB) "
            "| overhead (MiB) | prefill x | decode x |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in sorted(records, key=lambda r: (r["ratio"], r["name"], r.get("calibration", {}).get("seed", 0))):
        mib = lambda b: f"{b / 2**20:.0f}" if b is not None else "-"
        ptb = f"{r['ptb_ppl']:.2f}" if r.get("ptb_ppl") is not None else "-"
        rows.append(f"| {r['name']} | {ratio_text(r['ratio'])} | {r.get('calibration', {}).get('seed', 0)} | "
                    f"{r.get('achieved_ratio', 0):.4f} | {r['wikitext2_ppl']:.2f} | {ptb} | "
                    f"{r['zero_shot_avg']:.4f} | {r.get('prune_wall_s', 0):.0f} | {mib(r.get('prune_peak_rss'))} | "
                    f"{mib(r.get('prune_overhead_bytes'))} | {r['prefill_speedup']:.2f} | {r['decode_speedup']:.2f} |")
    return head + "\n".join(rows) + "\n"


def memory_table(records: list[dict], args) -> str:
    dense = next((r for r in records if r["name"] == "dense"), None)
    lines = [f"Pruning memory, calibration {args.nsamples} x {args.seq_len} tokens (C4): resident memory of the "
             "pruning process right after loading the model, its peak while pruning (VmHWM), and the overhead "
             "(peak minus after-load).\n", "| method | ratio | after load (MiB) | peak (MiB) | overhead (MiB) | "
             "peak / dense inference peak | wall (s) |", "|---|---|---|---|---|---|---|"]
    ref = dense["speed"]["peak_memory_bytes"] if dense else None
    for r in records:
        if r["name"] == "dense":
            continue
        rel = f"{r['prune_peak_rss'] / ref:.2f}" if ref else "-"
        lines.append(f"| {r['name']} | {r['ratio']} | {r['rss_after_load'] / 2**20:.0f} | {r['prune_peak_rss'] / 2**20:.0f} "
                     f"| {r['prune_overhead_bytes'] / 2**20:.0f} | {rel} | {r['prune_wall_s']:.0f} |")
    if dense:
        lines.append(f"\nDense inference peak (speed test: prefill {dense['speed']['prompt_len']} + decode "
                     f"{dense['speed']['gen_len']} tokens): {ref / 2**20:.0f} MiB.")
    return "\n".join(lines) + "\n"


def speed_table(records: list[dict], args) -> str:
    lines = [f"Prefill {args.prompt_len} tokens and decode {args.gen_len} tokens, batch 1, {args.threads} CPU "
             f"thread(s), median of {args.repeats}, one run at a time; each pruned model is measured next to the "
             "dense model in the same process.\n",
             "| method | ratio | achieved | prefill tok/s (dense -> pruned) | prefill x | decode tok/s (dense -> pruned) "
             "| decode x | peak memory MiB (dense -> pruned) |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["name"] == "dense" or "speed" not in r:
            continue
        d, q = r["dense_speed"], r["speed"]
        lines.append(f"| {r['name']} | {r['ratio']} | {r['achieved_ratio']:.4f} | {d['prefill_tokens_per_s']:.0f} -> "
                     f"{q['prefill_tokens_per_s']:.0f} | {r['prefill_speedup']:.2f} | {d['decode_tokens_per_s']:.1f} -> "
                     f"{q['decode_tokens_per_s']:.1f} | {r['decode_speedup']:.2f} | {d['peak_memory_bytes'] / 2**20:.0f} -> "
                     f"{q['peak_memory_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def _mask_rows(r: dict) -> list[str]:
    rows = []
    for e in r.get("layers") or []:
        for site in ("heads_mask", "ffn_mask"):
            m = e.get(site)
            if not m:
                continue
            ho = m.get("held_out") or m["in_sample"]
            g, f = ho["global"], ho["fixable"]
            rows.append(f"| {e['layer']} | {site.split('_')[0]} | {'yes' if m['accepted'] else m['reason']} | "
                        f"{m['damp'] if m['damp'] is None else format(m['damp'], '.3g')} | {g[0]:.3g} | {g[1]:.3g} | {f[0]:.3g} | {f[1]:.3g} | "
                        f"{100 * m['fixable_share_removed']:.1f} | {m.get('scale_min', 1):.2f}..{m.get('scale_max', 1):.2f} |")
    return rows


def ablation_table(records: list[dict], args) -> str:
    """Perplexity per run, then each COMP run's per-layer mask-tuning errors (held-out batches)."""
    lines = [f"SmolLM2-135M-Instruct, calibration C4 {args.nsamples} x {args.seq_len} tokens (seeds {seeds_text(args)}; "
             f"`official` presets: their own sizes, per row in the JSON); perplexity at seq-len 512 over the first "
             f"{args.ppl_windows} windows.\n",
             "| run | ratio | seed | calibration | achieved | WikiText-2 ppl | PTB ppl | options |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["ratio"], r["name"], r.get("calibration", {}).get("seed", 0))):
        ptb = f"{r['ptb_ppl']:.2f}" if r.get("ptb_ppl") is not None else "-"
        c = r.get("calibration", {})
        lines.append(f"| {r['name']} | {r['ratio']:.4g} | {c.get('seed', 0)} | {c.get('nsamples', '-')} x "
                     f"{c.get('seq_len', '-')} | {r.get('achieved_ratio', 0):.4f} | {r['wikitext2_ppl']:.2f} | {ptb} | "
                     f"`{json.dumps(r.get('options', {}))}` |")
    for r in sorted(records, key=lambda r: (r["ratio"], r["name"])):
        rows = _mask_rows(r)
        if rows:
            lines += [f"\n### {r['name']} @ {r['ratio']}: mask tuning per layer (errors on held-out calibration "
                      "batches: global = vs the dense model's output, fixable = vs the dense module on the same "
                      "pruned inputs; share = fixable error removed)\n",
                      "| layer | site | accepted | damp | global before | global after | fixable before | "
                      "fixable after | share % | scales |", "|---|---|---|---|---|---|---|---|---|---|", *rows]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({r["name"] for r in records if r["name"] in ["comp"] + PEERS + OFFICIAL})
    dense = next((r for r in records if r["name"] == "dense"), None)
    by_seed = seed_statistics(records)  # one point per (method, ratio): the mean over its seeds
    for n in names:
        rs = [r for r in by_seed if r["name"] == n and r.get("zero_shot_avg") and r.get("wikitext2_ppl")]
        xs = [r["ratio"] for r in rs]
        axes[0].plot(xs, [r["zero_shot_avg"]["mean"] for r in rs], marker="o", label=n)
        axes[1].plot(xs, [r["wikitext2_ppl"]["mean"] for r in rs], marker="o", label=n)
    if dense:
        axes[0].axhline(dense["zero_shot_avg"], color="k", ls="--", lw=0.8, label="dense")
        axes[1].axhline(dense["wikitext2_ppl"], color="k", ls="--", lw=0.8, label="dense")
    axes[0].set(xlabel="pruning ratio (of all parameters)", ylabel="7-task zero-shot average", title="accuracy")
    axes[1].set(xlabel="pruning ratio (of all parameters)", ylabel="WikiText-2 perplexity (log)", yscale="log",
                title="perplexity")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summarise(args) -> None:
    from fedprune import atomic

    records = [json.loads(p.read_text()) for p in sorted((RESULTS / "runs").glob("*.json"))]
    if not records:
        return
    if args.no_eval:
        atomic.write_json(RESULTS / "memory.json", {"settings": vars(args), "runs": records})
        atomic.write_text(RESULTS / "memory.md", memory_table(records, args))
        return
    by_seed = seed_statistics(records)
    paired = paired_effects(records)
    if any(len(r["seeds"]) > 1 for r in by_seed):
        md = "Mean +- sample sd [95 % t-interval] over calibration seeds.\n\n" + seed_table(by_seed)
        if paired:
            md += ("\nPaired by calibration seed (variant and reference pruned from the same windows): mean "
                   "[95 % t-interval]; 'better' when the whole interval is above zero.\n\n" + paired_table(paired))
        atomic.write_text(RESULTS / "seeds.md", md)
    if args.ppl_only:
        atomic.write_json(RESULTS / "ablation.json", {"settings": vars(args), "runs": records, "by_seed": by_seed,
                                                  "paired": paired})
        atomic.write_text(RESULTS / "ablation.md", ablation_table(records, args))
        return
    if args.speed_only:
        atomic.write_json(RESULTS / "speed.json", {"settings": vars(args), "runs": records})
        atomic.write_text(RESULTS / "speed.md", speed_table(records, args))
        return
    md = (f"SmolLM2-135M-Instruct, calibration C4 {args.nsamples} x {args.seq_len} tokens (seeds {seeds_text(args)}; "
          "`official` presets: their own sizes, per row in the JSON); "
          f"perplexity ({args.ppl_tasks}) at seq-len 512 over the first {args.ppl_windows} windows; zero-shot average of "
          f"the seven tasks over the first {args.eval_limit} examples each (--limit); speed: prefill "
          f"{args.prompt_len} tokens, decode {args.gen_len} tokens, batch 1, {args.threads} CPU threads, "
          "ratios relative to the dense model in the same process. " + cpu_time_text(records) + "\n\n"
          + table(records))
    versus = versus_peers(by_seed, records)
    if versus:
        md += ("\nCOMP against every peer at the same requested ratio (the peer's achieved ratio in brackets; a "
               "peer that removes less meets the COMP row removing least while removing at least as much, 'COMP at'). "
               "Perplexity: a verdict only when the 95 % t-intervals over seeds (one seed: the value) do not overlap. "
               "7-task average: COMP minus peer, +- the standard error of the difference, paired over the examples "
               "where both runs logged their per-example answers (example noise only), else unpaired (conservative); "
               "a verdict only beyond 2 standard errors.\n\n" + versus_table(versus))
    atomic.write_json(RESULTS / "pruning.json", {"settings": vars(args), "runs": records, "by_seed": by_seed,
                                                 "paired": paired, "versus_peers": versus})
    atomic.write_text(RESULTS / "pruning.md", md)
    plot(records, RESULTS / "pruning.png")


def seeded_jobs(jobs: list[tuple[str, float]], seeds: list[int], seed_methods: list[str] | None = None
                ) -> list[tuple[str, float, int]]:
    """(name, ratio, seed) for every job: the first seed for all, then the further seeds for
    ``seed_methods`` (all when None; the dense model's perplexity does not depend on the seed), so a
    cut-off benchmark has every row once before any row twice."""
    out = [(n, r, seeds[0]) for n, r in jobs]
    for s in seeds[1:]:
        out += [(n, r, s) for n, r in jobs if n != "dense" and (seed_methods is None or n in seed_methods)]
    return out


def seed_statistics(records: list[dict]) -> list[dict]:
    """Per (variant, ratio): mean, sample sd, 95 % t-interval and per-seed values of every metric
    over the calibration seeds it ran with (one seed: the value, no interval)."""
    from fedprune.federated import stats

    groups: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        groups.setdefault((r["name"], r["ratio"]), []).append(r)
    out = []
    for (name, ratio), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rs = sorted(rs, key=lambda r: r.get("calibration", {}).get("seed", 0))
        row = {"name": name, "ratio": ratio, "seeds": [r.get("calibration", {}).get("seed", 0) for r in rs],
               "achieved_ratio": rs[0].get("achieved_ratio"), "calibration": rs[0].get("calibration")}
        for key in ("wikitext2_ppl", "ptb_ppl", "zero_shot_avg"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if len(vals) != len(rs) or not vals:
                continue
            row[key] = {**stats.t_interval(vals), "per_seed": {str(s): v for s, v in zip(row["seeds"], vals)}}
        out.append(row)
    return out


# (variant, reference): the comparisons the seeds exist for - what mask tuning adds, what its local + bias
# form adds over the default, and the default neuron criterion (energy) against the one before it
PAIRED = (("comp", "comp_no_mask_tuning"), ("comp_mask_local_bias", "comp_no_mask_tuning"),
          ("comp_mask_local_bias", "comp"), ("comp", "comp_metric_rescale_obs"),
          ("comp_metric_rescale_obs", "comp_metric_rescale_obs_no_mask_tuning"),
          ("comp_metric_rescale_obs_mask_local_bias", "comp_metric_rescale_obs_no_mask_tuning"),
          ("comp_metric_rescale_obs_mask_local_bias", "comp_metric_rescale_obs"))
# (metric, effect name, effect of variant v over reference b): positive when the variant is better
PAIRED_EFFECTS = (("wikitext2_ppl", "wikitext2_ppl_reduction_pct", lambda v, b: 100 * (b - v) / b),
                  ("ptb_ppl", "ptb_ppl_reduction_pct", lambda v, b: 100 * (b - v) / b),
                  ("zero_shot_avg", "zero_shot_gain_points", lambda v, b: 100 * (v - b)))


def paired_effects(records: list[dict], pairs=PAIRED) -> list[dict]:
    """Per (variant, reference, ratio) with a common calibration seed: the paired 95 % t-interval of
    the perplexity reduction in % (``100 * (ref - variant) / ref``, positive when the variant is
    better) and of the 7-task average gain in points, over the seeds both ran with. A variant and its
    reference share the calibration windows of a seed, so the pairing removes the seed's own effect."""
    from fedprune.federated import stats

    by = {(r["name"], r["ratio"], r.get("calibration", {}).get("seed", 0)): r for r in records}
    out = []
    for variant, ref in pairs:
        for ratio in sorted({k[1] for k in by if k[0] == variant}):
            seeds = sorted(s for (n, r, s) in by if n == variant and r == ratio and (ref, ratio, s) in by)
            if not seeds:
                continue
            row = {"variant": variant, "reference": ref, "ratio": ratio, "seeds": seeds}
            for key, name, effect in PAIRED_EFFECTS:
                vb = [(by[(variant, ratio, s)].get(key), by[(ref, ratio, s)].get(key)) for s in seeds]
                if all(v is not None and b is not None for v, b in vb):  # a missing value: no interval
                    row[name] = stats.t_interval([effect(v, b) for v, b in vb])
            out.append(row)
    return out


def paired_table(rows: list[dict]) -> str:
    def cell(m):
        if not m:
            return "-"
        if m.get("low") is None:
            return f"{m['mean']:+.2f}"
        verdict = "better" if m["low"] > 0 else ("worse" if m["high"] < 0 else "no difference")
        return f"{m['mean']:+.2f} [{m['low']:+.2f}, {m['high']:+.2f}] {verdict}"

    lines = ["| variant | reference | ratio | seeds | WikiText-2 ppl reduction % | PTB ppl reduction % | 7-task avg gain (points) |",
             "|---|---|---:|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['reference']} | {ratio_text(r['ratio'])} | {','.join(map(str, r['seeds']))} | "
                     f"{cell(r.get('wikitext2_ppl_reduction_pct'))} | {cell(r.get('ptb_ppl_reduction_pct'))} | "
                     f"{cell(r.get('zero_shot_gain_points'))} |")
    return "\n".join(lines) + "\n"


def versus_peers(by_seed: list[dict], records: list[dict], reference: str = "comp") -> list[dict]:
    """Per ratio: COMP (``reference``) against every peer row, from the seed statistics. A peer whose
    structure rules remove less than it was asked (an official preset) meets the COMP row that removes
    least while removing at least as much as the peer achieved (:func:`reference_ratio_for`), so a
    verdict for COMP never rests on COMP keeping more parameters.

    Perplexity: 'reference better' when the peer's 95 % interval (its value, with one seed) lies wholly
    above the reference's, 'peer better' when wholly below, else 'no difference'. 7-task average: the
    difference in points and its standard error, paired over the examples where both sides logged
    them (:func:`paired_by_example`), else that of an unpaired difference of two averages over the
    same ``n`` examples, ``se = sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n)`` (conservative: both rows answer
    the same questions); a verdict only beyond 2 se."""
    n_examples = {}
    for r in records:
        limit = (r.get("settings") or {}).get("eval_limit")
        if limit and r.get("zero_shot"):
            n_examples[(r["name"], r["ratio"])] = limit * len(r["zero_shot"])
    rows = {(r["name"], r["ratio"]): r for r in by_seed}
    peers = set(PEERS) | set(OFFICIAL)
    out = []
    for (name, ratio), peer in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        achieved = peer.get("achieved_ratio")
        ref_ratio = reference_ratio_for(ratio, achieved, [r for (n, r) in rows if n == reference])
        ref = rows.get((reference, ref_ratio))
        if name not in peers or ref is None:
            continue
        row = {"ratio": ratio, "reference": reference, "reference_ratio": ref_ratio, "peer": name,
               "reference_seeds": ref["seeds"], "peer_seeds": peer["seeds"], "peer_achieved_ratio": achieved}
        for key in ("wikitext2_ppl", "ptb_ppl"):
            a, b = ref.get(key), peer.get(key)
            if not a or not b:
                continue
            lo = lambda m: m["mean"] if m.get("low") is None else m["low"]  # noqa: E731
            hi = lambda m: m["mean"] if m.get("high") is None else m["high"]  # noqa: E731
            verdict = ("reference better" if lo(b) > hi(a) else "peer better" if hi(b) < lo(a) else "no difference")
            row[key] = {"reference": a["mean"], "peer": b["mean"], "verdict": verdict}
        a, b = ref.get("zero_shot_avg"), peer.get("zero_shot_avg")
        n = n_examples.get((reference, ref_ratio)) or n_examples.get((name, ratio))
        paired = paired_by_example([r for r in records if (r["name"], r["ratio"]) == (reference, ref_ratio)],
                                   [r for r in records if (r["name"], r["ratio"]) == (name, ratio)])
        if a and b and (paired or n):
            p1, p2 = a["mean"], b["mean"]
            if paired:
                diff, se, n = paired["diff"], paired["se"], paired["examples"]
            else:
                diff, se = p1 - p2, math.sqrt(p1 * (1 - p1) / n + p2 * (1 - p2) / n)
            row["zero_shot_avg"] = {
                "reference": p1, "peer": p2, "diff_points": 100 * diff, "se_points": 100 * se, "examples": n,
                "paired": bool(paired), **({"paired_runs": paired["runs"]} if paired else {}),
                "verdict": "reference better" if diff > 2 * se else "peer better" if diff < -2 * se else "no difference"}
        out.append(row)
    return out


def reference_ratio_for(ratio: float, achieved: float | None, reference_ratios: list[float],
                        tol: float = 5e-4) -> float:
    """The reference (COMP) row a peer asked for ``ratio`` meets: when the peer removed less
    (``achieved`` below ``ratio`` by more than ``tol``), the smallest reference ratio that is at least
    ``achieved - tol`` and at most ``ratio`` (its achieved ratio itself where COMP ran there); otherwise,
    or when no such row exists, ``ratio``."""
    if achieved is None or achieved >= ratio - tol:
        return ratio
    fits = [r for r in reference_ratios if achieved - tol <= r <= ratio + tol]
    return min(fits) if fits else ratio


def paired_by_example(reference: list[dict], peer: list[dict]) -> dict | None:
    """The 7-task average of ``reference`` minus ``peer`` and its standard error, paired over examples.

    Each run may carry ``zero_shot_correct`` (task -> ``"0110..."``, one character per example). Per
    example, a side's score is its mean correctness over its runs (its calibration seeds); with
    ``d_ti`` the reference's minus the peer's on example ``i`` of task ``t`` (``n_t`` examples, ``T``
    tasks), ``diff = (1/T) sum_t mean_i d_ti`` (the difference of the macro averages) and
    ``se = (1/T) sqrt(sum_t var_i(d_ti) / n_t)``: the example-sampling noise of a paired difference,
    not the seeds' (a peer with one seed has no seed interval). Only runs that logged their answers
    count (``runs`` says how many per side); None unless both sides have one and all of them logged the
    same tasks with the same number of examples."""
    reference = [r for r in reference if r.get("zero_shot_correct")]
    peer = [r for r in peer if r.get("zero_shot_correct")]
    runs = reference + peer
    if not reference or not peer:
        return None
    tasks = sorted(reference[0]["zero_shot_correct"])
    lengths = {t: len(reference[0]["zero_shot_correct"][t]) for t in tasks}
    if any(sorted(r["zero_shot_correct"]) != tasks or any(len(r["zero_shot_correct"][t]) != lengths[t] for t in tasks)
           for r in runs) or min(lengths.values(), default=0) < 2:
        return None

    def mean_bits(rs, t):
        return [sum(r["zero_shot_correct"][t][i] == "1" for r in rs) / len(rs) for i in range(lengths[t])]

    diff = var = 0.0
    for t in tasks:
        d = [x - y for x, y in zip(mean_bits(reference, t), mean_bits(peer, t))]
        mean = sum(d) / len(d)
        diff += mean
        var += sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)
    return {"diff": diff / len(tasks), "se": math.sqrt(var) / len(tasks), "examples": sum(lengths.values()),
            "runs": [len(reference), len(peer)]}


def versus_table(rows: list[dict]) -> str:
    def ppl(m):
        return "-" if not m else f"{m['reference']:.2f} vs {m['peer']:.2f}: {m['verdict']}"

    def avg(m):
        if not m:
            return "-"
        how = f"paired, runs {m['paired_runs'][0]}/{m['paired_runs'][1]}" if m.get("paired") else "unpaired"
        return (f"{m['reference']:.4f} vs {m['peer']:.4f} ({m['diff_points']:+.1f} +- {m['se_points']:.1f} points, "
                f"{how}): {m['verdict']}")

    lines = ["| ratio | peer (achieved) | COMP at | seeds (COMP / peer) | WikiText-2 ppl | PTB ppl | 7-task avg |",
             "|---:|---|---:|---|---|---|---|"]
    for r in rows:
        ach = f" ({r['peer_achieved_ratio']:.3f})" if r.get("peer_achieved_ratio") is not None else ""
        lines.append(f"| {ratio_text(r['ratio'])} | {r['peer']}{ach} | {r['reference_ratio']:.4g} | "
                     f"{','.join(map(str, r['reference_seeds']))} / "
                     f"{','.join(map(str, r['peer_seeds']))} | {ppl(r.get('wikitext2_ppl'))} | "
                     f"{ppl(r.get('ptb_ppl'))} | {avg(r.get('zero_shot_avg'))} |")
    return "\n".join(lines) + "\n"


def ratio_text(ratio: float) -> str:
    """A requested ratio in a table: two decimals, or as many as it has (0.095 must not read 0.10)."""
    return f"{ratio:.2f}" if round(ratio, 2) == ratio else f"{ratio:.4g}"


def process_cpu_seconds() -> float:
    """User plus system CPU seconds of this process and its waited-for children, all threads."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_time_text(records: list[dict]) -> str:
    """What the whole benchmark cost: the sum of its runs' wall times (runs side by side overlap in real
    time) and, for the runs whose worker reported it, their CPU time (``cpu_s_total``)."""
    total = sum(r.get("wall_s_total") or 0 for r in records)
    text = f"{len(records)} runs, {total / 3600:.1f} h of wall time in all (sum of the runs' `wall_s_total`)"
    timed = [r for r in records if r.get("cpu_s_total") is not None]
    if timed:
        cpu = sum(r["cpu_s_total"] for r in timed) / 3600
        wall = sum(r.get("wall_s_total") or 0 for r in timed) / 3600
        text += (f"; the {len(timed)} runs that measured it used {cpu:.1f} h of CPU time over {wall:.1f} h of "
                 "wall time (`cpu_s_total`)")
    return text + "."


def seeds_text(args) -> str:
    return args.seeds or str(args.seed)


def seed_table(rows: list[dict]) -> str:
    def cell(m, spec):
        if not m:
            return "-"
        txt = format(m["mean"], spec)
        if m.get("low") is not None:
            txt += f" +- {format(m['sd'], spec)} [{format(m['low'], spec)}, {format(m['high'], spec)}]"
        return txt

    lines = ["| variant | ratio | seeds | calibration | WikiText-2 ppl | PTB ppl | 7-task avg | per seed (WikiText-2) |",
             "|---|---:|---|---|---|---|---|---|"]
    for r in rows:
        c = r.get("calibration") or {}
        per = " / ".join(f"{v:.2f}" for v in (r.get("wikitext2_ppl") or {}).get("per_seed", {}).values())
        lines.append(f"| {r['name']} | {ratio_text(r['ratio'])} | {','.join(map(str, r['seeds']))} | "
                     f"{c.get('nsamples', '-')} x {c.get('seq_len', '-')} | {cell(r.get('wikitext2_ppl'), '.2f')} | "
                     f"{cell(r.get('ptb_ppl'), '.2f')} | {cell(r.get('zero_shot_avg'), '.4f')} | {per or '-'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--name", default="comp")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    ap.add_argument("--methods", default="comp," + ",".join(PEERS))
    ap.add_argument("--ablations", default=",".join(ABLATIONS), help="COMP variants, run at --ablation-ratios")
    ap.add_argument("--ablation-ratios", default="0.2")
    ap.add_argument("--only", default=None, help="comma list of NAME@RATIO to run")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="the calibration seed (one; --seeds for several)")
    ap.add_argument("--seeds", default=None, help="comma list of calibration seeds: every run once per seed")
    ap.add_argument("--seed-methods", default=None,
                    help="with --seeds: only these variants run at every seed, the others at the first only")
    ap.add_argument("--ppl-windows", type=int, default=20)
    ap.add_argument("--ppl-tasks", default="wikitext2,ptb", help="perplexity datasets (comma list)")
    ap.add_argument("--eval-limit", type=int, default=50)
    ap.add_argument("--tasks", default="boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side (speed figures then share the CPU)")
    ap.add_argument("--no-eval", action="store_true", help="prune only (for the memory comparison)")
    ap.add_argument("--speed-only", action="store_true",
                    help="prune, then measure prefill/decode speed against the dense model (no evaluation)")
    ap.add_argument("--ppl-only", action="store_true",
                    help="prune, then WikiText-2 perplexity only (no zero-shot, no speed); for ablations")
    ap.add_argument("--results-dir", default=None, help="where runs and tables go (default: results/)")
    ap.add_argument("--official-calibration", default="",
                    help="reduced calibration for official presets, PEER=NxLEN list (e.g. sleb=8x2048); each row "
                         "records the calibration it used")
    args = ap.parse_args()
    global RESULTS
    if args.results_dir:
        RESULTS = Path(args.results_dir)
    parse_sizes(args.official_calibration)  # refused before any run
    if args.worker:
        rec = worker(args)
        rec["cpu_s_total"] = process_cpu_seconds()
        print(json.dumps(rec, default=float))
        return
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    jobs = [("dense", 0.0)]
    if args.only:
        jobs = [(j.split("@")[0], float(j.split("@")[1])) for j in args.only.split(",")]
    else:
        # the headline ratios first, so a cut-off run still answers the main questions
        ratios = sorted((float(r) for r in args.ratios.split(",")), key=lambda r: (r not in (0.2, 0.3), r))
        for r in ratios:
            jobs += [(m, r) for m in args.methods.split(",") if m]
        for r in [float(x) for x in args.ablation_ratios.split(",") if x]:
            jobs += [(a, r) for a in args.ablations.split(",") if a]
    jobs = seeded_jobs(jobs, seeds, args.seed_methods.split(",") if args.seed_methods else None)
    if args.jobs <= 1:
        for name, ratio, seed in jobs:
            run_one(args, name, ratio, seed)
            summarise(args)
        return
    # independent subprocesses side by side (each still measures its own peak memory)
    import threading
    from concurrent.futures import ThreadPoolExecutor

    lock = threading.Lock()

    def one(job):
        run_one(args, *job)
        with lock:
            summarise(args)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, jobs))


if __name__ == "__main__":
    main()
