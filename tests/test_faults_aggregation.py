"""Robust aggregation: a client lying about its size or scaling its update cannot take over the
global model; malformed masks and tensors are refused; the robust maths against hand values."""
import json
import math

import pytest
import torch

from fedprune.federated.runtime import flower_app, server, simulation
from fedprune.federated.aggregators import coordinate_median, trimmed_mean
from fedprune.federated.local import ClientResult, ClientTask
from fedprune.federated.config import FederationSettings, load_config
from fedprune.federated.lora import init_lora_state
from fedprune.federated.robust import (
    aggregate_round, cap_weights, clip_scales, clip_update, lower_median, poisoning_client, robust_results,
)
from fedprune.federated.runtime.simulation import Simulation
from fedprune.federated.strategies import GlobalModel, make_strategy
from fedprune.federated.runtime.validation import update_problem
from fedprune.models.tiny import tiny_model

T = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731

FAST = ["model.name=tiny-llama", "model.tokenizer=tiny-bpe", "data.max_examples_per_client=6", "train.local_steps=2",
        "train.grad_accum=1", "train.seq_len=48", "federation.clients_per_round=3", "lora.rank=4",
        "eval.loss_examples=2", "eval.rouge_examples=0", "eval.every=10", "federation.dropout=false",
        "federation.rounds=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- weight capping ------------------------------------------------------------------------------
def test_lower_median():
    assert lower_median([5, 1, 3]) == 3
    assert lower_median([4, 1, 3, 100]) == 3  # even count: the lower of the two middle values
    assert lower_median([7, 10**12]) == 7


def test_cap_weights_by_median_and_registered_size():
    # lower median of [10, 20, 30, 1e12] is 20 -> cap 3 * 20 = 60
    assert cap_weights([10, 20, 30, 10**12], 3.0) == [10, 20, 30, 60]
    # the server knows the liar's real size (40): capped there first, the median cap then leaves it
    assert cap_weights([10, 20, 30, 10**12], 3.0, [10, 20, 30, 40]) == [10, 20, 30, 40]
    # a client declaring less than it registered keeps what it declared
    assert cap_weights([5, 20], 3.0, [10, 20]) == [5, 15]  # median 5 -> cap 15
    # two clients: the liar's share is at most 3 / (3 + 1)
    w = cap_weights([100, 10**12], 3.0)
    assert w == [100, 300] and w[1] / sum(w) == 0.75
    assert cap_weights([10, 10**12], 2.5) == [10, 25]  # floor(2.5 * 10)
    assert cap_weights([10, 10**12], 0) == [10, 10**12]  # 0: declared sizes trusted
    with pytest.raises(ValueError, match="max_weight_ratio"):
        cap_weights([1, 2], 0.5)


# ---- clipping ------------------------------------------------------------------------------------
def test_clip_scales_relative_and_absolute():
    # rms [1, 2, 100]: lower median 2, ratio 2 -> bound 4: only the third is scaled, by 4/100
    assert clip_scales([9, 9, 9], [1.0, 2.0, 100.0], 2.0, 0.0) == [1.0, 1.0, 0.04]
    # absolute bound 5 on the Frobenius norm: 10 -> 0.5
    assert clip_scales([3.0, 10.0], [1.0, 1.0], 0.0, 5.0) == [1.0, 0.5]
    # both: the tighter wins (rms bound 2*1 = 2 -> 1/4; norm bound 5/10 = 1/2)
    assert clip_scales([1.0, 10.0], [1.0, 8.0], 2.0, 5.0) == [1.0, 0.25]
    assert clip_scales([0.0, 0.0], [0.0, 0.0], 2.0, 1.0) == [1.0, 1.0]  # nothing to clip


def test_clip_update_keeps_direction_from_what_was_sent():
    sent = {"m.lora_A": T([[1.0, 1.0]]), "m.lora_B": T([[0.0], [2.0]])}
    recv = {"m.lora_A": T([[5.0, 1.0]]), "m.lora_B": T([[4.0], [2.0]])}
    out = clip_update(sent, recv, 0.5)
    assert out["m.lora_A"].tolist() == [[3.0, 1.0]] and out["m.lora_B"].tolist() == [[2.0], [2.0]]
    assert clip_update(sent, recv, 1.0)["m.lora_A"] is recv["m.lora_A"]  # untouched, not recomputed
    # masked: the client holds row 1 of B only; its deviation is against row 1 of what it was sent
    masks = {"m.lora_B": {0: torch.tensor([False, True])}}
    out = clip_update(sent, {"m.lora_B": T([[6.0]])}, 0.25, masks)
    assert out["m.lora_B"].tolist() == [[3.0]]  # 2 + 0.25 * (6 - 2)


def _fed(**kw):
    return FederationSettings(**{"fleet": "tx2:4", **kw})


def test_robust_results_hand_computed():
    sent = {"m.lora_A": T([[0.0, 0.0]]), "m.lora_B": T([[0.0], [0.0]])}
    tasks = {c: ClientTask(c, 1, 1, sent) for c in range(3)}

    def res(cid, a, n):
        return ClientResult(cid, 1, 1, {"m.lora_A": T([[a, 0.0]]), "m.lora_B": T([[0.0], [0.0]])}, {}, n, {})

    results = [res(0, 1.0, 10), res(1, 2.0, 20), res(2, 100.0, 10**12)]
    out, diag = robust_results(results, tasks, _fed(max_weight_ratio=3.0, clip_norm_ratio=2.0))
    # weights: lower median 20 -> cap 60; rms over 4 entries: 0.5, 1, 50 -> bound 2 * 1 -> 100 * 2/50 = 4
    assert [r.num_examples for r in out] == [10, 20, 60]
    assert [d["clip_scale"] for d in diag] == [1.0, 1.0, 0.04]
    assert out[2].lora["m.lora_A"].tolist() == [[4.0, 0.0]]
    assert diag[2]["declared"] == 10**12 and diag[2]["weight_share"] == 60 / 90
    assert results[2].num_examples == 10**12 and results[2].lora["m.lora_A"][0, 0] == 100.0  # inputs untouched


# ---- median and trimmed mean ---------------------------------------------------------------------
def test_median_and_trimmed_mean_hand_computed():
    states = [{"x": T([1.0, 10.0])}, {"x": T([2.0, -5.0])}, {"x": T([100.0, 0.0])}, {"x": T([3.0, 1.0])}]
    # per entry sorted: [1, 2, 3, 100] -> median (2 + 3) / 2; [-5, 0, 1, 10] -> (0 + 1) / 2
    assert coordinate_median(states)["x"].tolist() == [2.5, 0.5]
    assert coordinate_median(states[:3])["x"].tolist() == [2.0, 0.0]
    # trim 0.25 of 4 -> drop 1 at each end: [2, 3] -> 2.5, [0, 1] -> 0.5
    assert trimmed_mean(states, 0.25)["x"].tolist() == [2.5, 0.5]
    # trim 0.2 of 4 -> floor(0.8) = 0: the plain mean
    assert trimmed_mean(states, 0.2)["x"].tolist() == [26.5, 1.5]
    with pytest.raises(ValueError, match="trim_ratio"):
        trimmed_mean(states, 0.5)


# ---- malformed updates ---------------------------------------------------------------------------
def _task_and_ok():
    lora = init_lora_state({"layers.0.q": (6, 5)}, 2, seed=0)
    task = ClientTask(1, 1, 2, lora)
    ok = ClientResult(1, 1, 2, {k: v.clone() for k, v in lora.items()}, {}, 10, {})
    return task, ok


def _with(ok, **kw):
    return ClientResult(**{**ok.__dict__, **kw})


def test_non_binary_masks_and_non_float_tensors_rejected():
    task, ok = _task_and_ok()
    B = ok.lora["layers.0.q.lora_B"]
    kept = B[[0, 2, 3]]
    for mask, fine in [(torch.tensor([True, False, True, True, False, False]), True),
                       (torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.uint8), True),
                       (torch.tensor([1, 0, 2, 1, 0, 0]), False),
                       (torch.tensor([1, 0, -1, 1, 0, 0]), False),
                       (torch.tensor([1.0, 0, 1, 1, 0, 0]), False)]:
        res = _with(ok, lora={**ok.lora, "layers.0.q.lora_B": kept}, masks={"layers.0.q.lora_B": {0: mask}})
        problem = update_problem(res, task, 1e4)
        if fine:
            assert problem is None, mask
        else:
            assert problem is not None and "mask for dim 0" in problem and ("0/1" in problem), (mask, problem)
    as_int = _with(ok, lora={**ok.lora, "layers.0.q.lora_B": torch.zeros(6, 2, dtype=torch.int64)})
    assert "not floating point" in update_problem(as_int, task, 1e4)
    as_bool = _with(ok, lora={**ok.lora, "layers.0.q.lora_A": torch.ones(2, 5, dtype=torch.bool)})
    assert "torch.bool is not floating point" in update_problem(as_bool, task, 1e4)
    for n in (0, -3, 2.5, float("nan"), True):
        assert "num_examples" in update_problem(_with(ok, num_examples=n), task, 1e4), n


