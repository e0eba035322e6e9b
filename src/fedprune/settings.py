"""Where fedprune reads data and keeps its cache.

- data directory: ``--data-dir`` > ``$FEDPRUNE_DATA`` > ``../shared/data`` next to the
  project checkout (when it exists) > ``./data``.
- cache directory: ``$FEDPRUNE_CACHE`` > ``$XDG_CACHE_HOME/fedprune`` > ``~/.cache/fedprune``.
"""
from __future__ import annotations

import os
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def project_root() -> Path:
    return _PROJECT_ROOT


def data_dir(override: str | os.PathLike | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    env = os.environ.get("FEDPRUNE_DATA")
    if env:
        return Path(env).expanduser()
    for candidate in (_PROJECT_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return Path.cwd() / "data"


def cache_dir() -> Path:
    env = os.environ.get("FEDPRUNE_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "fedprune"
    path.mkdir(parents=True, exist_ok=True)
    return path
