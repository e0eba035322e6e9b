"""A FedSpine round that recovers: gradual sparsity, recovery steps after the last prune, protected
first/last layers, warm-up and cool-down rounds, and the efficiency reward."""
import json
import math

import pytest
import torch

from fedprune.federated.config import load_config
from fedprune.federated.local import ClientTask, TrainSettings
from fedprune.federated.lora import LoraSettings, SharedBaseModel, init_lora_state
from fedprune.federated.runtime.simulation import Simulation
from fedprune.fedspine.device import model_sparsity, train_fedspine_client, unit_masks_from_lora_masks
from fedprune.fedspine.masks import model_keep_masks, protected_layer_ratio
from fedprune.fedspine.reward import REWARDS, RoundOutcome, efficiency_reward
from fedprune.fedspine.schedule import prune_step_positions, round_sparsity_target
from fedprune.models.tiny import tiny_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- pure schedule pieces ---------------------------------------------------------------------------
def test_prune_positions_leave_recovery_steps():
    assert prune_step_positions(20, 2, 4) == [2, 4, 6, 8, 10, 12, 14, 16]
    assert prune_step_positions(16, 20, 4) == [12]  # no multiple of 20 fits: one prune, then 4 steps
    assert prune_step_positions(4, 2, 4) == [1]  # recovery capped at local_steps - 1
    assert prune_step_positions(1, 2, 4) == []  # one step cannot prune and recover
    assert prune_step_positions(8, 2, 0) == [2, 4, 6, 8]  # 0 = the old behaviour
    for s in range(2, 30):
        assert max(prune_step_positions(s, 3, 4)) < s  # the last prune never falls on the last step
    with pytest.raises(ValueError, match="recovery_steps"):
        prune_step_positions(8, 2, -1)


def test_round_target_moves_gradually_and_masks_only_grow():
    assert round_sparsity_target(0.0, 0.5, 0.1) == 0.1
    assert round_sparsity_target(0.45, 0.5, 0.1) == 0.5
    assert round_sparsity_target(0.3, 0.2, 0.1) == 0.3  # below the current sparsity: nothing pruned
    with pytest.raises(ValueError, match="max_step"):
        round_sparsity_target(0.0, 0.5, 0.0)


def test_protected_layers_shift_the_ratio_to_the_others():
    assert protected_layer_ratio([10, 10, 10, 10], [0, 3], 0.2) == pytest.approx(0.4)  # 0.2 x 40 / 20
    assert protected_layer_ratio([10, 30], [0], 0.3) == pytest.approx(0.3 * 40 / 30)
    assert protected_layer_ratio([10, 10], [0], 0.9) == 0.95  # capped
    model = tiny_model("llama", num_hidden_layers=4)
    from fedprune.adapters import get_adapter

    ad = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    hs = {i: torch.rand(ad.num_heads(l), generator=g) for i, l in enumerate(ad.layers)}
    cs = {i: torch.rand(ad.intermediate_size(l), generator=g) for i, l in enumerate(ad.layers)}
    hm, cm = model_keep_masks(model, hs, cs, 0.2, protect=(0, -1))
    assert hm[0].all() and cm[0].all() and hm[3].all() and cm[3].all()
    assert not cm[1].all() and not cm[2].all()
    assert model_sparsity(ad, hm, cm) == pytest.approx(0.2, abs=0.05)
    with pytest.raises(ValueError, match="protect_layers"):
        model_keep_masks(model, hs, cs, 0.2, protect=(7,))


# ---- the device round ---------------------------------------------------------------------------------
def test_device_round_steps_toward_the_target_and_recovers(tokenizer):
    from fedprune.federated.partition import build_partitions, tokenize_example

    base = SharedBaseModel(tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=4),
                           LoraSettings(rank=4, target_modules=ALL))
    exs = [tokenize_example(tokenizer, r, 48) for r in build_partitions("dirichlet", 10, 0, 0.5)[0][:6]]
    extra = {"ratio": 0.5, "interval": 2, "max_step": 0.15, "recovery_steps": 2, "protect_layers": [0, -1]}
    task = ClientTask(0, 1, 4, init_lora_state(base.shapes, 4, 0), extra=extra)
    res, state = train_fedspine_client(base, task, exs, TrainSettings(local_steps=6, grad_accum=1, seq_len=48), 1,
                                       tokenizer.pad_token_id)
    m = res.metrics
    assert m["round_target"] == pytest.approx(0.15) and m["target_ratio"] == 0.5
    assert m["prune_steps"] == 2 and m["recovery_steps"] == 2  # pruned after steps 2 and 4 of 6
    assert 0.1 < m["sparsity"] <= 0.15 + 0.05
    heads, chans = unit_masks_from_lora_masks(base.adapter, res.masks)
    for i in (0, 3):  # protected layers keep every head and channel
        assert chans.get(i, torch.ones(1, dtype=torch.bool)).all() and heads.get(i, torch.ones(1, dtype=torch.bool)).all()
    assert any(not c.all() for c in chans.values())
    # next round: from there, another step of at most 0.15
    task2 = ClientTask(0, 2, 4, init_lora_state(base.shapes, 4, 1),
                       extra={**extra, "row_masks": res.masks})
    res2, _ = train_fedspine_client(base, task2, exs, TrainSettings(local_steps=6, grad_accum=1, seq_len=48), 2,
                                    tokenizer.pad_token_id, state)
    assert res2.metrics["sparsity_start"] == pytest.approx(m["sparsity"])
    assert res2.metrics["round_target"] == pytest.approx(min(0.5, m["sparsity"] + 0.15))
    assert m["sparsity"] < res2.metrics["sparsity"] <= m["sparsity"] + 0.15 + 0.05


