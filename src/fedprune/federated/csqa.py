"""CommonsenseQA as a federated dataset: concept groups, partitions, cloze training examples.

A multiple-choice task where a 135M model's accuracy can move (Dolly's Rouge-L and loss do
not show whether a model got better at anything measurable). Records are the Hugging Face
shaped ones of :mod:`fedprune.data.csqa` plus ``group`` (an int).

Groups: the ``question_concept`` of the 9,741 training questions takes 2,151 values, most of
them a handful of times, so the 19 most frequent concepts (``person``, ``people``, ``human``,
...; ties broken by name) are one group each and every other concept falls into group 19.
The 19 hold 1,108 questions, the rest 8,633: Dirichlet skew shows in how the 19 small groups
are spread, and the pathological split gives most clients one small group plus a share of the
large one.

Partitions (pure functions of the records and a seed; each record lands on exactly one client):
- ``iid``: shuffled and dealt round-robin (``partition.iid_partition``);
- ``dirichlet``: per group, proportions ~ Dirichlet(alpha) (``partition.dirichlet_partition``);
- ``pathological``: each client holds exactly two groups; each group's records are split
  evenly over the clients holding it (needs ``2 * num_clients >= 20`` so every group has one).

Training example: context ``Question: {stem}\\nAnswer:``, response `` {right answer}``, split
into tokens exactly as the ``commonsense_qa_cloze`` evaluation scores that pair (lm-eval's
rules, :func:`fedprune.evaluate.loglik.encode_pair`) and with the loss on the answer tokens
only, no EOS: the held-out loss is then the per-token negative log-likelihood of the right
answer that the evaluation's ``acc`` compares across choices.
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Sequence

import numpy as np

NUM_TOP_CONCEPTS = 19
"""concepts that are a group of their own; the rest share one more group"""


def concept_groups(records: Sequence[dict], top: int = NUM_TOP_CONCEPTS) -> tuple[list[int], list[str]]:
    """``(group of each record, group names)``: the ``top`` most frequent ``question_concept``
    values are groups ``0..top-1`` in order of frequency (ties by name), every other concept is
    group ``top`` (named ``"other"``; absent when there are no other concepts)."""
    counts = Counter(r["question_concept"] for r in records)
    ranked = sorted(counts, key=lambda c: (-counts[c], c))[:top]
    index = {c: g for g, c in enumerate(ranked)}
    groups = [index.get(r["question_concept"], len(ranked)) for r in records]
    names = ranked + (["other"] if len(counts) > len(ranked) else [])
    return groups, names


def with_groups(records: Sequence[dict], top: int = NUM_TOP_CONCEPTS) -> list[dict]:
    """The records, each with its ``group`` added."""
    groups, _ = concept_groups(records, top)
    return [{**r, "group": g} for r, g in zip(records, groups)]


def pathological_groups(num_groups: int, num_clients: int, seed: int, per_client: int = 2) -> list[list[int]]:
    """The groups each client holds: a seeded permutation of the groups, cycled, dealt
    ``per_client`` at a time, so each client gets ``per_client`` distinct groups and every group
    goes to some client (which needs ``per_client * num_clients >= num_groups``)."""
    if num_groups < per_client:
        raise ValueError(f"a pathological split of {per_client} groups per client needs at least {per_client} groups, "
                         f"got {num_groups}")
    if per_client * num_clients < num_groups:
        raise ValueError(f"data.partition=pathological gives each client {per_client} groups: {num_clients} clients "
                         f"cannot hold all {num_groups} groups; use data.num_clients >= "
                         f"{-(-num_groups // per_client)} or partition=dirichlet")
    perm = list(range(num_groups))
    random.Random(seed).shuffle(perm)
    cycle = [perm[k % num_groups] for k in range(per_client * num_clients)]
    return [sorted(cycle[per_client * c:per_client * (c + 1)]) for c in range(num_clients)]


def pathological_partition(records: Sequence[dict], num_clients: int, seed: int, per_client: int = 2,
                           key: str = "group") -> list[list[dict]]:
    """Each client holds exactly ``per_client`` groups (``record[key]``); a group's records are
    shuffled and split into near-equal contiguous shares over the clients holding it."""
    by_group: dict = {}
    for i, r in enumerate(records):
        by_group.setdefault(r[key], []).append(i)
    names = sorted(by_group)
    held = pathological_groups(len(names), num_clients, seed, per_client)
    holders: dict[int, list[int]] = {}
    for c, gs in enumerate(held):
        for g in gs:
            holders.setdefault(g, []).append(c)
    rng = random.Random(seed + 1)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for g, name in enumerate(names):
        idx = list(by_group[name])
        rng.shuffle(idx)
        for c, share in zip(holders[g], np.array_split(np.array(idx, dtype=np.int64), len(holders[g]))):
            parts[c].extend(int(i) for i in share)
    return [[records[i] for i in sorted(p)] for p in parts]


def build_csqa_partitions(kind: str, num_clients: int, seed: int, alpha: float = 0.5,
                          data_dir: str | None = None) -> list[list[dict]]:
    """The training questions (with their ``group``) split over ``num_clients``."""
    from ..data.csqa import csqa_train
    from .partition import dirichlet_partition, iid_partition

    records = with_groups(csqa_train(data_dir))
    if kind == "iid":
        return iid_partition(records, num_clients, seed)
    if kind == "dirichlet":
        return dirichlet_partition(records, num_clients, alpha, seed, key="group")
    if kind == "pathological":
        return pathological_partition(records, num_clients, seed)
    raise ValueError(f"unknown partition {kind!r} for commonsense_qa; choose iid, dirichlet or pathological")


def csqa_heldout(data_dir: str | None = None) -> list[dict]:
    """The validation questions (the ``commonsense_qa_cloze`` evaluation's), in file order."""
    from ..data.csqa import csqa_valid

    return csqa_valid(data_dir)


def answer_text(record: dict) -> str:
    from ..data.csqa import answer_index

    return record["choices"]["text"][answer_index(record)]


def csqa_prompt(record: dict) -> str:
    from ..data.csqa import cloze_prompt

    return cloze_prompt(record)


def tokenize_csqa(tokenizer, record: dict, seq_len: int) -> dict[str, list[int]]:
    """``input_ids`` = the cloze prompt + the right answer, tokenised as the evaluation scores
    them; ``labels`` = -100 except on the answer's tokens."""
    from ..evaluate.loglik import encode_pair
    from .partition import completion_only

    if seq_len < 8:
        raise ValueError(f"seq_len must be >= 8, got {seq_len}")
    enc = encode_pair(tokenizer, csqa_prompt(record), " " + answer_text(record))
    return completion_only(enc.context, enc.continuation, seq_len)
