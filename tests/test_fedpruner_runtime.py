"""FedPruner / FedPruner+ in the federated runtime, on tiny models: budgets -> K, per-layer
aggregation by hand, forward passes that run only the planned layers / sub-blocks, and short
end-to-end runs of both variants and the memory-aware baselines."""
import json

import numpy as np
import pytest
import torch

from fedprune.federated.local import ClientResult, ClientTask, TrainSettings
from fedprune.federated.config import load_config
from fedprune.federated.devices import DEVICE_PROFILES, DeviceProfile
from fedprune.federated.lora import LoraSettings, SharedBaseModel, init_lora_state
from fedprune.federated.runtime.simulation import Simulation
from fedprune.federated.strategies import ClientInfo, GlobalModel, make_strategy
from fedprune.fedpruner import plan as fp
from fedprune.fedpruner.memory import ModelShape, TrainSetup
from fedprune.models.tiny import tiny_model

LAYERS = 6
SEQ = 48
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tokenizer):
    return tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=LAYERS)


def tiny_setup(rank=4):
    return fp.setup_for(SEQ, 1, rank, TARGETS, lora_dropout=0.05)  # LoraSettings default dropout


@pytest.fixture(scope="module")
def tiny_fleet(tokenizer):
    """Device classes for the tiny model: budgets holding exactly 2, 4 and all 6 layers, and one holding none."""
    shape = ModelShape.from_config(tiny(tokenizer).config)
    setup = tiny_setup()
    names = []
    c = fp.unit_costs(shape, setup)
    for k in (0, 2, 4, LAYERS):
        name = f"tiny-test-k{k}"
        # k = 0: the fixed part plus half the smallest sub-block: not even FedPruner+ fits a unit
        bytes_ = fp.predicted_peak(shape, setup, k) + 1 if k else \
            fp.predicted_peak(shape, setup, 1) - sum(c.values()) + min(c.values()) / 2
        if name not in DEVICE_PROFILES:
            DEVICE_PROFILES.register(name, DeviceProfile(name, memory_gb=bytes_ / 2**30, rel_throughput=1.0, dropout=0.0))
        names.append(name)
    return names


# ---- budgets -> K ------------------------------------------------------------------------------------
def test_k_never_exceeds_the_budget_and_grows_with_it():
    shape = ModelShape(576, 1536, 9, 3, 49152, 30, True)
    setup = TrainSetup(seq_len=256, batch_size=1, lora_rank=8)
    prev = 0
    for mib in range(200, 1300, 25):
        budget = mib * 2**20
        for slack in (0.0, 0.75):
            k = fp.layers_for_budget(budget, shape, setup, slack)
            if k:
                assert fp.predicted_peak(shape, setup, k, slack) <= budget
            if k < shape.num_layers:
                assert fp.predicted_peak(shape, setup, k + 1, slack) > budget
        k0 = fp.layers_for_budget(budget, shape, setup)
        assert k0 >= prev
        assert fp.layers_for_budget(budget, shape, setup, 0.75) <= k0  # slack only ever shrinks K
        prev = k0
    assert prev == shape.num_layers
    assert fp.layers_for_budget(None, shape, setup) == shape.num_layers


def test_strategy_k_from_declared_budget_only(tokenizer, tiny_fleet):
    cfg = load_config(None, ["model.name=tiny-llama", f"train.seq_len={SEQ}", "train.batch_size=1", "lora.rank=4",
                             f"lora.target_modules={json.dumps(TARGETS)}"])
    st = make_strategy("fedpruner", cfg.lora)
    st.bind(tiny(tokenizer).config, cfg)
    ks = [st.layers_for(ClientInfo(i, 10, DEVICE_PROFILES.get(n).memory_bytes)) for i, n in enumerate(tiny_fleet)]
    assert ks == [0, 2, 4, LAYERS]
    assert not st.eligible(ClientInfo(0, 10, DEVICE_PROFILES.get(tiny_fleet[0]).memory_bytes))
    full = make_strategy("fedit_full", cfg.lora)
    full.bind(tiny(tokenizer).config, cfg)
    assert [full.eligible(ClientInfo(i, 10, DEVICE_PROFILES.get(n).memory_bytes))
            for i, n in enumerate(tiny_fleet)] == [False, False, False, True]


