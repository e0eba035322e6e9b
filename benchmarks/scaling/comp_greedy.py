"""What COMP's neuron criterion costs at each shape: ``rescale_obs``'s inverse and greedy elimination.

    python benchmarks/scaling/comp_greedy.py                 # every shape's FFN width
    python benchmarks/scaling/comp_greedy.py --shapes smollm2-135m smollm2-360m

COMP's default neuron criterion (``criteria.neuron._greedy_inverse_scores``) inverts the ``k x k``
float64 Gram matrix of a layer's FFN inputs (``k`` = intermediate width: ``O(k^3)``) and removes one
channel at a time, re-scoring after each removal (lazy rank-1 downdates since b8880a4: ``O(k t)`` for
the t-th; before, each removal rewrote the whole ``k x k`` inverse, ``O(k^2)`` memory traffic, which
made it most of COMP's CPU time: 221 of 255 CPU s at the SmolLM2-135M shape). This times, on one
thread and on a random SPD matrix (the cost does not depend on the values), the library's own
function on one layer with no removal (the inverse and final scores) and with the average number of
channels a layer loses (``removed``: 90 % of the ``--ratio`` budget in FFN channels of
``3 x hidden`` parameters each, COMP's default ``layer_fraction=0.1``; heads are not pruned by
default), and projects both over the layers: the criterion's share of COMP's CPU time, to set against
the measured totals in ``scaling.json``. Random matrices: only time is meaningful. Writes
``results/comp_greedy.json``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _bench():
    spec = importlib.util.spec_from_file_location("scaling_bench", HERE / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["scaling_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def time_greedy(k: int, n: int, seed: int = 0) -> dict:
    """CPU seconds of ``_greedy_inverse_scores`` on a ``k x k`` SPD matrix with no removal and with ``n``."""
    import torch

    from fedprune.pruning.criteria.neuron import _greedy_inverse_scores

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, 64, generator=g, dtype=torch.float64)
    A = x @ x.T + torch.eye(k, dtype=torch.float64)  # SPD
    del x
    ones = torch.ones(k, dtype=torch.float64)
    t = {}
    for m in (0, n):
        c0 = time.process_time()
        _greedy_inverse_scores(A, ones, m, 0.01)
        t[m] = time.process_time() - c0
    return {"k": k, "removed_per_layer": n, "inverse_cpu_s": round(t[0], 3),
            "greedy_cpu_s": round(max(t[n] - t[0], 0.0), 3), "matrix_bytes": k * k * 8}


def main(argv=None) -> int:
    sb = _bench()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(sb.SHAPES), choices=list(sb.SHAPES))
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--out", default=str(HERE / "results" / "comp_greedy.json"))
    args = p.parse_args(argv)
    import torch

    from fedprune import atomic

    torch.set_num_threads(1)
    rows = []
    for name in args.shapes:
        s = sb.SHAPES[name]
        params = sb.param_count(s, sb.TOKENIZER_VOCAB)
        per_layer = round(0.9 * args.ratio * params / (3 * s.hidden) / s.layers)
        r = time_greedy(s.intermediate, per_layer)
        r.update(shape=name, params=params, layers=s.layers,
                 projected_criterion_cpu_s=round(s.layers * (r["inverse_cpu_s"] + r["greedy_cpu_s"]), 1))
        rows.append(r)
        print(json.dumps(r), flush=True)
    atomic.write_json(args.out, {"caveat": "random matrices: only time is meaningful", "threads": 1,
                                 "machine": platform.machine(), "ratio": args.ratio, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
