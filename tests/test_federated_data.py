"""Dolly partitions, prompt formatting, completion-only labels, device fleets and the cost model."""
from collections import Counter

import numpy as np
import pytest
import torch

from fedprune.federated.cost import payload_bytes, train_flops
from fedprune.federated.devices import DEVICE_PROFILES, device_link_mbit, parse_fleet, simulated_time
from fedprune.federated.partition import (
    IGNORE_INDEX, build_partitions, collate, dirichlet_partition, format_prompt, iid_partition, load_test_set,
    tokenize_example,
)


@pytest.fixture(scope="module")
def tokenizer():
    from fedprune import load_tokenizer

    return load_tokenizer("smollm2-135m")


REC = {"instruction": "Name a colour.", "context": "", "response": "Blue is a colour.", "category": "open_qa"}


def test_completion_only_labels(tokenizer):
    ex = tokenize_example(tokenizer, REC, seq_len=128)
    ids, labels = ex["input_ids"], ex["labels"]
    n_prompt = len(tokenizer(format_prompt(REC), add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == REC["response"]
    # the loss of a batch only counts response tokens
    batch = collate([ex, tokenize_example(tokenizer, REC, 16)], tokenizer.pad_token_id)
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == (len(ids) - n_prompt) + 4  # 16 // 4 kept of the 2nd
    assert batch["attention_mask"][1].sum() == 16


def test_prompt_template_with_and_without_context():
    assert "### Input:" not in format_prompt(REC)
    p = format_prompt({**REC, "context": "Colours: blue."})
    assert "### Input:\nColours: blue." in p and p.endswith("### Response:\n")


def test_shepherd_split_and_test_set():
    parts = build_partitions("shepherd", 10, seed=0)
    assert len(parts) == 10 and sum(map(len, parts)) == 14931
    test = load_test_set()
    assert len(test) == 80 and len(Counter(r["category"] for r in test)) == 8


def test_dirichlet_skew_and_cover():
    union = [r for p in build_partitions("shepherd", 10, seed=0) for r in p]
    parts = dirichlet_partition(union, 80, alpha=0.1, seed=1)
    assert len(parts) == 80 and sum(map(len, parts)) == len(union) and min(map(len, parts)) >= 1
    assert parts == dirichlet_partition(union, 80, alpha=0.1, seed=1)  # seeded
    # small alpha: a typical client is dominated by one category
    top = [Counter(r["category"] for r in p).most_common(1)[0][1] / len(p) for p in parts]
    assert sorted(top)[len(top) // 2] > 0.6
    iid = iid_partition(union, 7, seed=0)
    assert max(map(len, iid)) - min(map(len, iid)) <= 1
    with pytest.raises(ValueError, match="exactly|clients"):
        build_partitions("shepherd", 5, seed=0)


def test_fleet_and_profiles():
    fleet = parse_fleet("tx2:30,xavier-nx:40,agx-xavier:10")
    assert len(fleet) == 80 and Counter(p.name for p in fleet) == {"tx2": 30, "xavier-nx": 40, "agx-xavier": 10}
    tx2, nx, agx = (DEVICE_PROFILES.get(n) for n in ("tx2", "xavier-nx", "agx-xavier"))
    assert nx.train_flops_per_s / tx2.train_flops_per_s == pytest.approx(2.5)
    assert agx.train_flops_per_s / tx2.train_flops_per_s == pytest.approx(6.0)
    assert "phone" in DEVICE_PROFILES
    with pytest.raises(KeyError, match="known"):
        parse_fleet("tx3:2")
    with pytest.raises(ValueError, match="NAME:COUNT"):
        parse_fleet("tx2:x")


def test_fleet_entry_can_declare_its_memory_budget():
    a, b, c = parse_fleet("phone@1.5GB:2,tx2@512MB:1")
    assert a == b and a.memory_bytes == int(1.5 * 2**30) and a.name == "phone@1.5GB"
    assert a.rel_throughput == DEVICE_PROFILES.get("phone").rel_throughput  # the rest as registered
    assert c.memory_bytes == 512 * 2**20
    for bad in ("tx2@:1", "tx2@12:1", "tx2@-1GB:1", "tx2@lotsGB:1"):
        with pytest.raises(ValueError, match="memory size"):
            parse_fleet(bad)


def test_train_flops_and_simulated_time():
    assert train_flops(100, 10) == 6000.0
    assert train_flops(100, 10, trainable_params=5) == 6 * 105 * 10
    assert payload_bytes({"a": torch.zeros(3, 4), "b": torch.zeros(2, dtype=torch.float64)}) == 48 + 16
    tx2 = DEVICE_PROFILES.get("tx2")
    t = simulated_time(tx2, flops=tx2.train_flops_per_s * 10, bytes_moved=0, seed=0, round_idx=1, client=0)
    assert t["comm_s"] == 0 and t["compute_s"] == t["total_s"]
    assert 5 < t["total_s"] < 20  # 10 s times a log-normal jitter with sigma 0.1
    assert t == simulated_time(tx2, tx2.train_flops_per_s * 10, 0, seed=0, round_idx=1, client=0)
    lo = simulated_time(tx2, 0, 10**6, 0, 1, 0, links="round")
    assert 5 <= lo["bandwidth_mbit"] <= 100 and lo["compute_s"] == 0
    jitter = lo["comm_s"] / (10**6 / (lo["bandwidth_mbit"] * 1e6 / 8))
    assert 0.5 < jitter < 2.0


def test_device_links_persist_across_rounds_and_round_links_do_not():
    tx2 = DEVICE_PROFILES.get("tx2")
    own = [device_link_mbit(tx2, seed=0, client=c) for c in range(40)]
    assert all(5 <= b <= 100 for b in own) and max(own) - min(own) > 30  # devices differ
    for c in (0, 1):
        bw = [simulated_time(tx2, 0, 10**6, 0, r, c)["bandwidth_mbit"] for r in range(1, 200)]
        # round to round the link fluctuates around the device's own bandwidth (log-normal, sigma 0.3)
        assert abs(np.median(bw) / own[c] - 1) < 0.1
    fresh = [simulated_time(tx2, 0, 10**6, 0, r, 0, links="round")["bandwidth_mbit"] for r in range(1, 200)]
    assert np.std(fresh) > 20  # uniform 5..100 every round
    with pytest.raises(ValueError, match="link model"):
        simulated_time(tx2, 0, 1, 0, 1, 0, links="wifi")