def test_plus_costs_split_a_layer_and_fit_the_budget():
    shape = ModelShape(576, 1536, 9, 3, 49152, 30, True)
    setup = TrainSetup(seq_len=256, batch_size=1, lora_rank=8)
    c = fp.unit_costs(shape, setup)
    one = fp.predicted_peak(shape, setup, 1) - fp.predicted_peak(shape, setup, 0) - \
        (fp.predicted_peak(shape, setup, 1) - fp.predicted_peak(shape, setup, 0) - sum(c.values()))
    assert c["attn"] + c["mlp"] == pytest.approx(one)
    L = shape.num_layers
    stats = fp.LayerStats(torch.eye(L, dtype=torch.float64) * 0.5 + 0.5, torch.rand(L, dtype=torch.float64),
                          torch.rand(L, dtype=torch.float64), torch.rand(L, dtype=torch.float64))
    for budget in (1.1 * c["attn"], 3 * c["mlp"], 7.5 * (c["attn"] + c["mlp"])):
        p = fp.fedpruner_plus_plan(stats, budget, c, 0.5, np.random.default_rng(0))
        spent = sum(c["attn"] for i in p.layers if i not in p.skip_attn) + \
            sum(c["mlp"] for i in p.layers if i not in p.skip_mlp)
        assert 0 < spent <= budget
        assert not set(p.skip_attn) & set(p.skip_mlp)  # a kept layer keeps at least one sub-block


# ---- aggregation by hand -----------------------------------------------------------------------------
def test_per_layer_average_matches_hand_computation():
    lora = LoraSettings(rank=1, alpha=1, dropout=0.0, target_modules=["q_proj"])
    st = make_strategy("fedpruner", lora)
    prev = {f"layers.{i}.self_attn.q_proj.lora_{m}": torch.full((1, 2) if m == "A" else (2, 1), 9.0)
            for i in range(3) for m in "AB"}
    g = GlobalModel(prev)

    def res(cid, n, layers, val):
        lo = {f"layers.{i}.self_attn.q_proj.lora_{m}": torch.full((1, 2) if m == "A" else (2, 1), val + i)
              for i in layers for m in "AB"}
        return ClientResult(cid, 1, 1, lo, {}, n, {})

    # client 0 (10 examples) held layers 0 and 1, client 1 (30 examples) layer 0; nobody held layer 2
    r0, r1 = res(0, 10, [0, 1], 1.0), res(1, 30, [0], 5.0)
    out = st.aggregate_train(1, [r0, r1], g)
    new = out.tensors
    A = lambda i: new[f"layers.{i}.self_attn.q_proj.lora_A"]  # noqa: E731
    assert torch.allclose(A(0), torch.full((1, 2), (10 * 1.0 + 30 * 5.0) / 40))  # both held layer 0: 4.0
    assert torch.allclose(A(1), torch.full((1, 2), 2.0))  # only client 0 held layer 1 (value 1 + 1)
    assert torch.equal(A(2), prev["layers.2.self_attn.q_proj.lora_A"])  # nobody: previous global
    assert out.meta["layer_rounds_trained"] == []  # unbound strategy: no layer count


# ---- device forward passes ----------------------------------------------------------------------------
def _device(tokenizer, rank=4):
    model = tiny(tokenizer)
    base = SharedBaseModel(model, LoraSettings(rank=rank, alpha=8, dropout=0.0, target_modules=TARGETS))
    from fedprune.federated.partition import tokenize_example

    recs = [{"instruction": f"say {w} twice", "context": "", "response": f"{w} {w}", "category": "open_qa"}
            for w in ("red", "green", "blue", "cyan")]
    examples = [tokenize_example(tokenizer, r, SEQ) for r in recs]
    return model, base, examples


def _count_calls(model):
    from fedprune.adapters import get_adapter

    ad = get_adapter(model)
    calls = {"layer": [0] * LAYERS, "attn": [0] * LAYERS, "mlp": [0] * LAYERS}
    hooks = []
    for i, layer in enumerate(ad.layers):
        for kind, mod in (("layer", layer), ("attn", ad.attention(layer)), ("mlp", ad.mlp(layer))):
            hooks.append(mod.register_forward_hook(lambda m, a, o, kind=kind, i=i: calls[kind].__setitem__(i, calls[kind][i] + 1)))
    return calls, hooks


