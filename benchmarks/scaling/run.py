"""Scaling benchmark: how pruning time and peak memory grow with model size (random weights).

    python benchmarks/scaling/run.py                                  # every (method, shape); resumes
    python benchmarks/scaling/run.py --shapes smollm2-135m smollm2-360m --methods comp flap
    python benchmarks/scaling/run.py --shapes llama2-7b --methods comp --timeout 0   # hours; rerun resumes
    python benchmarks/scaling/run.py --report                         # only the JSON, table and plot

RANDOM WEIGHTS: only time and memory are meaningful. The models are LLaMA-shaped, built from the
public configs of SmolLM2-135M, -360M, -1.7B and LLaMA-2-7B (:data:`SHAPES`, each naming its source)
with the SmolLM2 tokenizer (vocabulary 49152: LLaMA-2-7B's own 32000 is raised to it, which adds
0.14 B parameters to its embeddings and head; the row's ``params`` counts them). Each is built on the
meta device and materialised one tensor at a time straight into a sharded safetensors checkpoint
with an index (:func:`write_random_checkpoint`; ``--work``/models, reused when present), so a 7B
checkpoint (13.7 GB in bfloat16) is written without ever holding the model in memory.

Every (method, shape) prunes ``--ratio`` (20 %) of the parameters with C4 calibration ``--nsamples`` x
``--seq-len`` tokens (8 x 128 by default), seed 0, in ``--dtype`` (bfloat16), in its own child process
(``nice -n 5``, one thread): COMP, Wanda-sp and FLAP with ``--weight-offload disk`` (decoder layers
memory-mapped, one materialised at a time; the output written layer by layer); LLM-Pruner, which
needs gradients through the whole model, with the whole model loaded (``none``). Measured from the
child's own resource usage (``os.wait4``): ``wall_s``, ``cpu_s`` (user + system), ``peak_rss_bytes``
(its maximum resident set, memory-mapped weight pages included while mapped); the 1-minute load
average before and after. ``peak_accelerator_bytes`` is the child's ``torch.cuda.max_memory_allocated``
with ``--device cuda``, null on the CPU.

Before a run its memory is estimated (:func:`estimate_bytes`); above the available memory
(``/proc/meminfo``'s MemAvailable, or ``--memory-limit``) minus ``--margin`` it is not launched and its
row says ``oom`` with the estimate. A child killed by a signal is ``oom`` (SIGKILL: the kernel's OOM
killer) or ``failed``; one past ``--timeout`` is stopped (SIGTERM) and marked ``timeout``: a
streamed prune's partial output stays, and the next invocation resumes it from the last finished
layer, the row adding up the attempts' CPU and wall time (its peak is the largest attempt's).

One row per (method, shape, dtype, weight offload) in ``results/rows/`` (written atomically when a
run ends; a finished row is not run again, ``--redo`` to force), and from them ``results/scaling.json``
(rows, the fitted log-log growth exponents of ``wall_s`` and ``peak_rss_bytes`` against ``params`` per
method, :func:`fit_exponent`), ``results/scaling.md`` and ``results/scaling.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = HERE / "results"
WORK = ROOT / "outputs" / "scaling"
CAVEAT = "random weights: only time and memory are meaningful"
TOKENIZER = "smollm2-135m"
TOKENIZER_VOCAB = 49152


# ---- shapes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """A LLaMA-shaped decoder (the fields of the public ``config.json`` that set parameter count and cost)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    rope_theta: float
    max_positions: int
    source: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES = {s.name: s for s in [
    Shape("smollm2-135m", 576, 1536, 30, 9, 3, 49152, True, 100000.0, 8192,
          "huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json"),
    Shape("smollm2-360m", 960, 2560, 32, 15, 5, 49152, True, 100000.0, 8192,
          "huggingface.co/HuggingFaceTB/SmolLM2-360M/blob/main/config.json"),
    Shape("smollm2-1.7b", 2048, 8192, 24, 32, 32, 49152, True, 130000.0, 8192,
          "huggingface.co/HuggingFaceTB/SmolLM2-1.7B/blob/main/config.json"),
    Shape("llama2-7b", 4096, 11008, 32, 32, 32, 32000, False, 10000.0, 4096,
          "huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json"),
]}


