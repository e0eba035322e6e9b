"""On-device benchmark: dense vs COMP-pruned SmolLM2-135M, in PyTorch and in llama.cpp.

    python benchmarks/deploy/run.py                 # prune (if needed), export, measure, write results
    python benchmarks/deploy/run.py --stage prune   # only the pruned checkpoints

Models: the dense model and COMP at 20/30/50% (C4 calibration, ``--nsamples`` x ``--seq-len``
tokens, seed 0; checkpoints under ``outputs/deploy/`` are reused when present). Each is exported
to GGUF (``--outtype``, f16 by default) and every measurement runs in a fresh subprocess, so
peak RSS (``VmHWM``) and load time are the model's own:

- PyTorch (float32, eager): load time of ``fedprune.load_model``; prefill tokens/s over a
  ``--prompt-len`` prompt and greedy decode tokens/s over ``--gen-len`` tokens with the KV cache
  (``fedprune.evaluate.speed``, median of ``--repeats``);
- llama.cpp (llama-cpp-python, CPU, ``--threads``): load time of ``Llama(...)``; prompt
  processing tokens/s (one ``eval`` of the prompt) and generation tokens/s (``--gen-len`` single-token
  evals with greedy argmax), median of ``--repeats``.

Results: ``results/deploy.json`` and ``results/deploy.md``.
"""
from __future__ import annotations

import argparse
import json
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
RATIOS = (0.2, 0.3, 0.5)


def memory_usage():
    """``fedprune.memory_usage`` loaded on its own: importing the package would load torch
    (``fedprune/__init__``) into the llama.cpp process, whose peak must be llama.cpp's own."""
    import importlib.util

    where = Path(importlib.util.find_spec("fedprune").origin).parent / "memory_usage.py"
    spec = importlib.util.spec_from_file_location("fedprune_memory_usage", where)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ---- stages ------------------------------------------------------------------------------
def prune_models(args) -> dict[str, str]:
    """name -> model spec; prunes the missing COMP checkpoints."""
    import fedprune

    models = {"dense": "smollm2-135m"}
    for r in RATIOS:
        out = Path(args.work) / f"comp-{int(r * 100)}"
        models[f"comp-{int(r * 100)}"] = str(out)
        if (out / "plan.json").exists():
            continue
        tok = fedprune.load_tokenizer("smollm2-135m")
        model = fedprune.load_model("smollm2-135m")
        res = fedprune.prune(model, "comp", r, tokenizer=tok, nsamples=args.nsamples, seq_len=args.seq_len,
                             calibration="c4", seed=0, output=out, **comp_options(args))
        print(f"pruned comp-{int(r * 100)}: achieved {res.achieved_ratio:.3f} in {res.wall_time_s:.0f}s", flush=True)
    return models


def comp_options(args) -> dict:
    out = {}
    for kv in args.comp_option:
        key, _, val = kv.partition("=")
        out[key] = {"true": True, "false": False}.get(val.lower(), val)
    return out


def export_models(args, models: dict[str, str]) -> dict[str, str]:
    from fedprune.deploy import export_gguf

    files = {}
    for name, spec in models.items():
        out = Path(args.work) / f"{name}.{args.outtype}.gguf"
        if not out.exists():
            t0 = time.perf_counter()
            export_gguf(spec, out, args.outtype)
            print(f"exported {out.name} in {time.perf_counter() - t0:.0f}s", flush=True)
        files[name] = str(out)
    return files


