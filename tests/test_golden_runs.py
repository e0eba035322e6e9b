"""Golden runs: small fixed-seed runs whose outputs must not change when code moves.

A pruning of a tiny LLaMA by every registered method, and two rounds of FedIT, FedSpine and
FedPruner on a tiny LLaMA, are reduced to a fingerprint (parameter counts, sums of logits and
of every global tensor, the logged losses) and compared with ``tests/golden/runs.json``.
Refactors (moving modules, splitting classes) must leave every fingerprint equal; a change
that is meant to alter results regenerates the file on purpose:

    FEDPRUNE_REGEN_GOLDEN=1 python -m pytest tests/test_golden_runs.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fedprune.models.tiny import tiny_model
from fed_state import fedpruner_fleet

GOLDEN = Path(__file__).parent / "golden" / "runs.json"
REGEN = os.environ.get("FEDPRUNE_REGEN_GOLDEN") == "1"
# Same code, same torch build: sums agree to rounding. A behaviour change moves them by far more.
RTOL, ATOL = 1e-5, 1e-6

pytestmark = pytest.mark.usefixtures("one_thread")


def _golden() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


def check(name: str, fingerprint: dict) -> None:
    data = _golden()
    if REGEN:
        data[name] = fingerprint
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return
    assert name in data, f"no golden fingerprint for {name!r}; regenerate with FEDPRUNE_REGEN_GOLDEN=1"
    want = data[name]
    assert sorted(fingerprint) == sorted(want), name
    for k, v in want.items():
        got = fingerprint[k]
        if isinstance(v, float):
            assert got == pytest.approx(v, rel=RTOL, abs=ATOL), f"{name}.{k}"
        else:
            assert got == v, f"{name}.{k}"


def _sums(tensors: dict[str, torch.Tensor]) -> dict:
    keys = sorted(tensors)
    return {"n_tensors": len(keys),
            "sum": float(sum(tensors[k].double().sum() for k in keys)),
            "abs_sum": float(sum(tensors[k].double().abs().sum() for k in keys))}


# ---- pruning -----------------------------------------------------------------------------------
PRUNE_CASES = [("comp", 0.3, {}), ("comp", 0.3, {"layer_fraction": 0.5, "head_sparsity": 0.5, "neuron_metric": "energy"}),
               ("magnitude", 0.3, {}), ("wanda_sp", 0.3, {}), ("flap", 0.3, {}), ("llm_pruner", 0.1, {}),
               ("shortgpt", 0.3, {}), ("sleb", 0.3, {})]


@pytest.mark.parametrize("method,ratio,options", PRUNE_CASES,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(PRUNE_CASES)])
def test_pruning_is_unchanged(method, ratio, options):
    from fedprune.pruning import prune

    model = tiny_model("llama", num_hidden_layers=6)
    calib = torch.randint(3, 128, (8, 24), generator=torch.Generator().manual_seed(0))
    res = prune(model, method, ratio, calib_ids=calib, **options)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    check(f"prune/{method}/{json.dumps(options, sort_keys=True)}",
          {"params_after": int(res.params_after), "layers": int(model.config.num_hidden_layers),
           "logits_sum": float(logits.sum()), "logits_abs_sum": float(logits.abs().sum())})


# ---- federated -----------------------------------------------------------------------------------
FAST = ["model.name=tiny-llama", "model.tokenizer=tiny-bpe", "data.max_examples_per_client=4",
        "train.local_steps=2", "train.grad_accum=1", "train.seq_len=48", "federation.rounds=2",
        "federation.clients_per_round=3", "lora.rank=4", "eval.loss_examples=4", "eval.rouge_examples=0",
        "federation.dropout=false"]
ALL = '["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]'


FED_CASES = {
    "fedit": ["federation.strategy=fedit"],
    "hetlora": ["federation.strategy=hetlora", "federation.ranks=[2,4]"],
    "fedspine": ["federation.strategy=fedspine", "federation.ranks=[2,4]", f"lora.target_modules={ALL}",
                 "train.local_steps=4"],
    "fedpruner": ["federation.strategy=fedpruner"],
    "fedpruner_plus": ["federation.strategy=fedpruner_plus"],
}


@pytest.mark.parametrize("name", sorted(FED_CASES))
def test_federated_run_is_unchanged(tokenizer, tmp_path, name):
    from fedprune.federated.config import load_config
    from fedprune.federated.runtime.simulation import Simulation

    model = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=6)
    extra = list(FED_CASES[name])
    if name.startswith("fedpruner"):
        extra.append(f"federation.fleet={fedpruner_fleet(model.config)}")
    cfg = load_config(None, FAST + extra)
    sim = Simulation(cfg, tmp_path / name, model=model, tokenizer=tokenizer)
    sim.run()
    metrics = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
    clients = [json.loads(x) for x in (tmp_path / name / "clients.jsonl").read_text().splitlines() if x.strip()]
    fp = {**_sums(sim.global_.tensors), "delta": _sums(sim.global_.base_delta or {})["sum"],
          "test_loss": [float(m["test_loss"]) for m in metrics if "test_loss" in m],
          "clients": [[int(c["round"]), int(c["cid"]), str(c["status"])] for c in clients],
          "sim_time_s": float(metrics[-1]["sim_time_s"])}
    flat = {k: v for k, v in fp.items() if k != "test_loss"}
    flat.update({f"test_loss_{i}": v for i, v in enumerate(fp["test_loss"])})
    check(f"federated/{name}", flat)
