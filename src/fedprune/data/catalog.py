"""The dataset registry and the rules for finding a dataset's files.

Every dataset is read from the data directory first (``--data-dir`` > ``$FEDPRUNE_DATA`` >
``../shared/data``, see :mod:`fedprune.settings`); when its file is missing there, the public
Hugging Face ``datasets`` source is tried; when that fails too, the error names the exact
file to put where.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..registry import Registry
from ..settings import data_dir as _data_dir

log = logging.getLogger(__name__)

KINDS = ("text", "choice", "records")


@dataclass(frozen=True)
class DatasetSpec:
    """What the registry holds for one dataset name.

    kind: ``text`` (a corpus for perplexity / calibration: ``load(root) -> str``),
    ``choice`` (a zero-shot multiple-choice task: ``load(root) -> list[dict]`` of
    Hugging-Face-shaped records, turned into examples by ``to_example``) or ``records``.
    reported: the metric quoted for a zero-shot task (evaluation.md), ``ppl`` for text.
    in_average: whether the task counts in the headline "avg zero-shot".
    """

    name: str
    kind: str
    load: Callable[[Path], Any]
    description: str
    reported: str | None = None
    in_average: bool = False
    to_example: Callable[[dict], Any] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"dataset {self.name!r}: kind must be one of {KINDS}, not {self.kind!r}")
        if self.kind == "choice" and (self.reported not in ("acc", "acc_norm") or self.to_example is None):
            raise ValueError(f"choice task {self.name!r} needs reported in (acc, acc_norm) and a to_example")


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register(spec: DatasetSpec) -> DatasetSpec:
    return DATASETS.register(spec.name, spec)


def get_dataset(name: str) -> DatasetSpec:
    return DATASETS.get(name)


def resolve_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory (see :func:`fedprune.settings.data_dir`)."""
    return _data_dir(data_dir)


def check_data_dir(data_dir: str | os.PathLike | None, option: str = "--data-dir") -> None:
    """A data directory given explicitly must exist (else every dataset would be looked up on the hub)."""
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise FileNotFoundError(f"{option} {data_dir}: no such directory")


def missing_file_error(root: Path, relpath: str, hub: str | None, cause: Exception | None = None) -> FileNotFoundError:
    """An error that says exactly which file to put where (and what was tried online)."""
    where = root / relpath
    msg = f"dataset file not found: {where} (put the file '{relpath}' under the data directory {root}"
    msg += ", or pass --data-dir / set $FEDPRUNE_DATA to a directory that has it"
    if hub:
        msg += f"; the public source {hub} could not be loaded either"
        if cause is not None:
            msg += f": {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    return FileNotFoundError(msg + "; see SOURCES.md of the data directory for provenance)")


def local_or_hub(root: Path, relpaths: tuple[str, ...], read_local: Callable[..., Any],
                 hub: tuple[str, str | None, str] | None, read_hub: Callable[[Any], Any] | None,
                 hub_kwargs: dict | None = None) -> Any:
    """Read ``relpaths`` under ``root`` with ``read_local(*paths)``; else ``datasets.load_dataset(*hub)``.

    hub: (path, config name or None, split) given to ``datasets.load_dataset``; its result
    goes through ``read_hub``. Raises :func:`missing_file_error` naming the first missing file.
    """
    paths = [root / r for r in relpaths]
    absent = [r for r, p in zip(relpaths, paths) if not p.is_file()]
    if not absent:
        return read_local(*paths)
    hub_name = None if hub is None else "/".join(x for x in hub[:2] if x) + f" (split {hub[2]})"
    if hub is None or read_hub is None:
        raise missing_file_error(root, absent[0], None)
    log.info("%s not found under %s; trying the public source %s", absent[0], root, hub_name)
    try:
        ds = load_hub(*hub, **(hub_kwargs or {}))
        return read_hub(ds)
    except Exception as exc:  # offline, renamed, script datasets no longer supported, ...
        raise missing_file_error(root, absent[0], hub_name, exc) from exc


def load_hub(path: str, name: str | None, split: str, **kwargs):
    """``datasets.load_dataset`` (imported lazily: it is an optional dependency)."""
    import datasets

    return datasets.load_dataset(path, name, split=split, **kwargs)
