"""Dolly-15k as partitioned by FedIT/Shepherd into 10 clients by category.

Files: ``dolly-15k-shepherd-10clients/local_training_{0..9}.json`` (one client each) and
``global_test.json`` (80 held-out records, 10 per category). Records have the fields
``instruction``, ``context``, ``response``, ``category``. This particular partition has no
public ``datasets`` mirror, so a missing file is an error naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path

from .catalog import DatasetSpec, local_or_hub, register, resolve_root
from .files import read_json

DOLLY_DIR = "dolly-15k-shepherd-10clients"
NUM_CLIENTS = 10
FIELDS = ("instruction", "context", "response", "category")


def _read_records(path: Path) -> list[dict]:
    records = read_json(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for r in records[:1]:
        missing = [f for f in FIELDS if f not in r]
        if missing:
            raise ValueError(f"{path}: records lack the fields {missing}")
    return records


def dolly_client(client: int, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The training records of Shepherd client ``client`` (0-9)."""
    if not 0 <= int(client) < NUM_CLIENTS:
        raise ValueError(f"dolly client must be in 0..{NUM_CLIENTS - 1}, not {client}")
    return local_or_hub(resolve_root(data_dir), (f"{DOLLY_DIR}/local_training_{int(client)}.json",),
                        _read_records, None, None)


def dolly_global_test(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The 80 held-out records (10 per category)."""
    return local_or_hub(resolve_root(data_dir), (f"{DOLLY_DIR}/global_test.json",), _read_records, None, None)


def dolly_clients(data_dir: str | os.PathLike | None = None) -> list[list[dict]]:
    """All 10 clients' records, client 0 first."""
    return [dolly_client(i, data_dir) for i in range(NUM_CLIENTS)]


def _load_all(root: Path) -> dict:
    return {"clients": [dolly_client(i, root) for i in range(NUM_CLIENTS)], "global_test": dolly_global_test(root)}


register(DatasetSpec("dolly", "records", _load_all,
                     "Dolly-15k, Shepherd 10-client split by category (+ 80 global test records)"))
