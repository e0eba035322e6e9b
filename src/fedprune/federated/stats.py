"""Statistics for comparing federated methods over seeds and questions (pure functions).

- :func:`mean_sd`: mean and sample standard deviation (``ddof=1``) of per-seed scores;
- :func:`t_interval`: mean and two-sided Student-t interval (95 % by default) of a sample;
- :func:`paired_t_interval`: the same for the per-seed differences ``a[s] - b[s]`` (methods run
  with the same seed share the client sampling, data partition and LoRA initialisation, so the
  seed is the pairing unit);
- :func:`paired_bootstrap`: percentile interval of ``mean(a) - mean(b)`` when the *questions* are
  resampled with replacement (the same resampled questions for both methods and every seed),
  from per-question 0/1 correctness ``[seeds, questions]``;
- :func:`compare_to_baselines`: the benchmark's summary: the best baseline by mean score, the
  margin in points, both intervals, and ``beats`` = the paired t-interval lies above zero.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def t_central_probability(t: float, df: int) -> float:
    """``P(|T| < t)`` for Student's t with integer ``df`` (the closed-form finite series, e.g.
    Abramowitz & Stegun 26.7.3-4, with ``theta = atan(t / sqrt(df))``)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    if t <= 0:
        return 0.0
    th = math.atan(t / math.sqrt(df))
    c2, s = math.cos(th) ** 2, math.sin(th)
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df - 3 power at most
        term, acc = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            acc += term
        return 2 / math.pi * (th + s * math.cos(th) * acc)
    term, acc = 1.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df - 2 power at most
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        acc += term
    return s * acc


def t_quantile(level: float, df: int) -> float:
    """``t`` with ``P(|T| < t) = level`` (the two-sided interval's multiplier; 95 %, 2 df: 4.3027),
    by bisection on :func:`t_central_probability` (no SciPy needed)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = 0.0, 1.0
    while t_central_probability(hi, df) < level:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central_probability(mid, df) < level else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2


def mean_sd(xs: Sequence[float]) -> dict:
    """``{"mean", "sd", "n"}``; ``sd`` is the sample standard deviation (None for one value)."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("mean_sd needs at least one value")
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"mean": mean, "sd": sd, "n": n}


def t_interval(xs: Sequence[float], level: float = 0.95) -> dict:
    """``{"mean", "sd", "n", "low", "high", "level"}``: ``mean -+ t_{n-1} * sd / sqrt(n)``
    (bounds None with fewer than two values)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    out = {**mean_sd(xs), "level": level, "low": None, "high": None}
    if out["n"] > 1:
        half = t_quantile(level, out["n"] - 1) * out["sd"] / math.sqrt(out["n"])
        out.update(low=out["mean"] - half, high=out["mean"] + half)
    return out


def paired_t_interval(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> dict:
    """t-interval of ``a[s] - b[s]`` over the seeds ``s`` both have (``seeds`` lists them)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no common seed: {sorted(a)} vs {sorted(b)}")
    return {**t_interval([a[s] - b[s] for s in seeds], level), "seeds": seeds}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile interval of ``mean(a) - mean(b)`` under resampling of the questions.

    ``a``, ``b``: per-question correctness ``[questions]`` or ``[seeds, questions]`` (same seeds,
    same questions, same order). Each replicate draws ``questions`` indices with replacement
    (``numpy.random.default_rng(seed)``) and takes the mean over the seeds and the drawn
    questions of ``a - b``; ``diff`` is the observed difference."""
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same seeds and questions: shapes {a.shape} vs {b.shape}")
    if a.shape[1] == 0:
        raise ValueError("paired bootstrap needs at least one question")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    d = (a - b).mean(axis=0)  # per question: difference averaged over the seeds
    n = d.shape[0]
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for start in range(0, n_boot, 1000):  # bounded memory: 1000 x n indices at a time
        m = min(1000, n_boot - start)
        reps[start:start + m] = d[rng.integers(0, n, size=(m, n))].mean(axis=1)
    low, high = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(d.mean()), "low": float(low), "high": float(high), "level": level,
            "n_boot": n_boot, "rng_seed": seed, "questions": n, "seeds": a.shape[0]}


def compare_to_baselines(scores: Mapping[str, Mapping[int, float]], ours: str, baselines: Sequence[str],
                         correct: Mapping[str, Mapping[int, Sequence[int]]] | None = None, level: float = 0.95,
                         n_boot: int = 10000, boot_seed: int = 0) -> dict:
    """Summary of method ``ours`` against the best of ``baselines`` (by mean score over seeds).

    ``scores[method][seed]`` = accuracy in [0, 1]; ``correct[method][seed]`` = per-question 0/1 (for
    the bootstrap; optional). Returns ``seeds`` (those every compared method has),
    ``best_baseline``, ``margin_points`` (100 x difference of the means over those seeds),
    ``paired_t`` (in points), ``bootstrap`` (in points, when ``correct`` is given) and
    ``beats_best_memory_aware_baseline``: True only when the paired t-interval's lower bound is
    above zero (False with fewer than two seeds: no interval)."""
    have = [m for m in baselines if scores.get(m)]
    if ours not in scores or not scores[ours] or not have:
        raise ValueError(f"need scores of {ours!r} and of at least one of {list(baselines)}; got {sorted(scores)}")
    seeds = sorted(set(scores[ours]).intersection(*(set(scores[m]) for m in have)))
    if not seeds:
        raise ValueError(f"no seed common to {ours!r} and {have}")
    means = {m: sum(scores[m][s] for s in seeds) / len(seeds) for m in have}
    best = max(have, key=lambda m: (means[m], m))
    pt = paired_t_interval({s: scores[ours][s] for s in seeds}, {s: scores[best][s] for s in seeds}, level)
    pts = lambda x: None if x is None else 100 * x  # noqa: E731
    out = {"seeds": seeds, "ours": ours, "best_baseline": best, "baselines_considered": have,
           "baseline_means_points": {m: 100 * v for m, v in means.items()},
           "margin_points": 100 * pt["mean"],
           "paired_t": {"mean": pts(pt["mean"]), "sd": pts(pt["sd"]), "low": pts(pt["low"]), "high": pts(pt["high"]),
                        "level": level, "n": pt["n"]},
           "beats_best_memory_aware_baseline": bool(pt["low"] is not None and pt["low"] > 0)}
    if correct is not None:
        a = np.array([correct[ours][s] for s in seeds])
        b = np.array([correct[best][s] for s in seeds])
        bs = paired_bootstrap(a, b, n_boot, boot_seed, level)
        out["bootstrap"] = {**bs, "diff": 100 * bs["diff"], "low": 100 * bs["low"], "high": 100 * bs["high"]}
    return out
