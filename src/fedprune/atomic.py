"""Atomic writes: a crash never leaves a half-written file or directory behind.

Files are written to a temporary sibling and renamed into place (``os.replace`` is atomic
on POSIX). Directories are built in a temporary sibling and swapped in the same way; an
existing directory is moved aside first and only deleted once the new one is in place.

Temporaries are named ``.NAME.<pid>-<host>.<random>.tmp`` (and a directory moved aside
``.NAME.old-<pid>-<host>``), so a later writer of NAME can tell its own leftovers from
anything else: :func:`sweep_stale` removes them once their process is gone (same host) or
they are older than :data:`STALE_AFTER_S`, and never touches a name that does not match.
While a temporary exists, SIGTERM is turned into an exception (:class:`Terminated`) so the
cleanup runs before the process exits.

JSON Lines logs are appended one fsynced line at a time; :func:`read_jsonl` tolerates a torn
last line (a crash mid-append) and names the file and line of any other malformed line.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

STALE_AFTER_S = 24 * 3600
"""A temporary untouched this long is abandoned even if its pid looks alive (pid reuse, other hosts)."""


class Terminated(SystemExit):
    """SIGTERM arrived while a temporary was being written; raised so cleanup runs, exit status 143."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


def host_tag() -> str:
    """Eight hex digits naming this host (a hostname can hold dots and dashes; the tag cannot)."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _tmp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}-{host_tag()}."


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[dict]:
    """Within the block SIGTERM raises :class:`Terminated`; the previous handler is restored after.

    The yielded dict's ``"defer"`` entry, when set True, postpones the exception (the signal is
    remembered in ``"pending"`` and raised when the block ends): for the steps that must not be
    cut in two, such as the two renames of a directory swap. Signal handlers can only be set from
    the main thread; elsewhere the block runs unguarded.
    """
    state = {"defer": False, "pending": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        if state["defer"]:
            state["pending"] = True
            return
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous)
    if state["pending"]:
        raise Terminated()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (by name, e.g. a writer that opens its own
    file); on success it is fsynced and renamed onto ``path``, on any exception (SIGTERM
    included) removed. Leftovers of writers killed harder are swept by :func:`sweep_stale`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    tmp = path.parent / f"{_tmp_prefix(path.name)}{secrets.token_hex(4)}.tmp"
    with _sigterm_raises():
        try:
            yield tmp
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def scratch_file(path: str | os.PathLike, tag: str = "scratch") -> Iterator[Path]:
    """Yield the name of a temporary sibling of ``path`` for an intermediate file (e.g. the f16 file a
    quantizer reads), removed when the block ends, whatever happens. Named like the temporaries of
    :func:`atomic_file` (``tag``: lower-case letters, digits, ``_``), so :func:`sweep_stale` removes one
    that a writer killed harder left behind."""
    if not re.fullmatch(r"[0-9a-z_]+", tag):
        raise ValueError(f"scratch tag {tag!r}: use lower-case letters, digits and _")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{_tmp_prefix(path.name)}{secrets.token_hex(4)}_{tag}.tmp"
    with _sigterm_raises():
        try:
            yield tmp
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp, open(tmp, "xb") as fh:
        fh.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line and fsync (a line is either fully there or not at all)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, default=_json_default) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl_lines(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """``(line, record)`` for every record of a JSON Lines file ([] if it does not exist).

    A last line that does not parse is a write torn by a crash: it is dropped with a warning
    (a resume rewrites the file without it). A malformed line before the last one is not a torn
    write but damage, and raises ``ValueError`` naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(i + 1, ln) for i, ln in enumerate(raw) if ln.strip()]
    out = []
    for k, (lineno, ln) in enumerate(numbered):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as exc:
            if k == len(numbered) - 1:
                log.warning("%s line %d is torn (an interrupted write?); ignoring it: %.60r", path, lineno, ln)
                break
            raise ValueError(f"{path} line {lineno} is not valid JSON ({exc.msg} at column {exc.colno}); "
                             "only the last line may be torn by a crash, so the file is damaged: "
                             "fix or delete that line") from None
        out.append((ln, rec))
    return out


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON Lines file; see :func:`read_jsonl_lines` for torn and malformed lines."""
    return [rec for _, rec in read_jsonl_lines(path)]


def _json_default(o: Any):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---- stale temporaries ------------------------------------------------------------------------
_OURS = re.compile(r"\.(?P<pid>\d+)-(?P<host>[0-9a-f]{8})\.[0-9a-z_]+\.tmp")
_OLD = re.compile(r"\.old-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})")
_LEGACY = re.compile(r"\.(?:[0-9a-z_]{8}\.tmp|old-\d+)")  # names of versions without pid/host tags


def _abandoned(entry: os.DirEntry, pid: int | None, host: str | None, now: float) -> bool:
    try:
        age = now - entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_AFTER_S:
        return True
    return pid is not None and host == host_tag() and pid != os.getpid() and not pid_alive(pid)


def sweep_stale(path: str | os.PathLike) -> list[Path]:
    """Remove leftovers of earlier writers of ``path`` that crashed; returns what was removed.

    Only siblings named exactly like this module's temporaries of ``path`` are considered, and
    only once their process is dead (same host) or they are older than :data:`STALE_AFTER_S`.
    A directory moved aside by a swap that died before the new one was in place is the only copy
    of the old contents: it is moved back to ``path`` rather than deleted.
    """
    path = Path(path)
    prefix = f".{path.name}"
    removed: list[Path] = []
    now = time.time()
    try:
        entries = [e for e in os.scandir(path.parent) if e.name.startswith(prefix)]
    except FileNotFoundError:
        return removed
    for e in entries:
        rest = e.name[len(prefix):]
        m = _OURS.fullmatch(rest) or _OLD.fullmatch(rest)
        legacy = m is None and _LEGACY.fullmatch(rest) is not None
        if m is None and not legacy:
            continue
        pid, host = (int(m["pid"]), m["host"]) if m else (None, None)
        if not _abandoned(e, pid, host, now):
            continue
        target = Path(e.path)
        if ".old-" in rest and not os.path.lexists(path):
            os.replace(target, path)
            log.warning("restored %s from %s, left aside by a writer that died mid-swap", path, target.name)
            continue
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
        log.warning("removed %s, a temporary left by a writer that died", target)
        removed.append(target)
    return removed


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` in one rename.

    On any exception, SIGTERM included, the temporary is removed; leftovers of earlier writers
    that were killed harder (SIGKILL, power loss) are swept by :func:`sweep_stale` first.
    This is the mechanism only: whether ``path`` may be replaced is :mod:`fedprune.outputs`' call.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    tag = _tmp_prefix(path.name)
    with _sigterm_raises() as term:
        tmp = path.parent / f"{tag}{secrets.token_hex(4)}.tmp"
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        term["defer"] = True  # the swap must not be cut in two; a SIGTERM now is raised after it
        try:
            _swap(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _swap(src: Path, path: Path) -> None:
    """Rename ``src`` onto ``path``; what was at ``path`` is moved aside first (``.NAME.old-<pid>-<host>``,
    which :func:`sweep_stale` restores if this process dies before the rename) and deleted after."""
    old = None
    try:
        if os.path.lexists(path):
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{host_tag()}")
            os.replace(path, old)
        os.replace(src, path)
    except BaseException:
        if old is not None and not os.path.lexists(path):
            os.replace(old, path)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def swap_directory(src: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the finished directory ``src`` (a sibling of ``path``, kept by the caller across runs, e.g. a
    resumable partial output) at ``path`` in one rename, as :func:`atomic_directory` does at its end;
    SIGTERM waits until the swap is done. On failure ``src`` is left as it was."""
    src, path = Path(src), Path(path)
    sweep_stale(path)
    with _sigterm_raises() as term:
        term["defer"] = True
        _swap(src, path)
