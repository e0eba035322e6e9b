"""Federated data: Dolly-15k partitions, prompt formatting, completion-only tokenisation, and the
federated datasets by name (``FEDERATED_DATASETS``: dolly, commonsense_qa; see the end of this file).

Partitions (each a list of per-client record lists; a record has instruction, context,
response, category):
- ``shepherd``: the FedIT/Shepherd 10-client split by category, read as published;
- ``dirichlet``: the union of those files re-partitioned over N clients, each category's
  records split with proportions drawn from Dirichlet(alpha) (small alpha = more skew);
- ``iid``: the union shuffled and dealt round-robin.
The held-out set is always ``global_test.json`` (80 records, 10 per category).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..registry import Registry

CATEGORIES = ("brainstorming", "classification", "closed_qa", "creative_writing", "general_qa",
              "information_extraction", "open_qa", "summarization")
IGNORE_INDEX = -100

PROMPT_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
PROMPT_NO_CONTEXT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def load_shepherd_clients(override: str | None = None) -> list[list[dict]]:
    """The 10 Shepherd clients' records (read by :func:`fedprune.data.dolly_clients`)."""
    from ..data.dolly import dolly_clients

    return dolly_clients(override)


def load_test_set(override: str | None = None) -> list[dict]:
    """The 80 held-out records (read by :func:`fedprune.data.dolly_global_test`)."""
    from ..data.dolly import dolly_global_test

    return dolly_global_test(override)


def dirichlet_partition(records: Sequence[dict], num_clients: int, alpha: float, seed: int,
                        min_size: int = 1, key: str = "category") -> list[list[dict]]:
    """Split ``records`` over ``num_clients``: per category, proportions ~ Dirichlet(alpha).

    Redraws (up to 100 times) until every client has at least ``min_size`` records.
    """
    if num_clients < 1 or alpha <= 0:
        raise ValueError(f"dirichlet_partition needs num_clients >= 1 and alpha > 0, got {num_clients}, {alpha}")
    if len(records) < num_clients * min_size:
        raise ValueError(f"{len(records)} records cannot give {num_clients} clients {min_size} each")
    by_cat: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_cat.setdefault(r[key], []).append(i)
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for cat in sorted(by_cat):
            idx = list(by_cat[cat])
            rng.shuffle(idx)
            p = np_rng.dirichlet([float(alpha)] * num_clients)
            cuts = np.round(np.cumsum(p) * len(idx)).astype(int).tolist()
            start = 0
            for c, end in enumerate(cuts):
                parts[c].extend(idx[start:end])
                start = end
        if min(len(p) for p in parts) >= min_size:
            return [[records[i] for i in sorted(p)] for p in parts]
    raise ValueError(f"could not give every one of {num_clients} clients {min_size} records with alpha={alpha}; "
                     "raise alpha or lower the number of clients")


def iid_partition(records: Sequence[dict], num_clients: int, seed: int) -> list[list[dict]]:
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    return [[records[i] for i in idx[c::num_clients]] for c in range(num_clients)]


def build_partitions(kind: str, num_clients: int, seed: int, alpha: float = 0.5,
                     data_dir_override: str | None = None) -> list[list[dict]]:
    shepherd = load_shepherd_clients(data_dir_override)
    if kind == "shepherd":
        if num_clients != len(shepherd):
            raise ValueError(f"the shepherd split has {len(shepherd)} clients, not {num_clients}; "
                             "use partition=dirichlet or partition=iid for other client counts")
        return shepherd
    union = [r for part in shepherd for r in part]
    if kind == "dirichlet":
        return dirichlet_partition(union, num_clients, alpha, seed)
    if kind == "iid":
        return iid_partition(union, num_clients, seed)
    raise ValueError(f"unknown partition {kind!r}; choose shepherd, dirichlet or iid")


# ---- prompts and completion-only labels ------------------------------------------------------
def format_prompt(record: dict) -> str:
    """Alpaca/FedIT-style prompt (instruction, optional context); the response follows it."""
    ctx = (record.get("context") or "").strip()
    tmpl = PROMPT_WITH_CONTEXT if ctx else PROMPT_NO_CONTEXT
    return tmpl.format(instruction=record["instruction"].strip(), context=ctx)


