"""FedSpine wired into the federated runtime, on tiny models: device prune-and-tune, masked
aggregation, deployable models, bandit state across checkpoint/resume, the CLI."""
import json
from pathlib import Path

import pytest
import torch

from fedprune.federated.local import ClientTask, TrainSettings
from fedprune.federated.config import load_config
from fedprune.federated.lora import LoraSettings, SharedBaseModel, init_lora_state
from fedprune.federated.runtime.simulation import Simulation
from fedprune.federated.submodel import lora_masks
from fedprune.fedspine.aggregate import masked_flexlora_aggregate, masked_lora_aggregate
from fedprune.fedspine.device import (full_unit_masks, model_sparsity, train_fedspine_client,
                                      unit_masks_from_lora_masks)
from fedprune.fedspine.export import deployable_model, plain_model_with_delta
from fedprune.fedspine.masks import apply_masks
from fedprune.models.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAST = ["model.name=tiny-llama", "model.tokenizer=tiny-bpe", "data.max_examples_per_client=6", "data.num_clients=10",
        "federation.fleet=tx2:3,xavier-nx:4,agx-xavier:3", "train.local_steps=4", "train.grad_accum=1",
        "train.seq_len=48", "federation.clients_per_round=3", "federation.rounds=2", "eval.loss_examples=4",
        "eval.rouge_examples=0", "federation.dropout=false", "federation.ranks=[2,4]"]


pytestmark = pytest.mark.usefixtures("one_thread")


def examples(tokenizer, n=6, seq_len=48):
    from fedprune.federated.partition import build_partitions, tokenize_example

    recs = build_partitions("dirichlet", 10, 0, 0.5)[0][:n]
    return [tokenize_example(tokenizer, r, seq_len) for r in recs]


def shared_base(tokenizer):
    return SharedBaseModel(tiny_model("llama", vocab_size=len(tokenizer)), LoraSettings(rank=4, target_modules=ALL))


# ---- pure aggregation ------------------------------------------------------------------------
def test_masked_flexlora_aggregate_matches_hand_computation():
    # module m: d_out=2, d_in=3; client 1 keeps row 0 only (B rows), client 2 keeps columns 0 and 2 (A cols)
    A1, B1 = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0]])  # rank 1, compact B: 1 x 1
    A2, B2 = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0], [3.0]])  # rank 1, compact A: 1 x 2
    states = [{"m.lora_A": A1, "m.lora_B": B1}, {"m.lora_A": A2, "m.lora_B": B2}]
    masks = [{"m.lora_B": {0: torch.tensor([True, False])}}, {"m.lora_A": {1: torch.tensor([True, False, True])}}]
    prev = {"m": torch.full((2, 3), 7.0)}
    alpha = 2.0  # scaling alpha / r = 2
    out = masked_flexlora_aggregate(states, masks, [1.0, 3.0], prev, alpha)["m"]
    # client 1 full-space: row 0 = 2 * 2 * [1, 2, 3] = [4, 8, 12]; client 2: 2 * [[1, _, 1], [3, _, 3]]
    expect = torch.tensor([[(0.25 * 4 + 0.75 * 2) / 1.0, 8.0, (0.25 * 12 + 0.75 * 2) / 1.0],
                           [6.0, 7.0, 6.0]])
    assert torch.allclose(out, expect)


