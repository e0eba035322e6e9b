"""A federated run directory's saved state, read safely: what a resume checks before it writes anything.

- The checkpoint is loaded with ``torch.load(weights_only=True)``: tensors, containers and plain
  values only. A checkpoint that needs anything else (a crafted pickle in a shared run directory
  would run code) is refused; the strategies keep their state in those plain types.
- A resume continues the run it started: it may extend ``federation.rounds`` and change ``eval.*``
  (what is measured, not what is trained); any other change is refused by name. The checkpoint
  must agree with ``config.yaml`` (same strategy and settings) and not be past the last round.
- Only then are the logs truncated to the checkpoint's round (a torn last line included),
  ``config.yaml`` rewritten with the accepted changes, and the resume recorded in ``resumes.jsonl``.
"""
from __future__ import annotations

import io
import pickle
import time
from pathlib import Path
from typing import Any

import torch

from ... import atomic
from ..config import FederatedConfig, dump_config, load_config

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "fedprune-fedstate/1"
CONFIG_FILE = "config.yaml"
RESUME_LOG = "resumes.jsonl"
LOGS = ("metrics.jsonl", "clients.jsonl")
CHANGEABLE_ON_RESUME = ("federation.rounds", "eval.*")
"""settings a resume may change: how long the run goes on and what is evaluated, not what is trained"""


def _changeable(key: str) -> bool:
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in CHANGEABLE_ON_RESUME)


def flat_config(d: dict[str, Any]) -> dict[str, Any]:
    """``{"section.key": value}`` of a config dict."""
    return {f"{s}.{k}": v for s, group in d.items() for k, v in (group or {}).items()}


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list]:
    """``{"section.key": [before, after]}`` for every setting that differs."""
    a, b = flat_config(before), flat_config(after)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_plain(data: bytes | str | Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` of a file or bytes, with errors that say what to do."""
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return torch.load(src, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"refusing to load {what}: it holds objects other than tensors and plain values, "
                         f"which only a crafted or foreign file does (loading it could run code). "
                         f"Details: {str(exc).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"cannot read {what}: {exc} (truncated or not a torch file?)") from None


def stored_config(run_dir: Path) -> FederatedConfig:
    path = run_dir / CONFIG_FILE
    try:
        return load_config(path)
    except ValueError as exc:
        raise ValueError(f"{path} is not a valid run config: {exc}") from None


def check_resume(run_dir: str | Path, cfg: FederatedConfig) -> tuple[dict, dict[str, list]]:
    """Load and validate ``run_dir``'s checkpoint for continuing it with ``cfg``; writes nothing.

    Returns ``(state, changes)``: the checkpoint's state and the accepted ``{key: [old, new]}``
    setting changes. Raises ``ValueError`` naming the problem: a refused change, a checkpoint that
    is not plain data, of another format or strategy, disagreeing with ``config.yaml``, or past
    ``federation.rounds``.
    """
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"no {CHECKPOINT} in {run_dir}: nothing to resume")
    stored = stored_config(run_dir)
    changes = config_changes(stored.to_dict(), cfg.to_dict())
    refused = [k for k in changes if not _changeable(k)]
    if refused:
        detail = "; ".join(f"{k} from {changes[k][0]!r} to {changes[k][1]!r}" for k in refused)
        raise ValueError(f"a resume cannot change {detail}: it continues {run_dir} with the settings it started "
                         f"with; only {', '.join(CHANGEABLE_ON_RESUME)} may change (start a new run for the rest)")
    state = load_plain(path, str(path))
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: checkpoint format {got!r} is not {CHECKPOINT_FORMAT!r}")
    if state.get("strategy") != stored.federation.strategy:
        raise ValueError(f"{path} is from strategy {state.get('strategy')!r} but {run_dir / CONFIG_FILE} says "
                         f"{stored.federation.strategy!r}: the directory was written by two runs; it cannot be resumed")
    if isinstance(state.get("config"), dict):
        # settings a later fedprune added are absent from an older checkpoint and take their defaults
        then, now = flat_config(state["config"]), flat_config(stored.to_dict())
        differ = sorted(k for k in then.keys() & now.keys() if then[k] != now[k] and not _changeable(k))
        if differ:
            raise ValueError(f"{path} was written with other settings than {run_dir / CONFIG_FILE} says "
                             f"({', '.join(differ)}): the directory was written by two runs; it cannot be resumed")
    done = int(state.get("round", 0))
    if done > cfg.federation.rounds:
        raise ValueError(f"{path} is after round {done} but federation.rounds={cfg.federation.rounds}; "
                         f"give federation.rounds>={done}")
    return state, changes


def commit_resume(run_dir: str | Path, cfg: FederatedConfig, round_done: int, changes: dict[str, list]) -> None:
    """After :func:`check_resume` passed: drop log lines newer than the checkpoint (a torn last line
    too), rewrite ``config.yaml`` with the accepted changes and append the resume to ``resumes.jsonl``."""
    run_dir = Path(run_dir)
    for name in LOGS:
        p = run_dir / name
        if p.exists():
            kept = [ln for ln, rec in atomic.read_jsonl_lines(p) if rec.get("round", 0) <= round_done]
            atomic.write_text(p, "".join(ln + "\n" for ln in kept))
    if changes:
        atomic.write_text(run_dir / CONFIG_FILE, dump_config(cfg))
    atomic.append_jsonl(run_dir / RESUME_LOG, {"after_round": round_done, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                               "changes": changes})
