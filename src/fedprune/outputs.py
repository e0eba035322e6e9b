"""Where fedprune may write: output guards and run locks, so no command destroys a user's files.

The rules (checked before any model is loaded or any work is done):

- A missing path, or an empty directory, is always fine (its parent must be writable).
- A pruned-model output (``prune --output``, :func:`fedprune.save_model`) replaces what is at the
  path only with ``--overwrite`` / ``overwrite=True``. Without it the error says what is there: a
  fedprune model (``plan.json``), a file, or a directory that is not a fedprune model.
- A federated run directory is never replaced: a new run needs a missing or empty directory, a
  directory holding a run is continued with ``--resume`` only.
- Never, even with ``--overwrite``: the current directory, a directory that contains it, a home
  directory or the filesystem root (these are never a model someone meant to replace).

A run lock (:func:`output_lock`) makes a second writer fail with the owner's pid, host and
start time instead of interleaving with the first: a file created with ``O_CREAT|O_EXCL``
holding that owner; a lock whose process is gone (same host) is stale and taken over with a
warning. A federated run is locked by ``RUN_DIR/.fedprune.lock`` for the whole run (resume
included); a pruned-model output by the sibling ``.NAME.lock`` while pruning and saving.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

from .atomic import pid_alive, sweep_stale

log = logging.getLogger(__name__)

RUN_LOCK = ".fedprune.lock"
MODEL_MARKER = "plan.json"  # models.checkpoint.PLAN_FILE (not imported: that would load torch)
RUN_MARKERS = ("config.yaml", "checkpoint.pt")
UNREADABLE_LOCK_GRACE_S = 60.0
"""A lock file still empty or unreadable after this long was left by a writer that died creating it."""


class OutputRefused(ValueError):
    """The output path holds something fedprune will not replace (without ``--overwrite``)."""


class OutputLocked(RuntimeError):
    """Another live process holds the lock on this output."""


# ---- guards -----------------------------------------------------------------------------------
def _protected(path: Path) -> str | None:
    """Why ``path`` may never be replaced, or None."""
    p = path.resolve()
    cwd = Path.cwd().resolve()
    if p == cwd:
        return "it is the current directory"
    if p in cwd.parents:
        return f"it contains the current directory {cwd}"
    if p == Path(p.anchor):
        return "it is the filesystem root"
    if p == Path.home().resolve() or p.parent in (Path("/home"), Path("/Users")) or p == Path("/root"):
        return "it is a home directory"
    return None


def _writable_parent(path: Path, what: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory."""
    anc = path.resolve().parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise OutputRefused(f"{what} {path}: {anc} is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputRefused(f"{what} {path}: cannot write into {anc} (permission denied)")


def _entries(path: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    return sorted(e for e in os.listdir(path) if e not in ignore)


def _sample(names: list[str]) -> str:
    shown = ", ".join(names[:4])
    return shown + (f", ... ({len(names)} entries)" if len(names) > 4 else "")


def check_model_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise :class:`OutputRefused` unless a pruned model may be written at ``path`` (rules above).

    Leftover temporaries of crashed earlier saves to ``path`` are swept first, so a directory a
    dead writer had moved aside is back in place before the decision is made.
    """
    path = Path(path)
    what = "output"
    sweep_stale(path)
    if not os.path.lexists(path):
        _writable_parent(path, what)
        return path
    why = _protected(path)
    if why:
        raise OutputRefused(f"refusing to replace {what} {path}: {why}; give a new directory")
    _writable_parent(path, what)
    if path.is_dir() and not path.is_symlink():
        names = _entries(path)
        if not names or overwrite:
            return path
        if MODEL_MARKER in names:
            raise OutputRefused(f"{what} {path} already holds a fedprune model; pass --overwrite "
                                "(overwrite=True) to replace it, or choose another directory")
        raise OutputRefused(f"{what} {path} is a directory that is not empty and not a fedprune model "
                            f"({_sample(names)}); refusing to replace it: choose another directory, or pass "
                            "--overwrite (overwrite=True) to delete its contents")
    if overwrite:
        return path
    kind = "symbolic link" if path.is_symlink() else "file"
    raise OutputRefused(f"{what} {path} is an existing {kind}; the pruned model is a directory: choose a new "
                        "path, or pass --overwrite (overwrite=True) to replace it")


def check_file_output(path: str | os.PathLike, overwrite: bool = False, what: str = "output") -> Path:
    """Raise :class:`OutputRefused` unless a file may be written at ``path``: a directory never is,
    an existing file only with ``overwrite`` (a previous results file included)."""
    path = Path(path)
    if path.is_dir():
        raise OutputRefused(f"{what} {path} is a directory; give a file path")
    _writable_parent(path, what)
    if os.path.lexists(path) and not overwrite:
        raise OutputRefused(f"{what} {path} already exists; pass --overwrite to replace it, or choose another path")
    return path


def check_run_output(path: str | os.PathLike) -> Path:
    """Raise :class:`OutputRefused` unless a new federated run may start in ``path`` (missing or empty)."""
    path = Path(path)
    if not os.path.lexists(path):
        _writable_parent(path, "run directory")
        return path
    if not path.is_dir():
        raise OutputRefused(f"run directory {path} is an existing file; give a directory path for --output")
    names = _entries(path, ignore=(RUN_LOCK,))
    if not names:
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputRefused(f"run directory {path}: permission denied")
        return path
    if all((path / m).exists() for m in RUN_MARKERS):
        raise ValueError(f"{path} already holds a run; use --resume or another --output")
    if (path / "config.yaml").exists():
        raise OutputRefused(f"{path} holds a run that stopped before its first checkpoint (no checkpoint.pt): "
                            "nothing to resume; delete it or choose another --output")
    raise OutputRefused(f"run directory {path} is not empty and not a fedprune run ({_sample(names)}); "
                        "choose a new or empty directory for --output")


def check_run_to_resume(path: str | os.PathLike) -> Path:
    """Raise unless ``path`` is a federated run directory that can be continued."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: nothing to resume")
    missing = [m for m in RUN_MARKERS if not (path / m).exists()]
    if missing:
        raise FileNotFoundError(f"{path} is not a resumable fedprune run directory: no {' or '.join(missing)}")
    return path


# ---- locks ------------------------------------------------------------------------------------
_held: dict[Path, list] = {}  # lock path -> [token, depth]: this process's locks (re-entrant)


def _owner(lock: Path) -> dict | None:
    try:
        d = json.loads(lock.read_text())
        return d if isinstance(d, dict) and "pid" in d else None
    except (OSError, ValueError):
        return None


def _describe(owner: dict | None, lock: Path) -> str:
    if owner is None:
        return f"an unknown process (lock file {lock} is being written or unreadable)"
    return (f"pid {owner['pid']} on host {owner.get('host', '?')} since {owner.get('started', '?')} "
            f"(lock file {lock})")


def _stale(owner: dict | None, lock: Path) -> bool:
    if owner is None:
        try:
            return time.time() - lock.stat().st_mtime > UNREADABLE_LOCK_GRACE_S
        except FileNotFoundError:
            return False
    return owner.get("host") == socket.gethostname() and not pid_alive(int(owner["pid"]))


def _try_create(lock: Path, token: str) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": token}
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _take_over(lock: Path, owner: dict | None) -> None:
    """Move a stale lock out of the way, unless another process replaced it meanwhile."""
    grave = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.rename(lock, grave)
    except FileNotFoundError:
        return
    if _owner(grave) != owner:  # we moved a fresh lock of a concurrent taker: put it back
        with contextlib.suppress(FileExistsError):
            os.link(grave, lock)
    else:
        log.warning("taking over the stale lock %s of %s: that process is no longer running", lock,
                    _describe(owner, lock).split(" (lock file")[0])
    grave.unlink()


@contextlib.contextmanager
def output_lock(lock: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold the lock file ``lock`` for the block; :class:`OutputLocked` if a live process holds it.

    Re-entrant within one process (``prune`` locks its output and its ``save_model`` does too).
    """
    lock = Path(lock).absolute()
    if lock in _held:
        _held[lock][1] += 1
        try:
            yield lock
        finally:
            _held[lock][1] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    for _ in range(3):
        if _try_create(lock, token):
            break
        owner = _owner(lock)
        if not _stale(owner, lock):
            raise OutputLocked(f"{what} is in use by {_describe(owner, lock)}: wait for that process to finish; "
                               "if it is gone (another host, a reused pid) delete the lock file")
        _take_over(lock, owner)
    else:
        raise OutputLocked(f"{what}: could not take the lock {lock} (it keeps changing hands)")
    _held[lock] = [token, 1]
    try:
        yield lock
    finally:
        del _held[lock]
        if (_owner(lock) or {}).get("token") == token:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


def model_output_lock(path: str | os.PathLike):
    """Lock an output (a pruned-model directory, a GGUF file) by its sibling ``.NAME.lock``: the
    output itself is swapped in by a rename, so it cannot hold the lock."""
    path = Path(path).absolute()
    return output_lock(path.with_name(f".{path.name}.lock"), f"output {path}")


def run_lock(run_dir: str | os.PathLike):
    """Lock a federated run directory by ``RUN_DIR/.fedprune.lock`` (created if missing)."""
    run_dir = Path(run_dir)
    return output_lock(run_dir / RUN_LOCK, f"run directory {run_dir}")