def tokenize_example(tokenizer, record: dict, seq_len: int) -> dict[str, list[int]]:
    """``input_ids`` = prompt + response + EOS; ``labels`` = -100 on prompt tokens (completion-only).

    Prompt and response are tokenised separately so the boundary is exact. When too long, the
    response keeps at least a quarter of ``seq_len`` and the prompt keeps its *end* (which holds
    the instruction tail and the ``### Response:`` marker).
    """
    if seq_len < 8:
        raise ValueError(f"seq_len must be >= 8, got {seq_len}")
    p = tokenizer(format_prompt(record), add_special_tokens=False)["input_ids"]
    r = tokenizer(record["response"].strip(), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    return completion_only(p, r, seq_len)


def completion_only(prompt_ids: Sequence[int], response_ids: Sequence[int], seq_len: int) -> dict[str, list[int]]:
    """``input_ids`` = prompt + response, ``labels`` = -100 on the prompt (the loss is on the response).

    When longer than ``seq_len``, the response keeps at least a quarter of ``seq_len`` and the
    prompt keeps its *end* (the part next to the response)."""
    p, r = list(prompt_ids), list(response_ids)
    if len(p) + len(r) > seq_len:
        r_keep = min(len(r), max(seq_len // 4, seq_len - len(p)))
        r = r[:r_keep]
        p = p[len(p) - (seq_len - r_keep):] if seq_len - r_keep > 0 else []
    return {"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + list(r)}


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenised examples into a batch (padding is ignored by the loss)."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ---- the federated datasets by name ---------------------------------------------------------------
@dataclass(frozen=True)
class FederatedDataset:
    """What the runtimes need from a federated dataset (``data.dataset``).

    partitions(kind, num_clients, seed, alpha, data_dir) -> per-client record lists;
    heldout(data_dir) -> the held-out records (test loss, Rouge-L);
    tokenize(tokenizer, record, seq_len) -> ``{"input_ids", "labels"}`` (completion-only);
    prompt(record) / reference(record): the generation prompt and the reference answer (Rouge-L);
    choice_task: the zero-shot task (``fedprune.data``) whose first N examples give the run's
    accuracy (``eval.accuracy_examples``), None when the dataset has none.
    """

    name: str
    partition_kinds: tuple[str, ...]
    partitions: Callable[..., list[list[dict]]]
    heldout: Callable[[str | None], list[dict]]
    tokenize: Callable[..., dict]
    prompt: Callable[[dict], str]
    reference: Callable[[dict], str]
    choice_task: str | None = None


FEDERATED_DATASETS: Registry[FederatedDataset] = Registry("federated dataset")


def _csqa(attr: str):
    def call(*args, **kwargs):
        from . import csqa

        return getattr(csqa, attr)(*args, **kwargs)

    return call


FEDERATED_DATASETS.register("dolly", FederatedDataset(
    "dolly", ("shepherd", "dirichlet", "iid"), build_partitions, load_test_set, tokenize_example, format_prompt,
    lambda r: r["response"]))
FEDERATED_DATASETS.register("commonsense_qa", FederatedDataset(
    "commonsense_qa", ("iid", "dirichlet", "pathological"), _csqa("build_csqa_partitions"), _csqa("csqa_heldout"),
    _csqa("tokenize_csqa"), _csqa("csqa_prompt"), _csqa("answer_text"), "commonsense_qa_cloze"))


def federated_dataset(name: str) -> FederatedDataset:
    return FEDERATED_DATASETS.get(name)


def client_partitions(data, seed: int) -> list[list[dict]]:
    """Each client's records for ``data`` (a ``DataSettings``), capped at ``max_examples_per_client``."""
    parts = federated_dataset(data.dataset).partitions(data.partition, data.num_clients, seed, data.alpha,
                                                       data.data_dir)
    cap = data.max_examples_per_client
    return [p[:cap] if cap else p for p in parts]


def heldout_records(data) -> list[dict]:
    """The held-out records of ``data`` (a ``DataSettings``)."""
    return federated_dataset(data.dataset).heldout(data.data_dir)


def tokenize_record(tokenizer, record: dict, seq_len: int, dataset: str = "dolly") -> dict[str, list[int]]:
    """One training example of ``dataset`` (completion-only labels)."""
    return federated_dataset(dataset).tokenize(tokenizer, record, seq_len)
