"""Size, quality and speed of pruned and quantized SmolLM2-135M in llama.cpp: does pruning pay on top of quantization?

    python benchmarks/deploy/run.py                    # every stage; resumes what is already done
    python benchmarks/deploy/run.py --stage quality    # one stage (prune, export, quality, speed, report)

Models (``--work``, default ``outputs/deploy/``; checkpoints and GGUF files are reused when present):
``dense``; COMP at ``--ratios`` (default 20/30/50 %) without and with ``-o width_multiple=N`` for each N of
``--width-multiple``
(``comp-30-w256``: every pruned layer's kept FFN width a multiple of 256, llama.cpp's k-quant block,
so ``down_proj`` rows quantize as k-quants; SmolLM2's attention width cannot be rounded to 256 - 3, 6
or 9 heads of 64 - and its 576-wide hidden rows fall back in the dense model too); the ``--peer`` pruner at
``--peer-ratio`` (default LLM-Pruner at 30 %, the best peer at 30 % in ``benchmarks/pruning``). All pruned
with C4 calibration ``--nsamples`` x ``--seq-len`` tokens, seed 0.

Each model is exported to every ``--outtypes`` type (f16, q8_0, q6_k, q5_k_m, q4_k_m by default; the
k-quants by llama.cpp's own quantizer, through ``fedprune export``'s API), then measured, every
measurement in a fresh process:

- export: file bytes, effective bits per weight, tensors that fell back to another type;
- quality: perplexity computed from llama.cpp's logits over the first ``--ppl-windows`` non-overlapping
  WikiText-2 windows of ``--ppl-seq-len`` tokens, and top-1 agreement of llama.cpp's next-token
  prediction with the PyTorch float32 model it was exported from, on the same positions;
- speed: llama.cpp on ``--threads`` threads, prefill tokens/s over a ``--prompt-len`` WikiText-2 prompt
  and greedy decode tokens/s over ``--gen-len`` tokens, median of ``--repeats`` after one warm-up, peak
  resident memory. ``--rounds`` passes; in each pass all models of one type run back to back (dense
  and pruned alternated, the order reversed every other pass), so the pruned/dense speed-up is taken
  from pairs measured minutes apart. Before every run the 1-minute load average is recorded; while it is
  above ``--load-per-core`` per core the run waits (up to ``--max-wait`` s, then runs and is marked
  ``contended``). ``--first-round K`` measures only passes K.. ``--rounds``-1, so new passes added on
  another day are paired with a dense run of that day, not with an earlier pass of the same number.

Results go to ``results/deploy.json`` after every measurement (a cut-off run resumes), and the report
stage writes ``results/deploy.md`` and ``results/frontier.png`` (perplexity against file size, a line
per model through its quantization types).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = HERE / "results"
OUTTYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
BASE = "smollm2-135m"


# ---- bookkeeping -------------------------------------------------------------------------------
def load_record(path: Path) -> dict:
    record = json.loads(path.read_text()) if path.exists() else {}
    if record and not {"models", "files", "speed"} <= set(record):
        raise SystemExit(f"{path} is not a result file of this benchmark (no models/files/speed); give another --out")
    return record or {"models": {}, "files": {}, "speed": []}


def save_record(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def key(model: str, outtype: str) -> str:
    return f"{model}@{outtype}"


def model_plan(args) -> dict[str, dict]:
    """name -> {"method", "ratio", "options"} (dense: method None)."""
    plan = {"dense": {"method": None, "ratio": 0.0, "options": {}}}
    for r in args.ratios:
        plan[f"comp-{round(r * 100)}"] = {"method": "comp", "ratio": r, "options": {}}
    for multiple in args.width_multiple:
        if multiple <= 1:
            continue
        for r in args.ratios:
            plan[f"comp-{round(r * 100)}-w{multiple}"] = {
                "method": "comp", "ratio": r, "options": {"width_multiple": multiple}}
    if args.peer:
        plan[f"{args.peer}-{round(args.peer_ratio * 100)}"] = {"method": args.peer, "ratio": args.peer_ratio, "options": {}}
    if args.models:
        unknown = sorted(set(args.models) - set(plan))
        if unknown:
            raise SystemExit(f"--models: unknown {unknown}; this run's models are {list(plan)}")
        plan = {name: how for name, how in plan.items() if name in args.models}
    return plan


def model_spec(name: str, args) -> str:
    return BASE if name == "dense" else str(Path(args.work) / name)


def gguf_path(name: str, outtype: str, args) -> Path:
    return Path(args.work) / f"{name}.{outtype}.gguf"


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def wait_for_quiet(args) -> dict:
    """Wait while the 1-minute load average is above ``load_per_core`` per core (at most ``max_wait`` s)."""
    limit = args.load_per_core * (os.cpu_count() or 1)
    start = time.monotonic()
    load = load_average()
    while load > limit and time.monotonic() - start < args.max_wait:
        time.sleep(5)
        load = load_average()
    return {"load_before": load, "waited_s": round(time.monotonic() - start, 1), "contended": load > limit}


def run_child(kind: str, args, **fields) -> dict:
    """One measurement in a fresh interpreter; returns its last stdout line as JSON."""
    cmd = [sys.executable, __file__, "--stage", "child", "--child", json.dumps({"kind": kind, **fields}),
           "--threads", str(args.threads), "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len),
           "--repeats", str(args.repeats), "--work", args.work]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child {fields} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- stages ------------------------------------------------------------------------------------
def stage_prune(args, record: dict) -> None:
    import fedprune

    for name, how in model_plan(args).items():
        info = record["models"].setdefault(name, {})
        info.update(how)
        if how["method"] is None:
            continue
        plan_file = Path(args.work) / name / "plan.json"
        if plan_file.exists():  # reused: it must have been pruned the way this run asks
            plan = json.loads(plan_file.read_text())
            got = (plan["pruning"]["method"], plan["pruning"]["ratio"], plan["calibration"]["corpus"],
                   plan["calibration"]["nsamples"], plan["calibration"]["seq_len"], plan["calibration"]["seed"],
                   {k: str(v) for k, v in (plan.get("options") or {}).items()})  # the CLI records option strings
            want = (how["method"], how["ratio"], "c4", args.nsamples, args.seq_len, 0,
                    {k: str(v) for k, v in how["options"].items()})
            if got != want:
                raise SystemExit(f"{plan_file} was pruned with {got}, this run asks for {want}: move it away")
            info.update(achieved_ratio=plan["pruning"]["achieved_ratio"],
                        prune_wall_s=round(plan["pruning"]["wall_time_s"], 1),
                        calibration=f"c4 {args.nsamples} x {args.seq_len}, seed 0")
            continue
        tok = fedprune.load_tokenizer(BASE)
        model = fedprune.load_model(BASE)
        t0 = time.perf_counter()
        res = fedprune.prune(model, how["method"], how["ratio"], tokenizer=tok, nsamples=args.nsamples,
                             seq_len=args.seq_len, calibration="c4", seed=0, output=Path(args.work) / name,
                             **how["options"])
        info.update(achieved_ratio=res.achieved_ratio, prune_wall_s=round(time.perf_counter() - t0, 1),
                    calibration=f"c4 {args.nsamples} x {args.seq_len}, seed 0")
        print(f"pruned {name}: achieved {res.achieved_ratio:.4f}", flush=True)
        save_record(record, args.out)


def stage_export(args, record: dict) -> None:
    from fedprune.deploy import export_gguf

    for name in model_plan(args):
        for outtype in args.outtypes:
            k = key(name, outtype)
            path = gguf_path(name, outtype, args)
            if k in record["files"] and path.exists():
                continue
            t0 = time.perf_counter()
            if path.exists():
                path.unlink()  # a file from an unrecorded (interrupted) export: ours, under --work
            rep = export_gguf(model_spec(name, args), path, outtype)
            rep = {k2: v for k2, v in rep.items() if k2 != "path"}
            rep.update(model=name, outtype=outtype, export_s=round(time.perf_counter() - t0, 1),
                       sha256=file_sha256(path))
            kept = carried_quality(record["files"].get(k), rep)
            if kept:
                print(f"{path.name}: the same file as the recorded one; its quality fields are kept", flush=True)
            record["files"][k] = {**rep, **kept}
            print(f"exported {path.name}: {rep['bytes'] / 1e6:.1f} MB, {rep.get('bits_per_weight', float('nan')):.2f} bpw",
                  flush=True)
            save_record(record, args.out)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


QUALITY_FIELDS = ("ppl", "top1_agreement", "ppl_tokens")


def carried_quality(old: dict | None, new: dict) -> dict:
    """The quality fields of a file's earlier record when a re-export (the GGUF files were removed, the
    record kept) wrote the same file again, byte for byte (the same sha256). Otherwise, and for records
    from before the benchmark stored hashes, nothing: the quality stage measures the new file again."""
    if not old or "sha256" not in old or old["sha256"] != new["sha256"]:
        return {}
    return {f: old[f] for f in QUALITY_FIELDS if f in old}


def ppl_windows(args) -> Path:
    """The WikiText-2 windows every quality child scores (token ids, shared by PyTorch and llama.cpp)."""
    path = Path(args.work) / f"wikitext2-{args.ppl_windows}x{args.ppl_seq_len}.json"
    if not path.exists():
        import fedprune
        from fedprune.data import load_text
        from fedprune.evaluate.perplexity import tokenize_text, windows

        tok = fedprune.load_tokenizer(BASE)
        wins = windows(tokenize_text(tok, load_text("wikitext2")), args.ppl_seq_len, args.ppl_windows)
        path.write_text(json.dumps(wins.tolist()))
    return path


def stage_quality(args, record: dict) -> None:
    wins = ppl_windows(args)
    for name in model_plan(args):
        ref = Path(args.work) / f"{name}.torch-{wins.stem}.json"
        info = record["models"].setdefault(name, {})
        if not ref.exists() or "torch_ppl" not in info:
            res = run_child("torch_quality", args, spec=model_spec(name, args), windows=str(wins), ref=str(ref))
            info.update(torch_ppl=res["ppl"], parameters=res["parameters"])
            save_record(record, args.out)
        for outtype in args.outtypes:
            entry = record["files"].get(key(name, outtype))
            if entry is None or "ppl" in entry:
                continue
            res = run_child("llamacpp_quality", args, gguf=str(gguf_path(name, outtype, args)), windows=str(wins),
                            ref=str(ref))
            entry.update(res)
            print(f"{name}@{outtype}: ppl {res['ppl']:.2f}, top-1 agreement {res['top1_agreement']:.3f}", flush=True)
            save_record(record, args.out)


def stage_speed(args, record: dict) -> None:
    names = list(model_plan(args))
    done = {(s["model"], s["outtype"], s["round"]) for s in record["speed"]}
    for rnd in range(args.first_round, args.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for outtype in args.outtypes:
            for name in order:
                if (name, outtype, rnd) in done or key(name, outtype) not in record["files"]:
                    continue
                quiet = wait_for_quiet(args)
                res = run_child("llamacpp_speed", args, gguf=str(gguf_path(name, outtype, args)))
                res.update(quiet, model=name, outtype=outtype, round=rnd, load_after=load_average(),
                           at=time.strftime("%Y-%m-%d %H:%M:%S"))
                record["speed"].append(res)
                print(f"round {rnd} {name}@{outtype}: decode {res['decode_tokens_per_s']:.1f} tok/s "
                      f"(load {quiet['load_before']}{', contended' if quiet['contended'] else ''})", flush=True)
                save_record(record, args.out)


# ---- children ----------------------------------------------------------------------------------
def child_torch_quality(job: dict, args) -> dict:
    import numpy as np
    import torch

    import fedprune

    torch.set_num_threads(args.threads)
    model = fedprune.load_model(job["spec"])
    wins = torch.tensor(json.loads(Path(job["windows"]).read_text()))
    nll, top1 = 0.0, []
    with torch.no_grad():
        for w in wins:
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0, :-1].float(), -1)
            nll += float(-logp.gather(-1, w[1:, None]).double().sum())
            top1.append(logp.argmax(-1).tolist())
    n = wins.shape[0] * (wins.shape[1] - 1)
    Path(job["ref"]).write_text(json.dumps(top1))
    return {"ppl": math.exp(nll / n), "parameters": int(sum(p.numel() for p in model.parameters())),
            "tokens": n, "numpy": np.__version__}


def child_llamacpp_quality(job: dict, args) -> dict:
    import numpy as np

    from fedprune.deploy.verify import llamacpp_perplexity

    wins = json.loads(Path(job["windows"]).read_text())
    ref = json.loads(Path(job["ref"]).read_text())
    res = llamacpp_perplexity(job["gguf"], wins, n_threads=args.threads, return_top1=True)
    agree = sum(int((np.asarray(a) == np.asarray(b)).sum()) for a, b in zip(res["top1"], ref))
    return {"ppl": res["ppl"], "top1_agreement": agree / res["tokens"], "ppl_tokens": res["tokens"]}


def child_llamacpp_speed(job: dict, args) -> dict:
    # llama_cpp and numpy only (no torch), so the peak resident memory is llama.cpp's own.
    import importlib.util

    import llama_cpp
    import numpy as np

    where = Path(importlib.util.find_spec("fedprune").origin).parent / "memory_usage.py"
    spec = importlib.util.spec_from_file_location("fedprune_memory_usage", where)
    mem = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mem)

    ids = json.loads((Path(args.work) / f"prompt-{args.prompt_len}.json").read_text())
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=args.prompt_len + args.gen_len + 8, n_threads=args.threads,
                          n_batch=args.prompt_len, n_gpu_layers=0, verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def greedy() -> int:
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    pp, tg = [], []
    for rep in range(args.repeats + 1):  # the first pass warms up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        token = greedy()
        for _ in range(args.gen_len):
            llm.eval([token])
            token = greedy()
        t2 = time.perf_counter()
        if rep:
            pp.append(len(ids) / (t1 - t0))
            tg.append(args.gen_len / (t2 - t1))
    return {"load_s": round(load_s, 3), "prefill_tokens_per_s": statistics.median(pp),
            "decode_tokens_per_s": statistics.median(tg), "decode_runs": [round(x, 2) for x in tg],
            "peak_rss_bytes": mem.peak_rss_bytes()}


CHILDREN = {"torch_quality": child_torch_quality, "llamacpp_quality": child_llamacpp_quality,
            "llamacpp_speed": child_llamacpp_speed}


# ---- report ------------------------------------------------------------------------------------
def speed_summary(record: dict) -> dict[str, dict]:
    """Per file: median decode/prefill over rounds, and the median of per-round decode ratios to dense."""
    by = {}
    for s in record["speed"]:
        by.setdefault(key(s["model"], s["outtype"]), []).append(s)
    out = {}
    for k, runs in by.items():
        model, outtype = k.split("@")
        dense = {s["round"]: s for s in by.get(key("dense", outtype), [])}
        ratios = [s["decode_tokens_per_s"] / dense[s["round"]]["decode_tokens_per_s"] for s in runs if s["round"] in dense]
        pre = [s["prefill_tokens_per_s"] / dense[s["round"]]["prefill_tokens_per_s"] for s in runs if s["round"] in dense]
        out[k] = {"decode_tokens_per_s": statistics.median(s["decode_tokens_per_s"] for s in runs),
                  "prefill_tokens_per_s": statistics.median(s["prefill_tokens_per_s"] for s in runs),
                  "peak_rss_bytes": max(s["peak_rss_bytes"] for s in runs),
                  "decode_speedup": statistics.median(ratios) if ratios else None,
                  "prefill_speedup": statistics.median(pre) if pre else None,
                  "rounds": len(runs), "contended_runs": sum(bool(s["contended"]) for s in runs),
                  "load_before": [s["load_before"] for s in runs]}
    return out


def interpolate_log(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of log(y) over log(x) through ``points`` (sorted by x); None outside their range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            t = 0.0 if x1 == x0 else (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return None


def frontier(record: dict) -> dict:
    """Which files are Pareto-optimal (no other file both smaller and lower in perplexity), and for every
    pruned file the dense model's perplexity interpolated at its size."""
    files = [f for f in record["files"].values() if "ppl" in f]
    pareto = [f"{f['model']}@{f['outtype']}" for f in files
              if not any(g["bytes"] <= f["bytes"] and g["ppl"] < f["ppl"] and g is not f for g in files)]
    dense = [(f["bytes"], f["ppl"]) for f in files if f["model"] == "dense"]
    vs_dense = {}
    for f in files:
        if f["model"] == "dense":
            continue
        at = interpolate_log(dense, f["bytes"])
        vs_dense[f"{f['model']}@{f['outtype']}"] = {"bytes": f["bytes"], "ppl": f["ppl"], "dense_ppl_at_same_bytes": at,
                                                      "beats_dense": None if at is None else f["ppl"] < at}
    return {"pareto": sorted(pareto, key=lambda k: record["files"][k]["bytes"]), "vs_dense": vs_dense}


