"""What COMP's CPU time is made of at scale: the greedy elimination of its ``rescale_obs`` criterion.

    python benchmarks/scaling/comp_greedy.py                 # every shape's FFN width
    python benchmarks/scaling/comp_greedy.py --widths 1536 2560

COMP's neuron criterion (``criteria.neuron._greedy_inverse_scores``) inverts the ``k x k`` float64
Gram matrix of a layer's FFN inputs (``k`` = intermediate width) and then removes one channel at a
time, each removal a rank-1 downdate of the whole inverse: ``O(k^2)`` memory traffic per removed
channel, so ``O(n_removed x k^2)`` per layer. This times, on one thread and on a random SPD matrix
(the cost does not depend on the values), the library's own function with ``n`` and ``n + dn``
removals: the per-removal time is their difference over ``dn``, the fixed part (inverse, final
scores) the rest. ``projected_greedy_cpu_s`` multiplies them out for a whole prune at ``--ratio``,
assuming (as COMP's default ``layer_fraction=0.1`` does) that 90 % of the removed parameters are FFN
channels of ``3 x hidden`` parameters each (heads are not pruned by default): an estimate of the
criterion's share of COMP's CPU time, to set against the measured totals in ``scaling.json``.
Random matrices: only time is meaningful. Writes ``results/comp_greedy.json``.
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


def time_greedy(k: int, n: int, dn: int, seed: int = 0) -> dict:
    """CPU seconds of ``_greedy_inverse_scores`` on a ``k x k`` SPD matrix with ``n`` and ``n + dn`` removals."""
    import torch

    from fedprune.pruning.criteria.neuron import _greedy_inverse_scores

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, 64, generator=g, dtype=torch.float64)
    A = x @ x.T + torch.eye(k, dtype=torch.float64)  # SPD, rank-deficient part damped
    del x
    ones = torch.ones(k, dtype=torch.float64)
    t = {}
    for m in (n, n + dn):
        c0 = time.process_time()
        _greedy_inverse_scores(A, ones, m, 0.01)
        t[m] = time.process_time() - c0
    step = (t[n + dn] - t[n]) / dn
    return {"k": k, "cpu_s": {str(m): round(v, 3) for m, v in t.items()}, "step_cpu_s": step,
            "fixed_cpu_s": t[n] - n * step, "matrix_bytes": k * k * 8}


def main(argv=None) -> int:
    sb = _bench()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(sb.SHAPES), choices=list(sb.SHAPES))
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--dn", type=int, default=None,
                   help="removals between the two timings (default: 256 up to k = 3000, 32 up to 9000, else 16)")
    p.add_argument("--out", default=str(HERE / "results" / "comp_greedy.json"))
    args = p.parse_args(argv)
    import torch

    from fedprune import atomic

    torch.set_num_threads(1)
    rows = []
    for name in args.shapes:
        s = sb.SHAPES[name]
        k = s.intermediate
        r = time_greedy(k, args.n, args.dn or (256 if k <= 3000 else 32 if k <= 9000 else 16))
        params = sb.param_count(s, sb.TOKENIZER_VOCAB)
        channels = 0.9 * args.ratio * params / (3 * s.hidden)
        r.update(shape=name, params=params, layers=s.layers, removed_channels=round(channels),
                 projected_greedy_cpu_s=round(channels * r["step_cpu_s"] + s.layers * r["fixed_cpu_s"], 1))
        rows.append(r)
        print(json.dumps(r), flush=True)
    atomic.write_json(args.out, {"caveat": "random matrices: only time is meaningful", "threads": 1,
                                 "machine": platform.machine(), "ratio": args.ratio, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