@pytest.mark.parametrize("name", ["fedpruner", "fedpruner_plus"])
def test_device_forward_runs_only_its_plan(tokenizer, name):
    model, base, examples = _device(tokenizer)
    cfg = load_config(None, ["model.name=tiny-llama", f"train.seq_len={SEQ}", "lora.rank=4",
                             f"lora.target_modules={json.dumps(TARGETS)}"])
    st = make_strategy(name, base.settings, options={"temperature": 0.5})
    st.bind(model.config, cfg)
    shape, setup = st.shape, st.setup
    c = fp.unit_costs(shape, setup)
    budget = fp.predicted_peak(shape, setup, 2) + 1 if name == "fedpruner" else \
        fp.predicted_peak(shape, setup, 0) + 2 * c["attn"] + c["mlp"] + 1
    info = ClientInfo(0, len(examples), int(budget))
    g = st.init_global(base.shapes, seed=0)
    [task] = st.configure_train(1, [info], g, seed=0)
    calls, hooks = _count_calls(model)
    try:
        res, _ = st.client_trainer(base, task, examples, TrainSettings(local_steps=2, grad_accum=1, seq_len=SEQ),
                                   seed=1, pad_id=tokenizer.pad_token_id)
    finally:
        for h in hooks:
            h.remove()
    plan = st.last_plans[0]
    assert plan["layers"]
    held = {int(k.split(".")[1]) for k in res.lora}
    steps = 2
    for i in range(LAYERS):
        if i in plan["layers"]:
            # one statistics forward (all layers) + the training forwards
            assert calls["layer"][i] == 1 + steps
        else:
            assert calls["layer"][i] == 1  # the statistics forward only: skipped in training
            assert i not in held
    if name == "fedpruner":
        assert len(plan["layers"]) == 2 and held == set(plan["layers"])
        assert not plan["skip_attn"] and not plan["skip_mlp"]
    else:
        for i in plan["skip_attn"]:
            assert calls["attn"][i] == 1 and not any(k.startswith(f"layers.{i}.self_attn") for k in res.lora)
        for i in plan["skip_mlp"]:
            assert calls["mlp"][i] == 1 and not any(k.startswith(f"layers.{i}.mlp") for k in res.lora)
        units = 2 * len(plan["layers"]) - len(plan["skip_attn"]) - len(plan["skip_mlp"])
        assert 1 <= units <= 3
    for k, v in res.lora.items():  # trained tensors moved (B starts at 0)
        if k.endswith("lora_B"):
            assert v.abs().sum() > 0, k


def test_reuse_stats_computes_them_once(tokenizer):
    model, base, examples = _device(tokenizer)
    cfg = load_config(None, ["model.name=tiny-llama", f"train.seq_len={SEQ}", "lora.rank=4",
                             f"lora.target_modules={json.dumps(TARGETS)}"])
    st = make_strategy("fedpruner", base.settings, options={"reuse_stats": True})
    st.bind(model.config, cfg)
    task = ClientTask(3, 1, 4, init_lora_state(base.shapes, 4, 0), extra={"k": 2})
    kept = {}  # what the device keeps between its rounds
    s1 = st.local_stats(base, task, examples, tokenizer.pad_token_id, 0, kept)
    assert torch.equal(kept["stats"]["similarity"], s1.similarity)
    other = examples[2:]  # another local batch: the statistics would differ if they were recomputed
    s2 = st.local_stats(base, task, other, tokenizer.pad_token_id, 99, kept)
    for f in ("similarity", "layer_importance", "attn_importance", "mlp_importance"):
        assert torch.equal(getattr(s1, f), getattr(s2, f)), f
    assert torch.allclose(s1.similarity.diagonal(), torch.ones(LAYERS, dtype=torch.float64))
    fresh = st.local_stats(base, task, other, tokenizer.pad_token_id, 99, {})  # nothing kept: recomputed
    assert not torch.equal(fresh.layer_importance, s1.layer_importance)


# ---- end to end ----------------------------------------------------------------------------------------
def run_sim(tokenizer, tmp_path, strategy, fleet, extra=()):
    over = ["model.name=tiny-llama", "model.tokenizer=tiny-bpe", "data.partition=dirichlet", "data.num_clients=4",
            "data.max_examples_per_client=4", "train.local_steps=1", "train.grad_accum=1", f"train.seq_len={SEQ}",
            "lora.rank=4", f"lora.target_modules={json.dumps(TARGETS)}", "federation.rounds=2",
            "federation.clients_per_round=4", "federation.dropout=false", f"federation.strategy={strategy}",
            f"federation.fleet={fleet}", "eval.loss_examples=2", "eval.rouge_examples=0", "eval.every=2"] + list(extra)
    cfg = load_config(None, over)
    sim = Simulation(cfg, tmp_path / strategy, model=tiny(tokenizer), tokenizer=tokenizer)
    sim.run()
    return sim


@pytest.mark.parametrize("strategy", ["fedpruner", "fedpruner_plus", "fedit_full", "depth_truncation", "fedra",
                                      "hetlora_full"])