def test_flower_reply_keeps_mask_values_for_validation():
    """Over Flower, masks travel as uint8: a 2 must reach the check, not become True on the way."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    task, ok = _task_and_ok()
    B = ok.lora["layers.0.q.lora_B"]
    lora = {**ok.lora, "layers.0.q.lora_B": B[[0, 2, 3]].contiguous()}
    mask = torch.tensor([1, 0, 2, 1, 0, 0], dtype=torch.uint8)
    content = RecordDict({"lora": ArrayRecord.from_torch_state_dict(lora),
                          "masks": ArrayRecord.from_torch_state_dict({"layers.0.q.lora_B|0": mask}),
                          "metrics": MetricRecord({"cid": 1, "round": 1, "rank": 2, "num-examples": 10})})
    res = flower_app._result_from_reply(type("Reply", (), {"content": content})())
    assert "values other than 0/1" in update_problem(res, task, 1e4)


# ---- config ---------------------------------------------------------------------------------------
def test_config_refuses_senseless_combinations():
    with pytest.raises(ValueError, match="aggregation=median.*hetlora"):
        load_config(None, ["federation.strategy=hetlora", "federation.aggregation=median"])
    with pytest.raises(ValueError, match="aggregation must be one of"):
        load_config(None, ["federation.aggregation=mode"])
    with pytest.raises(ValueError, match="trim_ratio"):
        load_config(None, ["federation.aggregation=trimmed_mean", "federation.trim_ratio=0.5"])
    with pytest.raises(ValueError, match="max_weight_ratio"):
        load_config(None, ["federation.max_weight_ratio=0.5"])
    with pytest.raises(ValueError, match="clip_norm_ratio"):
        load_config(None, ["federation.clip_norm_ratio=0.5"])
    cfg = load_config(None, ["federation.strategy=fedpruner", "federation.aggregation=trimmed_mean"])
    assert cfg.federation.aggregation == "trimmed_mean"


# ---- the same step in both runtimes --------------------------------------------------------------
def test_both_runtimes_call_the_shared_aggregation_step():
    assert simulation.aggregate is server.aggregate and flower_app.aggregate is server.aggregate
    assert server.aggregate_round is aggregate_round


def test_shared_step_caps_a_liar_as_the_flower_server_calls_it():
    """``run_server`` passes the sizes the nodes declared at the query as ``registered``."""
    from fedprune.federated.lora import LoraSettings

    strat = make_strategy("fedit", LoraSettings(rank=1))
    g = GlobalModel({"m.lora_A": T([[0.0, 0.0]]), "m.lora_B": T([[0.0]])})
    tasks = {c: ClientTask(c, 1, 1, dict(g.tensors)) for c in range(3)}
    results = [ClientResult(c, 1, 1, {"m.lora_A": T([[a, 0.0]]), "m.lora_B": T([[0.0]])}, {}, n, {})
               for c, a, n in [(0, 1.0, 100), (1, 1.0, 100), (2, 4.0, 10**12)]]
    fed = _fed(clip_norm_ratio=0.0)
    new, diag = aggregate_round(strat, 1, results, tasks, g, fed, registered={0: 100, 1: 100, 2: 10**12})
    # registered size does not help a liar who lied at the query too: median cap 300 -> 100:100:300
    assert [d["weight"] for d in diag] == [100, 100, 300]
    assert new.tensors["m.lora_A"][0].tolist() == pytest.approx([(100 + 100 + 300 * 4.0) / 500, 0.0])
    new, diag = aggregate_round(strat, 1, results, tasks, g, fed, registered={0: 100, 1: 100, 2: 100})
    assert new.tensors["m.lora_A"][0].tolist() == pytest.approx([2.0, 0.0])  # (1 + 1 + 4) / 3
    med = aggregate_round(strat, 1, results, tasks, g, _fed(aggregation="median", clip_norm_ratio=0.0))[0]
    assert med.tensors["m.lora_A"].tolist() == [[1.0, 0.0]]


# ---- the attack in a simulation -------------------------------------------------------------------
def _run(tokenizer, run_dir, extra=(), attack=False):
    cfg = load_config(None, FAST + list(extra))
    model = tiny_model("llama", vocab_size=len(tokenizer))
    sim = Simulation(cfg, run_dir, model=model, tokenizer=tokenizer)
    start = {k: v.clone() for k, v in sim.global_.tensors.items()}
    liar = sim.strategy.select_clients(1, sim.clients, 3, sim.seed, sim.global_)[-1].cid
    if attack:  # the liar declares 10^12 examples and sends 50 x its update (from the global it was sent)
        sim.tamper = poisoning_client(liar, lambda r: sim.global_.tensors, scale=50.0, num_examples=10**12)
    sim.run()
    update = torch.cat([(sim.global_.tensors[k] - start[k]).flatten() for k in sorted(start)])
    recs = [json.loads(x) for x in (run_dir / "clients.jsonl").read_text().splitlines()]
    return update, recs, liar


def test_poisoning_client_does_not_take_over(tokenizer, tmp_path):
    honest, _, _ = _run(tokenizer, tmp_path / "honest")
    defended, recs, cid = _run(tokenizer, tmp_path / "defended", attack=True)
    open_door, _, _ = _run(tokenizer, tmp_path / "open",
                           ["federation.max_weight_ratio=0", "federation.clip_norm_ratio=0"], attack=True)
    liar = next(r for r in recs if r["cid"] == cid)
    assert liar["declared"] == 10**12 and liar["weight"] == 6  # capped at its partition's size
    assert math.isclose(liar["weight_share"], 1 / 3)
    med = lower_median([r["update_rms"] for r in recs])
    assert liar["clip_scale"] < 0.1  # its 50x update was brought back to 2x the median
    assert math.isclose(liar["update_rms"] * liar["clip_scale"], 2.0 * med)
    assert all(r["clip_scale"] == 1.0 for r in recs if r["cid"] != cid)  # honest clients untouched
    h = honest.norm()
    # without defences the liar's 50x update is the global update (more than 10x off the honest one); with them
    # it moves the global by less than the honest update itself (1/3 x a clipped 2x update)
    assert (open_door - honest).norm() > 10 * h
    assert (defended - honest).norm() < 0.7 * h


def test_median_in_a_simulation_ignores_the_liar(tokenizer, tmp_path):
    honest, _, _ = _run(tokenizer, tmp_path / "honest", ["federation.aggregation=median"])
    attacked, recs, _ = _run(tokenizer, tmp_path / "attacked", ["federation.aggregation=median",
                                                             "federation.max_weight_ratio=0",
                                                             "federation.clip_norm_ratio=0"], attack=True)
    # with three clients the median is never the outlier: the update is bounded by the honest ones'
    assert (attacked - honest).norm() < honest.norm()
    assert [r["status"] for r in recs] == ["ok", "ok", "ok"]