def layer_params(s: Shape) -> int:
    """One decoder layer: q, k, v, o, gate, up, down and two RMSNorm weights (no biases)."""
    kv = s.kv_heads * s.head_dim
    return 2 * s.hidden * s.hidden + 2 * s.hidden * kv + 3 * s.hidden * s.intermediate + 2 * s.hidden


def rest_params(s: Shape, vocab: int | None = None) -> int:
    """Embeddings, final norm and (untied) LM head."""
    v = vocab or s.vocab
    return v * s.hidden * (1 if s.tied else 2) + s.hidden


def param_count(s: Shape, vocab: int | None = None) -> int:
    """Parameters of the model of shape ``s`` (with ``vocab`` instead of its own vocabulary)."""
    return s.layers * layer_params(s) + rest_params(s, vocab)


def llama_config(s: Shape, vocab: int | None = None, dtype: str = "bfloat16"):
    """The transformers ``LlamaConfig`` of ``s`` (``vocab`` overrides its vocabulary)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                       num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                       vocab_size=vocab or s.vocab, tie_word_embeddings=s.tied, max_position_embeddings=s.max_positions,
                       rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta}, rms_norm_eps=1e-5,
                       hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2, dtype=dtype,
                       architectures=["LlamaForCausalLM"])


# ---- the random checkpoint -----------------------------------------------------------------------
def _tensor_seed(seed: int, name: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def random_tensor(name: str, shape: tuple[int, ...], dtype, seed: int, std: float = 0.02):
    """A reproducible random tensor for parameter ``name``: norms are ones, everything else N(0, std^2)."""
    import torch

    if len(shape) == 1 and name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(_tensor_seed(seed, name))
    return (torch.randn(shape, generator=g, dtype=torch.float32) * std).to(dtype)


def checkpoint_dir(work: Path, shape: Shape, dtype: str) -> Path:
    return work / "models" / f"{shape.name}-{dtype}"


def write_random_checkpoint(shape: Shape, directory: Path, dtype: str = "bfloat16", vocab: int | None = None,
                            seed: int = 0, shard_bytes: int = 1 << 30, tokenizer=None) -> Path:
    """A safetensors checkpoint of ``shape`` with random weights at ``directory`` (sharded at ``shard_bytes``,
    with ``model.safetensors.index.json``, config and tokenizer), written atomically. The model is built on
    the meta device for its tensor names and shapes; each tensor is materialised only to be written, so at
    most one shard is in memory. A complete checkpoint of the same config already there is reused; anything
    else there is refused, naming it."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from fedprune import atomic

    config = llama_config(shape, vocab, dtype)
    if directory.exists():
        check_checkpoint(directory, config)
        return directory
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]  # tied: lm_head shares embed_tokens
    tdtype = getattr(torch, dtype)
    size = torch.empty((), dtype=tdtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for n, s in names:
        b = math.prod(s) * size
        if shards[-1] and used + b > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((n, s))
        used += b
    with atomic.atomic_directory(directory) as tmp:
        weight_map, total = {}, 0
        for k, group in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: random_tensor(n, s, tdtype, seed) for n, s in group}
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            for n, t in tensors.items():
                weight_map[n] = fname
                total += t.numel() * t.element_size()
            del tensors
        atomic.write_json(tmp / "model.safetensors.index.json",
                          {"metadata": {"total_size": total, "random_weights": True, "seed": seed,
                                        "shape": asdict(shape)},
                           "weight_map": weight_map})
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return directory


def check_checkpoint(directory: Path, config) -> None:
    """``directory`` must be a complete random checkpoint of ``config`` (else a ValueError naming the difference)."""
    idx = directory / "model.safetensors.index.json"
    cfg = directory / "config.json"
    if not (idx.is_file() and cfg.is_file()):
        raise ValueError(f"{directory} exists but is not a complete checkpoint (no index or config.json): "
                         "delete it to have it written again")
    saved = json.loads(cfg.read_text())
    want = config.to_dict()
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "tie_word_embeddings", "dtype")
    diff = [f"{k}: {saved.get(k)!r} there vs {want.get(k)!r} wanted" for k in keys if saved.get(k) != want.get(k)]
    missing = sorted(set(json.loads(idx.read_text())["weight_map"].values()) -
                     {p.name for p in directory.glob("*.safetensors")})
    if diff or missing:
        raise ValueError(f"{directory} holds another checkpoint ({'; '.join(diff) or 'missing ' + ', '.join(missing)}): "
                         "delete it or give another --work")