def test_two_rounds_end_to_end(tokenizer, tmp_path, tiny_fleet, strategy):
    fleet = ",".join(f"{n}:1" for n in tiny_fleet)  # budgets for K = 0, 2, 4, 6
    extra = ["federation.ranks=[2,4]"] if strategy == "hetlora_full" else []
    sim = run_sim(tokenizer, tmp_path, strategy, fleet, extra)
    recs = [json.loads(x) for x in (tmp_path / strategy / "clients.jsonl").read_text().splitlines()]
    cids = [r["cid"] for r in recs]
    assert 0 not in cids  # holds no layer: left out by every method
    if strategy in ("fedit_full", "hetlora_full"):
        assert set(cids) == {3}
    else:
        assert set(cids) == {1, 2, 3}
    metrics = [json.loads(x) for x in (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2] and np.isfinite(metrics[-1]["test_loss"])
    # the global model is the full model: every layer's LoRA exists, trained layers moved away from B = 0
    g = sim.global_.tensors
    assert {int(k.split(".")[1]) for k in g} == set(range(LAYERS))
    moved = {int(k.split(".")[1]) for k, v in g.items() if k.endswith("lora_B") and v.abs().sum() > 0}
    assert moved
    if strategy == "depth_truncation":
        assert moved == set(range(LAYERS))  # the K=6 device trains all; the others the first 2 / 4
    if strategy in ("fedpruner", "fedpruner_plus"):
        plans = sim.strategy.last_plans
        assert len(plans[1]["layers"]) <= 2 if strategy == "fedpruner" else True
        assert sum(sim.global_.meta["layer_rounds_trained"]) > 0


def test_configs_load_and_name_their_strategy():
    for name in ("fedpruner", "fedpruner_plus"):
        cfg = load_config(f"configs/federated/{name}.yaml")
        assert cfg.federation.strategy == name
        assert cfg.federation.options.get("temperature", 1.0) > 0


def test_lora_dropout_is_budgeted_per_target():
    shape = ModelShape(576, 1536, 9, 3, 49152, 30, True)
    a = TrainSetup(seq_len=256, batch_size=1, lora_rank=8)
    b = TrainSetup(seq_len=256, batch_size=1, lora_rank=8, lora_dropout=0.05)
    from fedprune.fedpruner.memory import layer_activation_bytes

    # dropped input + float32 mask (CPU dropout) per input element of each of the seven targets, minus
    # the un-dropped inputs only the LoRA-A saved: the two normed inputs and silu(gate) * up
    # (counted tensor by tensor in test_fedpruner_memory.test_activation_formula_equals_counted_saved_tensors)
    ins = 576 * 6 + 1536
    assert layer_activation_bytes(shape, b) - layer_activation_bytes(shape, a) == 256 * (ins * 8 - (2 * 576 + 1536) * 4)
    c = fp.unit_costs(shape, b)
    assert c["attn"] + c["mlp"] == pytest.approx(sum(fp.training_memory(shape, b, 1).per_layer.values()))


def test_fallback_counter_survives_a_resume(tokenizer, tmp_path, tiny_fleet):
    """Rounds whose sampled device cannot hold a submodel fall back to one that can; the count is
    strategy state, so it lives in the checkpointed meta and a resumed run agrees with an
    uninterrupted one (it used to live on the strategy object and restart at 0)."""
    from fed_state import assert_same_run_state

    k0, k2 = tiny_fleet[0], tiny_fleet[1]  # budgets holding no layer / 2 layers
    over = ["model.name=tiny-llama", "model.tokenizer=tiny-bpe", "data.partition=dirichlet", "data.num_clients=4",
            "data.max_examples_per_client=4", "train.local_steps=1", "train.grad_accum=1", f"train.seq_len={SEQ}",
            "lora.rank=4", f"lora.target_modules={json.dumps(TARGETS)}", "federation.rounds=4",
            "federation.clients_per_round=1", "federation.dropout=false", "federation.strategy=fedpruner",
            f"federation.fleet={k0}:3,{k2}:1", "eval.loss_examples=2", "eval.rouge_examples=0", "eval.every=10"]

    def sim(run_dir):
        return Simulation(load_config(None, over), run_dir, model=tiny(tokenizer), tokenizer=tokenizer)

    full = sim(tmp_path / "full")
    full.run()
    part = sim(tmp_path / "part")
    part.run(stop_after=2)
    before = part.global_.meta["fallback_rounds"]
    assert before >= 1  # a fallback happened before the interruption: the resume must carry it
    resumed = sim(tmp_path / "part")
    resumed.run(resume=True)
    assert resumed.global_.meta["fallback_rounds"] == full.global_.meta["fallback_rounds"] > before
    assert_same_run_state(full, resumed)
    clients = [json.loads(x) for x in (tmp_path / "full" / "clients.jsonl").read_text().splitlines()]
    assert {c["cid"] for c in clients} == {3}  # only the device that fits ever trained
