"""The contract every registered federated strategy must keep, checked by name over
``STRATEGIES.names()`` (a new strategy is picked up without touching this file):

- its ``Options`` is a dataclass whose defaults build, and an unknown option is refused by name;
- two rounds on a tiny LLaMA run through the in-process runtime;
- a run stopped after round 1 and resumed from its checkpoint ends in exactly the state of an
  uninterrupted run: global tensors, merged delta, the strategy's ``meta`` and every client's
  kept state. A strategy that keeps round-to-round state on its object instead of in
  ``GlobalModel.meta`` (or a device's kept state) fails here.

Settings: those of tests/test_golden_runs.py (a fleet with declared memory budgets holding 2, 4
and all 6 layers, which the memory-budgeted strategies need). A strategy that needs more can add
overrides to ``EXTRA`` under its name.
"""
from __future__ import annotations

import dataclasses

import pytest

from fed_state import assert_same_run_state, fedpruner_fleet
from fedprune.federated.strategies import STRATEGIES
from fedprune.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 6
SEQ = 48
FAST = ["model.name=tiny-llama", "model.tokenizer=tiny-bpe", "data.max_examples_per_client=4",
        "train.local_steps=2", "train.grad_accum=1", f"train.seq_len={SEQ}", "federation.rounds=2",
        "federation.clients_per_round=3", "lora.rank=4", "eval.loss_examples=2", "eval.rouge_examples=0",
        "eval.every=10", "federation.dropout=false", "train.keep_optimizer_state=true"]
EXTRA = {
    "hetlora": ["federation.ranks=[2,4]"],
    "flexlora": ["federation.ranks=[2,4]"],
    "flora": ["federation.ranks=[2,4]"],
    "hetlora_full": ["federation.ranks=[2,4]"],
    "fedspine": ["federation.ranks=[2,4]", "federation.options={interval: 1, p_range: [0.1, 0.3]}",
                 '["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]'],
}


@pytest.fixture(scope="module")
def fleet(tokenizer) -> str:
    """Declared budgets for the tiny model: room for 2, 4 and all 6 layers (as the golden runs)."""
    return fedpruner_fleet(tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=LAYERS).config, SEQ)


def overrides(name: str, fleet: str) -> list[str]:
    extra = [("lora.target_modules=" + e) if e.startswith("[") else e for e in EXTRA.get(name, [])]
    return FAST + [f"federation.strategy={name}", f"federation.fleet={fleet}"] + extra


def simulation(name, fleet, tokenizer, run_dir):
    from fedprune.federated.config import load_config
    from fedprune.federated.runtime.simulation import Simulation

    model = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=LAYERS)
    return Simulation(load_config(None, overrides(name, fleet)), run_dir, model=model, tokenizer=tokenizer)


def test_every_strategy_is_covered():
    assert set(STRATEGIES.names()) >= {"fedit", "hetlora", "flexlora", "flora", "fedspine", "fedpruner",
                                       "fedpruner_plus"}
    for name, cls in STRATEGIES.items():
        assert cls.name == name, f"{cls.__name__}.name is {cls.name!r}, registered as {name!r}"


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_options_are_a_dataclass_and_unknown_keys_are_refused(name):
    from fedprune.federated.strategies import strategy_options

    cls = STRATEGIES.get(name)
    assert dataclasses.is_dataclass(cls.Options)
    assert isinstance(strategy_options(name, {}), cls.Options)
    with pytest.raises(ValueError, match=f"unknown option 'no_such_option' for federation.strategy '{name}'"):
        strategy_options(name, {"no_such_option": 1})


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_two_rounds_and_a_resume_equal_an_uninterrupted_run(name, fleet, tokenizer, tmp_path):
    full = simulation(name, fleet, tokenizer, tmp_path / "full")
    full.run()
    assert full.round == 2
    assert full.global_.tensors or full.global_.base_delta, "two rounds left no global state"

    part = simulation(name, fleet, tokenizer, tmp_path / "part")
    part.run(stop_after=1)
    assert part.round == 1
    resumed = simulation(name, fleet, tokenizer, tmp_path / "part")  # a fresh process: a new strategy object
    resumed.run(resume=True)
    assert_same_run_state(full, resumed)