# ---- memory estimate and the guard ----------------------------------------------------------------
BASE_BYTES = 750 * 2 ** 20
"""Interpreter, torch, transformers, tokenizer and calibration data before any weight loads (measured:
the children's resident size after their imports is about 0.6-0.7 GiB)."""

STREAMED = ("comp", "wanda_sp", "flap", "shortgpt", "magnitude")


def estimate_bytes(method: str, shape: Shape, dtype: str, weight_offload: str, nsamples: int, seq_len: int,
                   vocab: int | None = None, batch_size: int = 4) -> dict:
    """Peak host memory a prune needs, by parts (bytes; ``total`` is their sum). Deliberately simple:

    - ``base``: :data:`BASE_BYTES`;
    - ``weights``: the whole model (``none``, and ``cpu`` offload, which holds every layer in memory) or,
      with ``disk`` offload, embeddings/head plus three copies of one decoder layer (the layer, COMP's
      original-weights twin, the float32 copies its statistics take);
    - ``gradients`` (LLM-Pruner): one per parameter in the model's dtype, plus the backward's saved
      activations, about ``batch x seq x layers x (16 hidden + 5 intermediate + 2 heads x seq)`` values in it;
    - ``work``: float64 ``intermediate x intermediate`` matrices: nine for COMP (the FFN inputs' Gram
      matrices of its fitted and held-out calibration halves and their merge, the unit statistics, the
      criterion's inverse, the mask-tuning systems; nine fits the peaks measured from the SmolLM2-360M to
      the LLaMA-2-7B shape), one for the others; the calibration streams ``(2 + 1) x tokens x hidden x 4`` and one batch's float32
      logits and their log-softmax ``2 x batch x seq x vocab x 4``.
    """
    v = vocab or shape.vocab
    w = 2 if dtype in ("bfloat16", "float16") else 4
    P = param_count(shape, v)
    tokens = nsamples * seq_len
    parts = {"base": BASE_BYTES}
    if weight_offload == "disk" and method in STREAMED:
        parts["weights"] = (rest_params(shape, v) + 3 * layer_params(shape)) * w
    else:
        parts["weights"] = P * w
    if method == "llm_pruner":
        acts = batch_size * seq_len * shape.layers * (16 * shape.hidden + 5 * shape.intermediate
                                                       + 2 * shape.heads * seq_len) * w
        parts["gradients"] = P * w + acts
    gram = shape.intermediate ** 2 * 8 * (9 if method == "comp" else 1)
    parts["work"] = gram + 3 * tokens * shape.hidden * 4 + 2 * min(batch_size, nsamples) * seq_len * v * 4
    parts["total"] = sum(parts.values())
    return parts


def available_bytes() -> int:
    """MemAvailable of ``/proc/meminfo`` (psutil elsewhere)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.virtual_memory().available


def total_bytes() -> int | None:
    """MemTotal of ``/proc/meminfo`` (None where there is none)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def guard(estimate: dict, available: int, margin: int, total: int | None = None) -> str | None:
    """Why a run of ``estimate`` must not be launched with ``available`` bytes free (``margin`` kept back), or None."""
    if estimate["total"] > available - margin:
        return (f"needs about {gib(estimate['total'])} GiB of host memory "
                f"({', '.join(f'{k} {gib(b)}' for k, b in estimate.items() if k != 'total')}), "
                f"{gib(available)} GiB available less a {gib(margin)} GiB margin"
                + (f" (the machine has {gib(total)} GiB in all)" if total else ""))
    return None


def gib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2 ** 30:.2f}"