def measure_torch(spec: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import fedprune
    from fedprune.evaluate.speed import speed

    t0 = time.perf_counter()
    model = fedprune.load_model(spec)
    load_s = time.perf_counter() - t0
    tok = fedprune.load_tokenizer(spec)
    res = speed(model, tok, prompt_len=args.prompt_len, gen_len=args.gen_len, repeats=args.repeats)
    where = Path(fedprune.models.loading.resolve_model_dir(spec))
    plan = json.loads((where / "plan.json").read_text()) if (where / "plan.json").exists() else {}
    return {"pruning": plan.get("pruning"), "calibration": plan.get("calibration"), "load_s": load_s,
            "prefill_tokens_per_s": res["prefill_tokens_per_s"], "decode_tokens_per_s": res["decode_tokens_per_s"], "parameters": res["parameters"],
            "file_bytes": dir_bytes(where), "peak_rss_bytes": memory_usage().peak_rss_bytes()}


def measure_llamacpp(path: str, args) -> dict:
    # Only llama_cpp and numpy here (no torch/transformers), so peak RSS is llama.cpp's own.
    import llama_cpp
    import numpy as np

    ids = json.loads(Path(args.prompt_file).read_text())
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=args.prompt_len + args.gen_len + 8, n_threads=args.threads,
                          n_batch=args.prompt_len, n_gpu_layers=0, verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def greedy() -> int:  # argmax of the last position's logits (scores are kept only with logits_all)
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    pp, tg = [], []
    for rep in range(args.repeats + 1):  # the first run warms up
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
    return {"load_s": load_s, "prefill_tokens_per_s": statistics.median(pp), "decode_tokens_per_s": statistics.median(tg),
            "file_bytes": os.path.getsize(path), "peak_rss_bytes": memory_usage().peak_rss_bytes()}


def run_child(kind: str, target: str, args) -> dict:
    """One measurement in a fresh interpreter (honest load time and peak memory)."""
    cmd = [sys.executable, __file__, "--stage", "child", "--child-kind", kind, "--child-target", target,
           "--threads", str(args.threads), "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len),
           "--repeats", str(args.repeats), "--prompt-file", args.prompt_file]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} measurement of {target} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def markdown(record: dict) -> str:
    rows = record["results"]
    dense = {r["runtime"]: r for r in rows if r["model"] == "dense"}
    lines = [
        "# On-device benchmark: dense vs COMP-pruned SmolLM2-135M",
        "",
        f"Command: `{record['command']}`  ",
        f"Machine: {record['machine']}; {record['threads']} threads; prompt {record['prompt_len']} tokens, "
        f"{record['gen_len']} generated tokens, median of {record['repeats']} runs after a warm-up; "
        f"GGUF outtype {record['outtype']}; PyTorch float32 eager. Each measurement in a fresh subprocess.  ",
        f"Pruning: COMP (options {record['comp_options'] or 'default'}), C4 calibration {record['nsamples']} x {record['seq_len']} tokens, seed 0 "
        "(modest, to fit the shared 2-core machine).  ",
        f"Contention: load average before/after {record['load_before']} / {record['load_after']} on a machine "
        "shared with other jobs; throughput figures are noisy, compare rows within this run.",
        "",
        "| model | runtime | params (M) | file (MB) | load (s) | prompt tok/s | gen tok/s | gen speed-up | peak RSS (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d = dense.get(r["runtime"])
        up = r["decode_tokens_per_s"] / d["decode_tokens_per_s"] if d else float("nan")
        lines.append(
            f"| {r['model']} | {r['runtime']} | {r['parameters'] / 1e6:.1f} | {r['file_bytes'] / 1e6:.1f} | "
            f"{r['load_s']:.2f} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | {up:.2f}x | "
            f"{r['peak_rss_bytes'] / 1e6:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", default="all", choices=["all", "prune", "export", "child"])
    p.add_argument("--work", default=str(ROOT / "outputs" / "deploy"), help="pruned checkpoints and GGUF files")
    p.add_argument("--outtype", default="f16", choices=["f16", "q8_0", "f32"])
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--comp-option", action="append", default=[], metavar="KEY=VALUE",
                   help="COMP option for the pruning stage, e.g. neuron_metric=energy, mask_tuning=false")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-file", default=None, help="(internal) token ids of the llama.cpp prompt")
    p.add_argument("--child-kind", default=None)
    p.add_argument("--child-target", default=None)
    args = p.parse_args(argv)

    if args.stage == "child":
        fn = measure_torch if args.child_kind == "pytorch" else measure_llamacpp
        print(json.dumps(fn(args.child_target, args)))
        return 0
    models = prune_models(args)
    if args.stage == "prune":
        return 0
    files = export_models(args, models)
    if args.stage == "export":
        return 0
    import fedprune
    from fedprune.evaluate.speed import prompt_ids

    # the same WikiText-2 prompt ids as PyTorch's speed() uses, handed to the llama.cpp children
    args.prompt_file = str(Path(args.work) / "prompt_ids.json")
    Path(args.prompt_file).write_text(json.dumps(prompt_ids(None, fedprune.load_tokenizer("smollm2-135m"),
                                                            args.prompt_len, 1)[0].tolist()))
    before = load_average()
    results = []
    for name, spec in models.items():
        for runtime, target in (("pytorch", spec), ("llama.cpp", files[name])):
            r = run_child(runtime, target, args)
            if runtime == "llama.cpp":
                r["parameters"] = results[-1]["parameters"]
            r.update(model=name, runtime=runtime)
            results.append(r)
            print(json.dumps(r), flush=True)
    record = {
        "command": "python benchmarks/deploy/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "threads": args.threads, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "repeats": args.repeats,
        "outtype": args.outtype, "nsamples": args.nsamples, "seq_len": args.seq_len,
        "comp_options": comp_options(args),
        "load_before": before, "load_after": load_average(), "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "deploy.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "deploy.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