# ---- the efficiency reward ----------------------------------------------------------------------------------
def test_efficiency_reward_is_monotone_in_improvement_and_decreasing_in_time():
    r = lambda after, t, gained=0.0: efficiency_reward(2.0, after, t, 10.0, 0.1, 0.1 + gained)  # noqa: E731
    gains = [r(a, 5.0) for a in (2.6, 2.2, 2.0, 1.9, 1.6)]
    assert gains == sorted(gains) and len(set(gains)) == len(gains)  # more improvement, more reward
    assert r(2.0, 5.0) == pytest.approx(0.5)  # nothing gained
    for after in (1.6, 2.4):  # faster is better whatever the sign of the gain
        times = [r(after, t) for t in (1.0, 3.0, 6.0, 10.0)]
        assert times == sorted(times, reverse=True)
    assert r(1.9, 5.0, gained=0.1) > r(1.9, 5.0)  # sparsity gained toward the target counts
    assert r(2.0, 5.0, gained=-0.1) == pytest.approx(0.5)  # masks only grow: no negative progress
    for args in ((2.0, 0.0, 1.0, 1.0), (2.0, 1e9, 1.0, 1.0), (2.0, 2.0, 0.0, 1.0), (0.0, 0.0, 1.0, 1.0)):
        v = efficiency_reward(*args)
        assert math.isfinite(v) and 0.0 <= v <= 1.0
    assert efficiency_reward(2.0, float("nan"), 1.0, 1.0) == 0.0  # diverged
    with pytest.raises(ValueError, match="round_time"):
        efficiency_reward(2.0, 1.0, 1.0, 0.0)
    # the registry entry reads a RoundOutcome and passes reward_kwargs on
    o = RoundOutcome(2.0, 1.8, 5.0, 10.0, 0.1, 0.2, 0.3, 0.5)
    assert REWARDS.get("efficiency")(o, scale=0.5) == pytest.approx(efficiency_reward(2.0, 1.8, 5.0, 10.0, 0.1, 0.2,
                                                                                       scale=0.5))


# ---- warm-up and cool-down rounds in a run ------------------------------------------------------------------
FAST = ["model.name=tiny-llama", "model.tokenizer=tiny-bpe", "data.max_examples_per_client=4", "data.num_clients=6", "data.partition=dirichlet",
        "federation.fleet=tx2:2,xavier-nx:2,agx-xavier:2", "train.local_steps=4", "train.grad_accum=1",
        "train.seq_len=48", "federation.clients_per_round=3", "federation.rounds=3", "eval.loss_examples=2",
        "eval.rouge_examples=0", "federation.dropout=false", "federation.ranks=[2,4]", "federation.strategy=fedspine",
        f"lora.target_modules={json.dumps(ALL)}"]


def test_warmup_and_cooldown_rounds_tune_only(tokenizer, tmp_path):
    opts = {"warmup_rounds": 1, "cooldown_rounds": 1, "max_step_sparsity": 0.2, "recovery_steps": 2,
            "p_range": [0.3, 0.4], "interval": 1}
    cfg = load_config(None, FAST + [f"federation.options={json.dumps(opts)}"])
    sim = Simulation(cfg, tmp_path / "run", model=tiny_model("llama", vocab_size=len(tokenizer)), tokenizer=tokenizer)
    sim.run()
    trace = sim.global_.meta["trace"]
    by_round = {r: [t for t in trace if t["round"] == r] for r in (1, 2, 3)}
    assert all(t["chosen_by"] == "warmup" and t["rank"] == 4 and t["sparsity"] == 0 for t in by_round[1])
    assert all(t["chosen_by"] in ("device", "fleet") for t in by_round[2])
    assert any(t["sparsity"] > 0 for t in by_round[2]) and all(t["sparsity"] <= 0.2 + 0.05 for t in by_round[2])
    assert all(t["chosen_by"] == "cooldown" and t["sparsity"] == pytest.approx(t["sparsity_start"])
               for t in by_round[3])
    pulls = {str(t["device"]) for t in by_round[2]}  # only the pruning round taught the bandits
    assert {k for k, v in sim.global_.meta["bandits"].items() if v.get("t", 0) > 0} == pulls
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < metrics[-1]["compute_share"]["all"] < 1
    bad = load_config(None, FAST + ['federation.options={"warmup_rounds": 2, "cooldown_rounds": 1}'])
    with pytest.raises(ValueError, match="no pruning round"):
        Simulation(bad, tmp_path / "bad", model=tiny_model("llama", vocab_size=len(tokenizer)), tokenizer=tokenizer)


def test_device_ranks_fix_each_devices_rank(tokenizer, tmp_path):
    """HetLoRA-style baseline: every pruning round trains each device at its own rank, whatever the
    chooser drew; a rank outside federation.ranks is refused by name."""
    ranks = [2, 2, 4, 4, 2, 4]
    opts = {"chooser": "random", "p_range": [0.2, 0.2], "reconcile": "hetlora", "interval": 1,
            "device_ranks": ranks}
    cfg = load_config(None, FAST + ["federation.rounds=2", f"federation.options={json.dumps(opts)}"])
    sim = Simulation(cfg, tmp_path / "run", model=tiny_model("llama", vocab_size=len(tokenizer)), tokenizer=tokenizer)
    sim.run()
    trace = sim.global_.meta["trace"]
    assert len(trace) == 6 and all(t["rank"] == ranks[t["device"]] for t in trace)
    bad = load_config(None, FAST + ['federation.options={"reconcile": "hetlora", "device_ranks": [2, 8, 4, 4, 2, 4]}'])
    with pytest.raises(ValueError, match=r"device_ranks \[8\] are not in federation.ranks"):
        Simulation(bad, tmp_path / "bad", model=tiny_model("llama", vocab_size=len(tokenizer)), tokenizer=tokenizer)