# ---- growth exponents ------------------------------------------------------------------------------
def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` (``y ~ c x^k``: returns ``k``); None with fewer
    than two distinct positive ``x``."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return sxy / sxx


def exponents(rows: list[dict]) -> dict[str, dict]:
    """Per method, the growth exponents of ``wall_s``, ``cpu_s`` and ``peak_rss_bytes`` over its ``ok`` rows."""
    out = {}
    for method in sorted({r["method"] for r in rows}):
        ok = sorted((r for r in rows if r["method"] == method and r["status"] == "ok"), key=lambda r: r["params"])
        xs = [r["params"] for r in ok]
        out[method] = {"points": len(ok), "shapes": [r["shape"] for r in ok],
                       **{f"{k}_exponent": fit_exponent(xs, [r.get(k) for r in ok])
                          for k in ("wall_s", "cpu_s", "peak_rss_bytes")}}
    return out


# ---- rows ------------------------------------------------------------------------------------------
def row_key(method: str, shape: str, dtype: str, weight_offload: str) -> str:
    return f"{method}__{shape}__{dtype}__{weight_offload}"


def row_path(rows_dir: Path, key: str) -> Path:
    return rows_dir / f"{key}.json"


def read_row(rows_dir: Path, key: str) -> dict | None:
    p = row_path(rows_dir, key)
    return json.loads(p.read_text()) if p.exists() else None


def write_row(rows_dir: Path, row: dict) -> None:
    from fedprune import atomic

    rows_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(row_path(rows_dir, row["key"]), row)


FINAL = ("ok", "oom", "skipped", "failed")


def offload_for(method: str, asked: str) -> str:
    """``asked`` for a method that streams its weights; ``none`` for one that needs the whole model."""
    return asked if method in STREAMED else "none"


def plan_runs(args) -> list[dict]:
    runs = []
    for shape in args.shapes:
        for method in args.methods:
            wo = offload_for(method, args.weight_offload)
            runs.append({"method": method, "shape": shape, "dtype": args.dtype, "weight_offload": wo,
                         "key": row_key(method, shape, args.dtype, wo)})
    return runs


def run_all(args, launch=None) -> list[dict]:
    """Every planned run: finished rows are kept (resume), the guard marks what cannot fit, the rest are
    launched (``launch(run, args) -> row``, default :func:`launch_child`) one at a time."""
    launch = launch or launch_child
    rows_dir = Path(args.results) / "rows"
    out = []
    t_stop = time.time() + args.budget if args.budget else None
    for run in plan_runs(args):
        prev = read_row(rows_dir, run["key"])
        if prev is not None and prev["status"] in FINAL and not args.redo:
            print(f"[scaling] {run['key']}: {prev['status']} already (resume)", flush=True)
            out.append(prev)
            continue
        shape = SHAPES[run["shape"]]
        vocab = TOKENIZER_VOCAB if args.vocab is None else args.vocab
        est = estimate_bytes(run["method"], shape, run["dtype"], run["weight_offload"], args.nsamples, args.seq_len,
                             vocab)
        avail = args.memory_limit or available_bytes()
        row = {**run, "params": param_count(shape, vocab), "vocab": vocab, "config_vocab": shape.vocab,
               "shape_source": shape.source, "ratio": args.ratio, "calibration": f"c4 {args.nsamples} x {args.seq_len}",
               "device": args.device, "estimate_bytes": est["total"], "estimate_parts": est,
               "available_bytes": avail, "wall_s": None, "cpu_s": None, "peak_rss_bytes": None,
               "peak_accelerator_bytes": None, "weight_bytes": param_count(shape, vocab) * (
                   2 if run["dtype"] in ("bfloat16", "float16") else 4), "caveat": CAVEAT}
        why = guard(est, avail, args.margin, None if args.memory_limit else total_bytes())
        if why:
            row.update(status="oom", reason=f"not launched: {why}", needs_bytes=est["total"])
            write_row(rows_dir, row)
            print(f"[scaling] {run['key']}: oom ({why})", flush=True)
            out.append(row)
            continue
        if t_stop is not None and time.time() > t_stop:
            print(f"[scaling] {run['key']}: --budget spent, not launched", flush=True)
            continue
        row["attempts"] = (prev or {}).get("attempts", [])
        row = launch(row, args)
        write_row(rows_dir, row)
        print(f"[scaling] {run['key']}: {row['status']} wall {row['wall_s']} s cpu {row['cpu_s']} s "
              f"peak {gib(row['peak_rss_bytes'])} GiB", flush=True)
        out.append(row)
    return out


def load_average() -> float:
    return os.getloadavg()[0]


def code_version() -> str | None:
    """The commit the package's code is at (``+dirty`` when its sources differ from it), None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def earlier_attempts(row: dict, resumed_layers: int) -> list[dict]:
    """The earlier attempts this one continues. A run that resumes a partial output adds to their wall
    and CPU time; one that starts from scratch (no partial output left: never started, or its work
    directory was removed) does not, and the attempts it replaces move to ``discarded_attempts``."""
    if resumed_layers or not row.get("attempts"):
        return list(row.get("attempts", []))
    row["discarded_attempts"] = row.get("discarded_attempts", []) + row["attempts"]
    row.pop("finished_layers", None)
    return []


def launch_child(row: dict, args) -> dict:
    """Prune in a child process (module docstring) and fill ``row`` with what it measured."""
    from fedprune import atomic, load_tokenizer

    shape = SHAPES[row["shape"]]
    work = Path(args.work)
    src = checkpoint_dir(work, shape, row["dtype"])
    if not src.exists():
        t0 = time.time()
        print(f"[scaling] writing the random checkpoint {src.name}", flush=True)
        write_random_checkpoint(shape, src, row["dtype"], row["vocab"], tokenizer=load_tokenizer(TOKENIZER))
        print(f"[scaling] written in {time.time() - t0:.0f} s", flush=True)
    out_dir = work / "pruned" / row["key"]
    job = {"model": str(src), "output": str(out_dir), "method": row["method"], "ratio": row["ratio"],
           "nsamples": args.nsamples, "seq_len": args.seq_len, "dtype": row["dtype"], "device": row["device"],
           "weight_offload": row["weight_offload"], "data_dir": args.data_dir,
           "result": str(work / "jobs" / f"{row['key']}.result.json")}
    jobfile = work / "jobs" / f"{row['key']}.job.json"
    jobfile.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(jobfile, job)
    Path(job["result"]).unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    cmd = ["nice", "-n", str(args.nice), sys.executable, str(Path(__file__).resolve()), "--child", str(jobfile)]
    from fedprune.models.stream_checkpoint import PROGRESS_FILE, partial_dir

    progress = partial_dir(out_dir) / PROGRESS_FILE
    resumed = len(json.loads(progress.read_text()).get("finished", {})) if progress.exists() else 0
    load_before = load_average()
    t0 = time.time()
    log = open(work / "jobs" / f"{row['key']}.log", "a")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if args.timeout and time.time() - t0 > args.timeout and not timed_out:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)  # the prune's partial output stays resumable
            t_kill = time.time()
        if timed_out and time.time() - t_kill > 60:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    wall = time.time() - t0
    attempt = {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
               "peak_rss_bytes": usage.ru_maxrss * 1024, "load_before": round(load_before, 2),
               "load_after": round(load_average(), 2), "exit": proc.returncode, "resumed_layers": resumed,
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0))}
    attempts = earlier_attempts(row, resumed) + [attempt]
    child = json.loads(Path(job["result"]).read_text()) if Path(job["result"]).exists() else {}
    row.update(attempts=attempts, wall_s=round(sum(a["wall_s"] for a in attempts), 2),
               cpu_s=round(sum(a["cpu_s"] for a in attempts), 2),
               peak_rss_bytes=max(a["peak_rss_bytes"] for a in attempts),
               load_before=attempts[0]["load_before"], load_after=attempt["load_after"],
               peak_accelerator_bytes=child.get("peak_accelerator_bytes"),
               host={"cpus": os.cpu_count(), "threads": args.threads, "machine": platform.machine()},
               code=code_version())
    for k in ("achieved_ratio", "params_after", "base_rss_bytes", "prune_wall_s"):
        if k in child:
            row[k] = child[k]
    if progress.exists():  # an unfinished streamed prune: how far it got (the next run resumes there)
        row["finished_layers"] = len(json.loads(progress.read_text()).get("finished", {}))
        row["layers"] = shape.layers
    if proc.returncode == 0 and child.get("ok"):
        row.update(status="ok", reason=None)
        if not args.keep_outputs:
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)
    elif timed_out:
        row.update(status="timeout", reason=f"stopped after --timeout {args.timeout} s; rerun resumes the "
                                            "partial output from its last finished layer" if
                   row["weight_offload"] != "none" else f"stopped after --timeout {args.timeout} s")
    elif proc.returncode == -signal.SIGKILL:
        row.update(status="oom", reason="killed by SIGKILL (the kernel's out-of-memory killer)",
                   needs_bytes=row["estimate_bytes"])
    else:
        row.update(status="failed", reason=f"exit {proc.returncode}: {child.get('error') or 'see the job log'}")
    return row


def child_main(jobfile: str) -> int:
    """The child: load the random checkpoint and prune it (Python API), report what it can see itself."""
    import traceback

    from fedprune import atomic
    from fedprune.memory_usage import current_rss_bytes, peak_rss_bytes

    job = json.loads(Path(jobfile).read_text())
    res: dict = {"ok": False}
    try:
        import torch

        import fedprune
        from fedprune.models.stream_checkpoint import PROGRESS_FILE, partial_dir

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        res["base_rss_bytes"] = current_rss_bytes()
        progress = partial_dir(job["output"]) / PROGRESS_FILE
        if progress.exists():
            res["resumed_layers"] = len(json.loads(progress.read_text()).get("finished", {}))
        t0 = time.time()
        model = fedprune.load_model(job["model"], dtype=job["dtype"], device=job["device"],
                                    weight_offload=job["weight_offload"])
        tok = fedprune.load_tokenizer(job["model"])
        r = fedprune.prune(model, job["method"], job["ratio"], tokenizer=tok, calibration="c4",
                           nsamples=job["nsamples"], seq_len=job["seq_len"], seed=0, data_dir=job["data_dir"],
                           output=job["output"], overwrite=True, weight_offload=job["weight_offload"])
        s = r.summary()
        res.update(ok=True, achieved_ratio=s.get("achieved_ratio"), params_after=s.get("params_after"),
                   prune_wall_s=round(time.time() - t0, 2))
        if str(job["device"]).startswith("cuda"):
            res["peak_accelerator_bytes"] = torch.cuda.max_memory_allocated()
    except BaseException as exc:  # recorded for the row, then re-raised (non-zero exit)
        res["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        traceback.print_exc()
        raise
    finally:
        res["child_peak_rss_bytes"] = peak_rss_bytes()
        atomic.write_json(job["result"], res)
    return 0


# ---- report ----------------------------------------------------------------------------------------
def summary(rows: list[dict], greedy: dict | None = None) -> dict:
    comp = [r for r in rows if r["method"] == "comp" and r["status"] in ("ok", "timeout")
            and r.get("dtype") == "bfloat16" and r.get("peak_rss_bytes") and r.get("weight_bytes")]
    out = {"caveat": CAVEAT, "rows": sorted(rows, key=lambda r: (r["method"], r["params"])),
           "exponents": exponents(rows),
           "comp_peak_over_bf16_weights": {
               r["shape"]: {"ratio": round(r["peak_rss_bytes"] / r["weight_bytes"], 3), "status": r["status"],
                            **({"note": "peak over the part that ran"} if r["status"] != "ok" else {})}
               for r in comp}}
    if greedy:
        out["comp_greedy"] = greedy
    return out


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def markdown(s: dict) -> str:
    lines = [f"# Pruning cost against model size ({CAVEAT})", "",
             "LLaMA-shaped models with random weights (SmolLM2 tokenizer, vocabulary 49152), 20 % of the parameters "
             "pruned with C4 calibration (8 windows x 128 tokens unless the row says otherwise), one thread, "
             "`nice -n 5`, on a 2-core machine shared with other benchmarks: CPU seconds (user + system of the "
             "prune's process) are the comparable figure, wall seconds are indicative; load = 1-minute load "
             "average before the run. Peak RSS = the prune process's maximum resident set (memory-mapped weight pages "
             "included while resident); estimate = the guard's memory model (`estimate_bytes`; the row keeps the "
             "estimate it was launched with).", "",
             "| method | shape | params (M) | dtype | weight offload | status | wall s | CPU s | peak RSS GiB | "
             "estimate GiB | peak / weights | load | note |",
             "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in s["rows"]:
        ratio = r["peak_rss_bytes"] / r["weight_bytes"] if r.get("peak_rss_bytes") and r.get("weight_bytes") else None
        est = r.get("estimate_bytes")
        if r.get("shape") in SHAPES and r.get("dtype") and r.get("weight_offload"):  # today's estimate
            est = estimate_bytes(r["method"], SHAPES[r["shape"]], r["dtype"], r["weight_offload"], 8, 128,
                                 r.get("vocab"))["total"] if r.get("calibration", "c4 8 x 128") == "c4 8 x 128" else est
        note = r.get("reason") or ""
        if len(r.get("attempts", [])) > 1:
            note = (note + f"; {len(r['attempts'])} attempts (resumed)").strip("; ")
        if r["status"] == "timeout" and r.get("finished_layers") is not None:
            note += f"; {r['finished_layers']} of {r['layers']} decoder layers finished so far"
        lines.append(f"| {r['method']} | {r['shape']} | {r['params'] / 1e6:.0f} | {r.get('dtype')} | {r.get('weight_offload')} "
                     f"| {r['status']} | {fmt(r.get('wall_s'))} | {fmt(r.get('cpu_s'))} | {gib(r.get('peak_rss_bytes'))} | "
                     f"{gib(est)} | {fmt(ratio, '.2f')} | {fmt(r.get('load_before'), '.2f')} | "
                     f"{note} |")
    lines += ["", f"Growth exponents k of y ~ params^k (least squares in log-log over the `ok` rows; {CAVEAT}):", "",
              "| method | points | wall s | CPU s | peak RSS |", "|---|---:|---:|---:|---:|"]
    for m, e in s["exponents"].items():
        lines.append(f"| {m} | {e['points']} | {fmt(e['wall_s_exponent'], '.2f')} | {fmt(e['cpu_s_exponent'], '.2f')} "
                     f"| {fmt(e['peak_rss_bytes_exponent'], '.2f')} |")
    lines += ["", "Peak / weights: peak RSS over the model's weight bytes in its dtype (the issue's bar: COMP at most "
              "1.2x its bfloat16 weights at the LLaMA-2-7B shape); for a `timeout` row, over the part that ran. At small "
              "shapes the fixed part (interpreter and libraries, tokenizer, C4 calibration text) dominates it. With "
              "`disk` offload the peak includes memory-mapped weight pages while they are resident; the kernel drops "
              "such clean pages under memory pressure, so a streamed run's peak also depends on how much memory the "
              "machine had free (the other benchmarks' use varied), which is likely why FLAP's peak is not "
              "monotonic in size (not verified).", ""]
    ratios = s.get("comp_peak_over_bf16_weights", {})
    if ratios:
        lines.append("COMP's peak RSS over its bfloat16 weight bytes: " + ", ".join(
            f"{shape} {v['ratio']:.2f}x" + (f" ({v['status']}: {v.get('note', '')})" if v["status"] != "ok" else "")
            for shape, v in ratios.items()) + ".")
    for r in s["rows"]:
        if r["status"] == "oom":
            lines.append(f"{r['method']} at the {r['shape']} shape (weight offload {r.get('weight_offload')}) was not "
                         f"launched: {(r.get('reason') or '').removeprefix('not launched: ')}.")
    lines.append("")
    if s.get("comp_greedy"):
        g = s["comp_greedy"]
        lines += ["COMP's neuron criterion (`rescale_obs`) per layer, from `comp_greedy.py` (one thread, random SPD "
                  "matrices: only time is meaningful; `removed` assumes 90 % of the budget in FFN channels): the float64 "
                  "inverse of the k x k Gram matrix of the FFN inputs (k = FFN width) and the greedy elimination "
                  "(lazy rank-1 downdates), projected over the layers:", "",
                  "| shape | k | matrix MiB | removed per layer | inverse CPU s | greedy CPU s | projected CPU s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in g["rows"]:
            lines.append(f"| {r['shape']} | {r['k']} | {r['matrix_bytes'] / 2 ** 20:.0f} | {r['removed_per_layer']} | "
                         f"{r['inverse_cpu_s']:.1f} | {r['greedy_cpu_s']:.1f} | {r['projected_criterion_cpu_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(s: dict, path: Path) -> None:
    """CPU seconds and peak RSS against parameters, log-log, a line per method through its ``ok`` rows; a
    stopped (``timeout``) row's figures so far as a hollow marker, an ``oom`` row's estimate as a cross on
    the memory panel, and the models' bfloat16 weight bytes (dashed) for scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    methods = sorted({r["method"] for r in s["rows"]})
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    for method in methods:
        mine = [r for r in s["rows"] if r["method"] == method]
        ok = sorted((r for r in mine if r["status"] == "ok" and r.get("cpu_s") and r.get("peak_rss_bytes")),
                    key=lambda r: r["params"])
        e = s["exponents"].get(method, {})
        c = colours[method]
        if ok:
            xs = [r["params"] for r in ok]
            axes[0].plot(xs, [r["cpu_s"] for r in ok], "o-", color=c,
                         label=f"{method} (k={fmt(e.get('cpu_s_exponent'), '.2f')})")
            axes[1].plot(xs, [r["peak_rss_bytes"] / 2 ** 30 for r in ok], "o-", color=c,
                         label=f"{method} (k={fmt(e.get('peak_rss_bytes_exponent'), '.2f')})")
        for r in mine:
            if r["status"] == "timeout" and r.get("cpu_s") and r.get("peak_rss_bytes"):
                done = f", {r['finished_layers']}/{r['layers']} layers" if r.get("finished_layers") is not None else ""
                axes[0].plot([r["params"]], [r["cpu_s"]], "o", mfc="none", color=c,
                             label=f"{method} {r['shape']} so far (stopped{done})")
                axes[1].plot([r["params"]], [r["peak_rss_bytes"] / 2 ** 30], "o", mfc="none", color=c,
                             label=f"{method} {r['shape']} so far")
            elif r["status"] == "oom" and r.get("needs_bytes"):
                axes[1].plot([r["params"]], [r["needs_bytes"] / 2 ** 30], "x", color=c, ms=9,
                             label=f"{method} {r['shape']}: would need (not run)")
    params = sorted({r["params"] for r in s["rows"] if r.get("weight_bytes")})
    if params:
        wb = {r["params"]: r["weight_bytes"] for r in s["rows"] if r.get("weight_bytes")}
        axes[1].plot(params, [wb[p] / 2 ** 30 for p in params], "--", color="grey", lw=1, label="model weights (dtype)")
    names = {r["params"]: r["shape"] for r in s["rows"]}
    for ax, what in zip(axes, ("CPU seconds (user + system)", "peak RSS (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted(names), [f"{names[p]}\n{p / 1e9:.2f} B" for p in sorted(names)], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("parameters (shape)")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"Pruning cost against model size, 20 % pruned, C4 8 x 128, 1 thread ({CAVEAT})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: Path) -> dict:
    from fedprune import atomic

    rows = [json.loads(p.read_text()) for p in sorted((results / "rows").glob("*.json"))]
    greedy = results / "comp_greedy.json"
    s = summary(rows, json.loads(greedy.read_text()) if greedy.exists() else None)
    atomic.write_json(results / "scaling.json", s)
    atomic.write_text(results / "scaling.md", markdown(s))
    if rows:
        plot(s, results / "scaling.png")
    return s


# ---- command line ----------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--methods", nargs="+", default=["comp", "wanda_sp", "flap", "llm_pruner"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--weight-offload", default="disk", choices=["none", "cpu", "disk"],
                   help="for the methods that stream (LLM-Pruner always loads the whole model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=None, help=f"vocabulary (default {TOKENIZER_VOCAB}, the tokenizer's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--nice", type=int, default=5)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run (0: none); a streamed run resumes")
    p.add_argument("--budget", type=float, default=0, help="launch no run after this many seconds (0: no limit)")
    p.add_argument("--margin", type=float, default=1.0, help="GiB of available memory kept back by the guard")
    p.add_argument("--memory-limit", type=float, default=None, help="GiB the guard takes as available")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--work", default=str(WORK), help="checkpoints and pruned outputs (large; not committed)")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--redo", action="store_true", help="run again rows that are already final")
    p.add_argument("--keep-outputs", action="store_true", help="keep the pruned checkpoints")
    p.add_argument("--report", action="store_true", help="only write scaling.json/md/png from the rows")
    args = p.parse_args(argv)
    args.margin = int(args.margin * 2 ** 30)
    args.memory_limit = int(args.memory_limit * 2 ** 30) if args.memory_limit else None
    unknown = [m for m in args.methods if m not in STREAMED + ("llm_pruner", "sleb")]
    if unknown:
        p.error(f"unknown methods {unknown}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1])
    args = parse_args(argv)
    if not args.report:
        run_all(args)
    s = report(Path(args.results))
    print(json.dumps(s["exponents"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