def decode_time_model(record: dict, speed: dict) -> dict[str, dict]:
    """Per quantization type, least squares of the seconds per decoded token over the file's bytes across
    the models: ``t = overhead_s + bytes / bandwidth``, a model's ``t`` being the dense file's median time
    divided by the model's paired speed-up (its own median where it has none). ``overhead_s`` is what a token costs whatever the
    weights (sampling, graph, KV cache, threads); ``bandwidth`` the bytes the decode streams per second.
    From them the speed-up a file-size ratio predicts for COMP 30 %: ``t(dense) / t(comp-30)``, which
    stays below the file ratio by the overhead's share. Needs three or more models of that type."""
    out = {}
    by_type: dict[str, list[tuple[float, float, str]]] = {}
    for k, s in speed.items():
        f = record["files"].get(k)
        if not (f and s.get("decode_tokens_per_s")):
            continue
        dense = speed.get(key("dense", f["outtype"]))
        if dense and dense.get("decode_tokens_per_s") and s.get("decode_speedup"):
            # the dense file's median time over the paired speed-up: files measured in different passes
            # (a machine a little faster or slower that day) stay comparable
            t = 1.0 / (dense["decode_tokens_per_s"] * s["decode_speedup"])
        else:
            t = 1.0 / s["decode_tokens_per_s"]
        by_type.setdefault(f["outtype"], []).append((float(f["bytes"]), t, f["model"]))
    for outtype, pts in by_type.items():
        if len(pts) < 3:
            continue
        n = len(pts)
        mx = sum(x for x, _, _ in pts) / n
        my = sum(y for _, y, _ in pts) / n
        sxx = sum((x - mx) ** 2 for x, _, _ in pts)
        if sxx == 0:
            continue
        slope = sum((x - mx) * (y - my) for x, y, _ in pts) / sxx
        overhead = my - slope * mx
        ss_res = sum((y - overhead - slope * x) ** 2 for x, y, _ in pts)
        ss_tot = sum((y - my) ** 2 for _, y, _ in pts)
        row = {"models": n, "overhead_ms_per_token": 1e3 * overhead, "ns_per_byte": 1e9 * slope,
               "bandwidth_gb_per_s": (1e-9 / slope) if slope > 0 else None,
               "r2": 1 - ss_res / ss_tot if ss_tot > 0 else None}
        d, c = record["files"].get(key("dense", outtype)), record["files"].get(key("comp-30", outtype))
        if d and c:
            t = lambda b: overhead + slope * b  # noqa: E731
            row["comp30_predicted_speedup"] = t(d["bytes"]) / t(c["bytes"])
            row["dense_overhead_share"] = overhead / t(d["bytes"])
        out[outtype] = row
    return out


