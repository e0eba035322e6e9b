"""Reading local data files so that a damaged file is named, with its line.

A data file cut short by an interrupted copy (a JSONL record ending mid-line) would
otherwise surface as a bare ``JSONDecodeError: Unterminated string`` with no hint of which
of the dozen files under the data directory is at fault.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _damaged(path: Path, line: int, column: int | None, msg: str) -> ValueError:
    where = f"{path}, line {line}" + (f" column {column}" if column is not None else "")
    return ValueError(f"malformed data file {where}: {msg} (the file may be truncated or damaged; "
                      "copy it again, see SOURCES.md of the data directory)")


def read_text(path: Path) -> str:
    """The file's UTF-8 text; undecodable bytes are reported with the line they are on."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _damaged(path, raw[:exc.start].count(b"\n") + 1, None, f"not UTF-8 text ({exc.reason})") from None


def read_json(path: Path) -> Any:
    """One JSON document."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise _damaged(path, exc.lineno, exc.colno, exc.msg) from None


def read_jsonl(path: Path) -> list[Any]:
    """One JSON record per non-empty line."""
    out = []
    for i, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise _damaged(path, i, exc.colno, exc.msg) from None
    return out
