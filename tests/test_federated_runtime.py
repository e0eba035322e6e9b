"""The in-process runtime on a tiny model: client training on submodels, resume, faults."""
import json

import pytest
import torch

from fedprune.federated.aggregators import fedavg
from fedprune.federated.local import ClientTask, TrainSettings, train_client
from fedprune.federated.config import load_config
from fedprune.federated.lora import LoraSettings, SharedBaseModel, init_lora_state
from fedprune.federated.runtime.simulation import CHECKPOINT, RoundFailed, Simulation
from fedprune.federated.submodel import submodel
from fedprune.federated.runtime.validation import update_problem
from fedprune.models.tiny import tiny_model
from fed_state import assert_same_run_state

FAST = ["model.name=tiny-llama", "model.tokenizer=tiny-bpe", "data.max_examples_per_client=6", "train.local_steps=2", "train.grad_accum=1",
        "train.seq_len=48", "federation.clients_per_round=3", "lora.rank=4", "eval.loss_examples=4",
        "eval.rouge_examples=1", "eval.max_new_tokens=2", "federation.dropout=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_sim(tokenizer, run_dir, extra=(), tamper=None):
    cfg = load_config(None, FAST + list(extra))
    model = tiny_model("llama", vocab_size=len(tokenizer))
    return Simulation(cfg, run_dir, model=model, tokenizer=tokenizer, tamper=tamper)


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("strategy,ranks", [("fedit", "[]"), ("flora", "[2,4]")])
def test_interrupted_and_resumed_equals_uninterrupted(tokenizer, tmp_path, strategy, ranks):
    extra = ["federation.rounds=3", f"federation.strategy={strategy}", f"federation.ranks={ranks}",
             "train.keep_optimizer_state=true", "eval.every=10", "eval.rouge_examples=0"]
    full = make_sim(tokenizer, tmp_path / "full", extra)
    full.run()
    part = make_sim(tokenizer, tmp_path / "part", extra)
    part.run(stop_after=2)
    assert part.round == 2
    resumed = make_sim(tokenizer, tmp_path / "part", extra)
    resumed.run(resume=True)
    assert resumed.round == 3
    assert_same_run_state(full, resumed)
    assert [m["round"] for m in lines(tmp_path / "part" / "metrics.jsonl")] == [0, 1, 2, 3]
    assert (tmp_path / "part" / "config.yaml").exists()


def test_cpu_seconds_add_up_over_a_resume(tokenizer, tmp_path, monkeypatch):
    """totals["cpu_s"] sums the process CPU seconds of every segment up to its last checkpoint; the
    per-round metric is the running total. A fake clock that ticks 1 s per call makes it exact."""
    import fedprune.federated.runtime.simulation as simulation

    ticks = iter(range(10_000))
    monkeypatch.setattr(simulation.time, "process_time", lambda: float(next(ticks)))
    extra = ["federation.rounds=2", "eval.every=10", "eval.rouge_examples=0"]
    part = make_sim(tokenizer, tmp_path / "run", extra)
    part.run(stop_after=1)
    first = part.totals["cpu_s"]
    assert first > 0
    t0 = simulation.time.process_time()  # the resumed Simulation's first reading is the next tick
    resumed = make_sim(tokenizer, tmp_path / "run", extra)
    resumed.run(resume=True)
    # the first segment's seconds are kept, the second's (init to last checkpoint) added
    assert resumed.totals["cpu_s"] == first + resumed._cpu_mark - (t0 + 1)
    m = lines(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in m] == [0, 1, 2] and m[2]["cpu_s"] > m[1]["cpu_s"] > m[0]["cpu_s"] > 0
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["totals"]["cpu_s"] == resumed.totals["cpu_s"]


def test_malformed_update_rejected_and_never_aggregated(tokenizer, tmp_path, caplog):
    seen = []

    def tamper(res):
        seen.append(res)
        if len(seen) == 1:  # the first client of the round sends NaNs
            k = sorted(res.lora)[0]
            res.lora = dict(res.lora)
            res.lora[k] = torch.full_like(res.lora[k], float("nan"))
        return res

    sim = make_sim(tokenizer, tmp_path / "run", ["federation.rounds=1", "eval.rouge_examples=0"], tamper=tamper)
    sim.run()
    clients = lines(tmp_path / "run" / "clients.jsonl")
    assert [c["status"] for c in clients] == ["rejected", "ok", "ok"]
    assert "non-finite" in clients[0]["reason"] and "rejected the update" in caplog.text
    expect = fedavg([r.lora for r in seen[1:]], [r.num_examples for r in seen[1:]])
    for k, v in expect.items():
        assert torch.equal(sim.global_.tensors[k], v)


def test_update_validation_reasons():
    lora = init_lora_state({"layers.0.q": (6, 5)}, 2, seed=0)
    task = ClientTask(1, 1, 2, lora)
    from fedprune.federated.local import ClientResult

    ok = ClientResult(1, 1, 2, {k: v.clone() for k, v in lora.items()}, {}, 10, {})
    assert update_problem(ok, task, 1e4) is None
    bad_key = ClientResult(1, 1, 2, {**ok.lora, "layers.9.q.lora_A": torch.zeros(2, 5)}, {}, 10, {})
    assert "unexpected keys" in update_problem(bad_key, task, 1e4)
    bad_shape = ClientResult(1, 1, 2, {**ok.lora, "layers.0.q.lora_B": torch.zeros(6, 3)}, {}, 10, {})
    assert "shape" in update_problem(bad_shape, task, 1e4)
    huge = ClientResult(1, 1, 2, {**ok.lora, "layers.0.q.lora_B": torch.full((6, 2), 1e6)}, {}, 10, {})
    assert "norm" in update_problem(huge, task, 1e4)
    inf = ClientResult(1, 1, 2, {**ok.lora, "layers.0.q.lora_B": torch.full((6, 2), float("inf"))}, {}, 10, {})
    assert "non-finite" in update_problem(inf, task, 1e4)
    wrong_rank = ClientResult(1, 1, 4, ok.lora, {}, 10, {})
    assert "rank" in update_problem(wrong_rank, task, 1e4)


def test_all_clients_fail_keeps_last_good_state(tokenizer, tmp_path):
    def tamper(res):
        if res.round == 2:
            res.lora = {k: v * float("inf") for k, v in res.lora.items()}
        return res

    sim = make_sim(tokenizer, tmp_path / "run", ["federation.rounds=3", "eval.every=10", "eval.rouge_examples=0"],
                   tamper=tamper)
    with pytest.raises(RoundFailed, match="round 2: every selected client failed"):
        sim.run()
    saved = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)
    assert saved["round"] == 1
    for k, v in saved["tensors"].items():
        assert torch.equal(v, sim.global_.tensors[k]) and torch.isfinite(v).all()
    assert [m["round"] for m in lines(tmp_path / "run" / "metrics.jsonl")] == [0, 1]