def checks(record: dict, speed: dict) -> list[dict]:
    """The targets for COMP 30 % (unrounded and every width-rounded variant ``comp-30-wN``): decode
    speed-up vs the file-size ratio, f16 and q4_k_m."""
    rows = []
    models = sorted({f["model"] for f in record["files"].values()
                     if f["model"] == "comp-30" or f["model"].startswith("comp-30-w")},
                    key=lambda m: (m != "comp-30", int(m.rpartition("-w")[2]) if "-w" in m else 0))
    for model in models:
        for outtype in ("f16", "q4_k_m"):
            d, p = record["files"].get(key("dense", outtype)), record["files"].get(key(model, outtype))
            s = speed.get(key(model, outtype))
            if not (d and p and s and s["decode_speedup"]):
                continue
            size_ratio = d["bytes"] / p["bytes"]
            rows.append({"model": model, "outtype": outtype, "decode_speedup": s["decode_speedup"],
                         "passes": s.get("rounds"), "file_size_ratio": size_ratio,
                         "within_10pct_of_size_ratio": abs(s["decode_speedup"] / size_ratio - 1) <= 0.10,
                         "at_least_1_3x": s["decode_speedup"] >= 1.3})
    return rows


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    models = list(dict.fromkeys(f["model"] for f in record["files"].values()))
    for m in models:
        pts = sorted((f["bytes"] / 1e6, f["ppl"], f["outtype"]) for f in record["files"].values()
                     if f["model"] == m and "ppl" in f)
        if not pts:
            continue
        style = "--" if "-w" in m else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=m,
                linewidth=2.5 if m == "dense" else 1.2)
        for x, y, t in pts:
            ax.annotate(t, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("GGUF file size (MB)")
    ax.set_ylabel("WikiText-2 perplexity in llama.cpp")
    ax.set_title("SmolLM2-135M: pruning x quantization")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def markdown(record: dict, speed: dict, front: dict, check_rows: list[dict], time_model: dict | None = None) -> str:
    meta = record.get("meta", {})
    lines = [
        "# Pruning x quantization in llama.cpp: SmolLM2-135M",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in meta.get("commands", [])) + "  ",
        f"Machine: {meta.get('machine', '')}. Pruning: C4 calibration {meta.get('nsamples')} x {meta.get('seq_len')} tokens, "
        f"seed 0, default options (`-wN`: `-o width_multiple=N`). Perplexity from llama.cpp's logits over the first "
        f"{meta.get('ppl_windows')} WikiText-2 windows of {meta.get('ppl_seq_len')} tokens; top-1: agreement of llama.cpp's "
        f"next-token argmax with the float32 PyTorch model on those positions. Speed: llama.cpp, {meta.get('threads')} threads, "
        f"prefill {meta.get('prompt_len')} tokens, decode {meta.get('gen_len')} greedy tokens, median of {meta.get('repeats')} "
        "after a warm-up per process, median over the row's alternated passes (column passes); speed-up: median of the per-pass "
        "ratios to the dense file of the same type. Load: the 1-minute load average before each run (runs wait while it "
        "is above 0.5 per core).",
        "",
        "| model | type | file (MB) | bits/weight | fallbacks | ppl (llama.cpp) | ppl (PyTorch f32) | top-1 | decode tok/s | "
        "passes | decode x dense | prefill tok/s | prefill x dense | peak RSS (MB) | load avg | contended |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for k, f in record["files"].items():
        s = speed.get(k, {})
        m = record["models"].get(f["model"], {})
        loads = s.get("load_before")
        lines.append(
            f"| {f['model']} | {f['outtype']} | {f['bytes'] / 1e6:.1f} | {fmt(f.get('bits_per_weight'))} | "
            f"{len(f.get('fallbacks', []))} | {fmt(f.get('ppl'))} | {fmt(m.get('torch_ppl'))} | {fmt(f.get('top1_agreement'), '.3f')} | "
            f"{fmt(s.get('decode_tokens_per_s'), '.1f')} | {s.get('rounds', '-')} | {fmt(s.get('decode_speedup'))} | {fmt(s.get('prefill_tokens_per_s'), '.0f')} | {fmt(s.get('prefill_speedup'))} | "
            f"{fmt(s.get('peak_rss_bytes') and s['peak_rss_bytes'] / 1e6, '.0f')} | "
            f"{'-' if not loads else f'{min(loads):.2f}-{max(loads):.2f}'} | {s.get('contended_runs', '-')} |")
    lines += ["", "Pareto frontier (no other file both smaller and lower in perplexity): "
              + ", ".join(front["pareto"]) + ".", ""]
    beats = [k for k, v in front["vs_dense"].items() if v["beats_dense"]]
    compared = [k for k, v in front["vs_dense"].items() if v["beats_dense"] is not None]
    lines.append(f"Pruned files inside the dense model's size range: {len(compared)}; below the dense curve "
                 f"(lower perplexity at the same bytes, log-log interpolation between dense quantization types): "
                 f"{', '.join(beats) if beats else 'none'}.")
    if check_rows:
        lines += ["", "| COMP 30 % | type | passes | decode speed-up | file-size ratio | within 10 % | >= 1.3x |",
                  "|---|---|---:|---:|---:|---|---|"]
        for c in check_rows:
            lines.append(f"| {c['model']} | {c['outtype']} | {c['passes']} | {c['decode_speedup']:.2f} | "
                         f"{c['file_size_ratio']:.2f} | {c['within_10pct_of_size_ratio']} | {c['at_least_1_3x']} |")
    if time_model:
        lines += ["", "Decode time per token against file bytes, per type (least squares over the models: "
                  "t = overhead + bytes / bandwidth), and the COMP 30 % speed-up that fixed overhead leaves of its "
                  "file-size ratio:", "",
                  "| type | models | overhead (ms/token) | bandwidth (GB/s) | R^2 | overhead share (dense) | COMP 30 % predicted x |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for t, r in time_model.items():
            lines.append(f"| {t} | {r['models']} | {r['overhead_ms_per_token']:.2f} | {fmt(r['bandwidth_gb_per_s'])} | "
                         f"{fmt(r['r2'])} | {fmt(r.get('dense_overhead_share'))} | {fmt(r.get('comp30_predicted_speedup'))} |")
    return "\n".join(lines) + "\n"


def stage_report(args, record: dict) -> None:
    speed = speed_summary(record)
    front = frontier(record)
    record["summary"] = {"speed": speed, "frontier": front, "checks": checks(record, speed),
                         "decode_time_model": decode_time_model(record, speed)}
    save_record(record, args.out)
    if any("ppl" in f for f in record["files"].values()):
        plot(record, args.out.parent / "frontier.png")
    (args.out.parent / "deploy.md").write_text(markdown(record, speed, front, record["summary"]["checks"],
                                                        record["summary"]["decode_time_model"]))
    print((args.out.parent / "deploy.md").read_text())


# ---- main --------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", default="all", choices=["all", "prune", "export", "quality", "speed", "report", "child"])
    p.add_argument("--work", default=str(ROOT / "outputs" / "deploy"), help="pruned checkpoints and GGUF files")
    p.add_argument("--out", type=Path, default=RESULTS / "deploy.json")
    p.add_argument("--outtypes", default=",".join(OUTTYPES))
    p.add_argument("--ratios", default="0.2,0.3,0.5")
    p.add_argument("--width-multiple", default="256",
                   help="the rounded COMP variants: comma list of multiples (1: none)")
    p.add_argument("--peer", default="llm_pruner", help="peer pruning method ('' for none)")
    p.add_argument("--peer-ratio", type=float, default=0.3)
    p.add_argument("--models", default="", help="comma list: only these of the run's models (a benchmark in parts)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--ppl-windows", type=int, default=20)
    p.add_argument("--ppl-seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--first-round", type=int, default=0,
                   help="measure only rounds from this one on (new passes of every model, paired in time)")
    p.add_argument("--load-per-core", type=float, default=0.5)
    p.add_argument("--max-wait", type=float, default=180.0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.outtypes = [t for t in args.outtypes.split(",") if t]
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    args.width_multiple = [int(m) for m in str(args.width_multiple).split(",") if m]
    args.models = [m for m in args.models.split(",") if m]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage == "child":
        job = json.loads(args.child)
        print(json.dumps(CHILDREN[job["kind"]](job, args)))
        return 0
    Path(args.work).mkdir(parents=True, exist_ok=True)
    record = load_record(args.out)
    command = "python benchmarks/deploy/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commands = record.get("meta", {}).get("commands", [])
    record["meta"] = {
        "commands": commands + [command] if command not in commands else commands,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        **{k: getattr(args, k) for k in ("nsamples", "seq_len", "ppl_windows", "ppl_seq_len", "threads", "prompt_len",
                                         "gen_len", "repeats", "rounds", "width_multiple", "outtypes")},
    }
    stages = ["prune", "export", "quality", "speed", "report"] if args.stage == "all" else [args.stage]
    if "speed" in stages:
        prompt = Path(args.work) / f"prompt-{args.prompt_len}.json"
        if not prompt.exists():
            import fedprune
            from fedprune.evaluate.speed import prompt_ids

            prompt.write_text(json.dumps(prompt_ids(None, fedprune.load_tokenizer(BASE), args.prompt_len, 1)[0].tolist()))
    for stage in stages:
        globals()[f"stage_{stage}"](args, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
