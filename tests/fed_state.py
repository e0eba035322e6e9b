"""Comparing two federated runs' saved state exactly, ``meta`` included (the strategy's state)."""
from __future__ import annotations

from typing import Any

import torch


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """``a`` equals ``b`` exactly: tensors element by element (and dtype), containers recursively."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), \
            f"{where}: keys {sorted(a, key=str)} != {sorted(b, key=str)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run_state(a, b) -> None:
    """Two simulations end in the same state: round, global LoRA, merged delta, the strategy's
    ``meta`` and every client's kept state (optimiser moments, device state)."""
    assert a.round == b.round
    assert_same(a.global_.tensors, b.global_.tensors, "tensors")
    assert_same(a.global_.base_delta, b.global_.base_delta, "base_delta")
    assert_same(a.global_.meta, b.global_.meta, "meta")
    assert_same(a.opt_states, b.opt_states, "opt_states")


def fedpruner_fleet(model_config, seq_len: int = 48) -> str:
    """Three declared memory budgets for a tiny 6-layer model (room for 2, 4 and all 6 layers), the
    fleet the FedPruner family needs in the golden runs and the strategy contract test."""
    from fedprune.fedpruner import plan as fp
    from fedprune.fedpruner.memory import ModelShape

    shape = ModelShape.from_config(model_config)
    setup = fp.setup_for(seq_len, 1, 4, ["q_proj", "v_proj"], lora_dropout=0.05)
    return ",".join(f"tx2@{(fp.predicted_peak(shape, setup, k) + 1) / 2**30:.9f}GB:{n}"
                    for k, n in ((2, 4), (4, 3), (6, 3)))