def test_deadline_cuts_stragglers(tokenizer, tmp_path):
    # a deadline far below any device's time: every client is a straggler -> the round fails cleanly
    sim = make_sim(tokenizer, tmp_path / "run", ["federation.rounds=1", "federation.deadline_s=1e-9",
                                                 "eval.rouge_examples=0"])
    with pytest.raises(RoundFailed, match="straggler"):
        sim.run()


def test_submodel_training_layers_and_masks(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    base = SharedBaseModel(model, LoraSettings(rank=2, target_modules=["q_proj", "o_proj", "down_proj"]))
    ids = torch.randint(0, 300, (1, 10))
    # a head mask equals zeroing that head's o_proj input columns
    hm = {1: torch.tensor([True, False, True, True])}
    with submodel(base.adapter, head_masks=hm):
        masked = base.model(input_ids=ids).logits
    o = base.adapter.o_proj(base.adapter.layers[1]).base_layer
    saved = o.weight.detach().clone()
    with torch.no_grad():
        o.weight[:, 16:32] = 0
    assert torch.allclose(masked, base.model(input_ids=ids).logits, atol=1e-5)
    with torch.no_grad():
        o.weight.copy_(saved)

    lora = init_lora_state(base.shapes, 2, seed=0)
    task = ClientTask(0, 1, 2, lora, layers=[0, 1], head_masks=hm, channel_masks={0: torch.arange(96) % 2 == 0})
    exs = [{"input_ids": list(range(5, 25)), "labels": list(range(5, 25))}] * 4
    res, _ = train_client(base, task, exs, TrainSettings(local_steps=2, grad_accum=1, lr=1e-2), 0, 0)
    assert {int(k.split(".")[1]) for k in res.lora} == {0, 1}  # skipped layers send nothing
    assert res.lora["layers.1.self_attn.o_proj.lora_A"].shape == (2, 48)  # 3 of 4 heads kept
    assert res.lora["layers.0.mlp.down_proj.lora_A"].shape == (2, 48)  # half the channels kept
    assert update_problem(res, task, 1e4) is None
    assert res.metrics["params_through"] < base.params_through()
    # count-based FedIT keeps untouched layers and masked columns at the previous global
    from fedprune.federated.strategies import make_strategy, GlobalModel

    strat = make_strategy("fedit", base.settings)
    new = strat.aggregate_train(1, [res], GlobalModel(lora))
    assert torch.equal(new.tensors["layers.3.self_attn.q_proj.lora_A"], lora["layers.3.self_attn.q_proj.lora_A"])
    a_new, a_old = new.tensors["layers.1.self_attn.o_proj.lora_A"], lora["layers.1.self_attn.o_proj.lora_A"]
    assert torch.equal(a_new[:, 16:32], a_old[:, 16:32]) and not torch.equal(a_new[:, :16], a_old[:, :16])


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora"])
def test_heterogeneous_strategies_run_and_are_deterministic(tokenizer, tmp_path, strategy):
    extra = ["federation.rounds=2", f"federation.strategy={strategy}", "federation.ranks=[2,4,8]",
             "eval.every=10", "eval.rouge_examples=0"]
    a = make_sim(tokenizer, tmp_path / "a", extra)
    a.run()
    b = make_sim(tokenizer, tmp_path / "b", extra)
    b.run()
    assert_same_run_state(a, b)
    m = lines(tmp_path / "a" / "metrics.jsonl")
    assert m[-1]["clients_ok"] == 3 and m[-1]["bytes_up"] > 0 and m[-1]["sim_time_s"] > 0
    ranks = {c["rank"] for c in lines(tmp_path / "a" / "clients.jsonl")}
    assert len(ranks) > 1


def test_config_errors_are_actionable():
    with pytest.raises(ValueError, match="known"):
        load_config(None, ["federation.strategy=fedavgx"])
    with pytest.raises(ValueError, match="fleet has 10 devices"):
        load_config(None, ["data.partition=dirichlet", "data.num_clients=80"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["rounds=3"])
    with pytest.raises(ValueError, match="unknown key"):
        load_config(None, ["train.steps=3"])
    with pytest.raises(ValueError, match="federation.links must be one of device, round"):
        load_config(None, ["federation.links=wifi"])