def test_masked_hetlora_pads_rank_and_averages_holders():
    A1, B1 = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0]])  # rank 1, holds B row 1 only
    A2, B2 = torch.tensor([[3.0, 3.0], [5.0, 5.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # rank 2, all
    prev = {"m.lora_A": torch.zeros(2, 2), "m.lora_B": torch.full((2, 2), 9.0)}
    out = masked_lora_aggregate([{"m.lora_A": A1, "m.lora_B": B1}, {"m.lora_A": A2, "m.lora_B": B2}],
                                [{"m.lora_B": {0: torch.tensor([False, True])}}, {}], [1.0, 1.0], prev, r_max=2)
    assert torch.allclose(out["m.lora_A"], torch.tensor([[2.0, 2.0], [2.5, 2.5]]))  # zero padding counts
    assert torch.allclose(out["m.lora_B"], torch.tensor([[1.0, 1.0], [1.5, 0.5]]))  # row 0: only client 2


# ---- the device ---------------------------------------------------------------------------------
def test_unit_masks_survive_the_lora_mask_roundtrip(tokenizer):
    base = shared_base(tokenizer)
    ad = base.adapter
    hm, cm = full_unit_masks(ad)
    hm[1] = torch.tensor([True, True, False, False])
    cm[2][::3] = False
    h2, c2 = full_unit_masks(ad, *unit_masks_from_lora_masks(ad, lora_masks(ad, sorted(base.modules), hm, cm)))
    assert all(torch.equal(hm[i], h2[i]) and torch.equal(cm[i], c2[i]) for i in hm)


def test_device_masks_only_grow_and_hit_the_target(tokenizer):
    base = shared_base(tokenizer)
    exs = examples(tokenizer)
    settings = TrainSettings(local_steps=4, grad_accum=1, seq_len=48)
    lora = init_lora_state(base.shapes, 4, 0)
    t1 = ClientTask(0, 1, 4, lora, extra={"ratio": 0.4, "interval": 2})
    r1, st = train_fedspine_client(base, t1, exs, settings, 1, tokenizer.pad_token_id)
    assert r1.metrics["prune_steps"] == 2
    assert r1.metrics["sparsity"] == pytest.approx(0.4, abs=0.06) and r1.metrics["sparsity"] <= 0.4 + 0.06
    h1, c1 = unit_masks_from_lora_masks(base.adapter, r1.masks)
    # a lower target next round prunes nothing; a higher one only removes more units
    for ratio in (0.2, 0.55):
        t = ClientTask(0, 2, 2, init_lora_state(base.shapes, 2, 1), extra={"ratio": ratio, "interval": 2,
                                                                         "row_masks": r1.masks})
        r2, _ = train_fedspine_client(base, t, exs, settings, 2, tokenizer.pad_token_id, st)
        h2, c2 = unit_masks_from_lora_masks(base.adapter, r2.masks)
        for i in h1:
            assert not (h2[i] & ~h1[i]).any() and not (c2[i] & ~c1[i]).any(), "a pruned unit came back"
        assert r2.metrics["sparsity"] >= r1.metrics["sparsity"] - 1e-9
        if ratio < r1.metrics["sparsity"]:
            assert r2.metrics["prune_steps"] == 0 and r2.metrics["sparsity"] == r1.metrics["sparsity"]
        else:
            assert r2.metrics["sparsity"] > r1.metrics["sparsity"]
    assert r1.metrics["train_flops"] > 0 and set(st) == {"importance", "adamw"}


def test_reward_losses_are_one_batch_before_and_after_the_round(tokenizer):
    base = shared_base(tokenizer)
    exs = examples(tokenizer)
    frozen = TrainSettings(local_steps=4, grad_accum=1, seq_len=48, lr=1e-12)  # learns nothing

    def round_(ratio):
        task = ClientTask(0, 1, 4, init_lora_state(base.shapes, 4, 0), extra={"ratio": ratio, "interval": 2})
        return train_fedspine_client(base, task, exs, frozen, 5, tokenizer.pad_token_id)[0].metrics

    same = round_(0.0)  # nothing learnt, nothing pruned: the same batch gives the same loss
    assert same["loss_after"] == pytest.approx(same["loss_before"], abs=1e-6)
    pruned = round_(0.5)  # nothing learnt, half pruned: only the pruning shows
    assert pruned["loss_before"] == pytest.approx(same["loss_before"], abs=1e-6)
    assert abs(pruned["loss_after"] - pruned["loss_before"]) > 1e-3 and pruned["sparsity"] > 0.4


def test_deployable_model_logits_equal_masked_model_and_reload(tokenizer, tmp_path):
    from fedprune import load_model, save_model

    base = shared_base(tokenizer)
    exs = examples(tokenizer)
    task = ClientTask(0, 1, 4, init_lora_state(base.shapes, 4, 0), extra={"ratio": 0.35, "interval": 1})
    res, _ = train_fedspine_client(base, task, exs, TrainSettings(local_steps=3, grad_accum=1, seq_len=48), 3,
                                   tokenizer.pad_token_id)
    hm, cm = full_unit_masks(base.adapter, *unit_masks_from_lora_masks(base.adapter, res.masks))
    assert model_sparsity(base.adapter, hm, cm) > 0.2
    full = base.lora_state()  # the trained LoRA as a dense delta
    delta = {m: (base.settings.alpha / 4) * full[m + ".lora_B"] @ full[m + ".lora_A"] for m in base.modules}
    ids = torch.tensor([[5, 17, 33, 2, 90, 41, 7]])
    masked = plain_model_with_delta(base, delta)
    with apply_masks(masked, hm, cm), torch.no_grad():
        ref = masked(input_ids=ids).logits
    pruned = deployable_model(base, delta, hm, cm)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in masked.parameters())
    with torch.no_grad():
        assert torch.allclose(pruned(input_ids=ids).logits, ref, atol=1e-5)
    save_model(pruned, tmp_path / "dev")
    with torch.no_grad():
        assert torch.allclose(load_model(str(tmp_path / "dev"))(input_ids=ids).logits, ref, atol=1e-5)
    # the shared base is untouched
    for k, m in base.modules.items():
        assert torch.equal(m.base_layer.weight, base.base_original[k])


# ---- the runtime ----------------------------------------------------------------------------------
def make_sim(tokenizer, run_dir, extra=()):
    cfg = load_config(ROOT / "configs/federated/fedspine.yaml", FAST + list(extra))
    return Simulation(cfg, run_dir, model=tiny_model("llama", vocab_size=len(tokenizer)), tokenizer=tokenizer)


def test_bandit_state_survives_checkpoint_and_resume(tokenizer, tmp_path):
    a = make_sim(tokenizer, tmp_path / "a")
    a.strategy.export = "none"  # deployable models are the CLI test's business
    a.run()
    b = make_sim(tokenizer, tmp_path / "b")
    b.strategy.export = "none"
    b.run(stop_after=1)
    c = make_sim(tokenizer, tmp_path / "b")
    c.strategy.export = "none"
    c.run(resume=True)
    ma, mc = a.global_.meta, c.global_.meta
    assert ma["bandits"] == mc["bandits"] and ma["trace"] == mc["trace"] and ma["sparsity"] == mc["sparsity"]
    assert len(ma["trace"]) == 6 and {t["round"] for t in ma["trace"]} == {1, 2}
    for k in a.global_.tensors:
        assert torch.equal(a.global_.tensors[k], c.global_.tensors[k]), k
    for cid, m in ma["masks"].items():
        for key, dims in m.items():
            assert all(torch.equal(v, mc["masks"][cid][key][d]) for d, v in dims.items())


def test_cli_end_to_end_two_rounds(tokenizer, tmp_path):
    from fedprune import load_model
    from fedprune.cli import main

    out = tmp_path / "run"
    assert main(["federate", "--config", str(ROOT / "configs/federated/fedspine.yaml"), *FAST,
                 "--output", str(out)]) == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2] and all("test_loss" in m for m in metrics)
    trace = [json.loads(x) for x in (out / "bandit_trace.jsonl").read_text().splitlines()]
    assert len(trace) == 6
    assert {"device", "round", "ratio", "rank", "reward", "device_class"} <= set(trace[0])
    assert all(0.1 <= t["ratio"] <= 0.5 and t["rank"] in (2, 4) and 0 < t["reward"] < 1 for t in trace)
    summary = json.loads((out / "fedspine" / "outputs.json").read_text())
    assert (out / "fedspine" / "global_lora.pt").exists()
    assert 0 < summary["global"]["sparsity"] < 0.6 and summary["devices"]
    ids = torch.tensor([[3, 4, 5, 6]])
    for info in list(summary["devices"].values()) + [summary["global"]]:
        m = load_model(str(out / "fedspine" / info["path"]))
        assert sum(p.numel() for p in m.parameters()) == info["params"]
        assert torch.isfinite(m(input_ids=ids).logits).all()


def test_cold_devices_start_from_the_fleet_bandit_and_resume_exactly(tokenizer, tmp_path):
    more = ["data.num_clients=4", "federation.rounds=4"]  # 12 pulls over 4 devices: each is seen again

    def sim(run_dir):
        s = make_sim(tokenizer, run_dir, more)
        s.strategy.export, s.strategy.fleet_warmup = "none", 2
        return s

    a = sim(tmp_path / "a")
    a.run()
    meta = a.global_.meta
    seen: dict = {}
    for t in meta["trace"]:  # a device's first two configurations come from the fleet, later ones from its own bandit
        assert t["chosen_by"] == ("fleet" if seen.get(t["device"], 0) < 2 else "device"), t
        seen[t["device"]] = seen.get(t["device"], 0) + 1
    assert max(seen.values()) > 2 and meta["fleet_bandit"]["t"] == len(meta["trace"]) == 12
    assert all(meta["bandits"][str(d)]["t"] == n for d, n in seen.items())  # every reward reached its device too
    b = sim(tmp_path / "b")
    b.run(stop_after=2)
    c = sim(tmp_path / "b")
    c.run(resume=True)
    assert c.global_.meta["trace"] == meta["trace"] and c.global_.meta["fleet_bandit"] == meta["fleet_bandit"]
