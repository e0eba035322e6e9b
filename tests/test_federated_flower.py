"""The Flower runtime, deployed for real on loopback: one SuperLink, two SuperNodes, `flwr run`.

Plain text (`--insecure`, loopback only); tests/test_flower_secure.py runs the same deployment
with TLS and SuperNode authentication. The launcher lives in tests/flower_loopback.py.

Marked slow (it starts four processes and takes about a minute or more on 2 cores):
    .venv/bin/python -m pytest -q -m slow tests/test_federated_flower.py
"""
import pytest
import torch

from flower_loopback import OVERRIDES, ROOT, Loopback, assert_same_lora, in_process

pytestmark = pytest.mark.slow


def small_budget(overrides: list[str]) -> str:
    """A memory budget (in KB) holding 2 of the tiny model's 4 layers under FedPruner's memory model."""
    from fedprune.fedpruner import plan as fp
    from fedprune.federated.config import load_config
    from fedprune.federated.runtime.simulation import load_base
    from fedprune.federated.strategies import make_strategy

    cfg = load_config(None, [o for o in overrides if not o.startswith("federation.fleet")])
    st = make_strategy("fedpruner", cfg.lora, None, cfg.federation.options)
    st.bind(load_base(cfg)[0].config, cfg)
    return f"{(fp.predicted_peak(st.shape, st.setup, 2) + 2048) / 1024:.0f}KB"


@pytest.mark.parametrize("strategy,ranks,extra", [
    ("hetlora", "[2,4]", []),
    # FedSpine: each device prunes while tuning, keeps its importance averages on the node between
    # rounds; the server runs one bandit per device and writes the trace and deployable models
    ("fedspine", "[2,4]", ["config=fedspine.yaml", "train.local_steps=4"]),
    # FedPruner: each device plans its layers on its own data (CKA groups, importance draw)
    # (budget of device 0: its declared memory holds 2 of the 4 layers; see small_budget)
    ("fedpruner", "[]", ["federation.fleet=tx2@{small}:1,agx-xavier:1", "lora.target_modules=[q_proj,v_proj,up_proj]"]),
])
def test_flower_deployment_matches_in_process(tmp_path, strategy, ranks, extra):
    config_file = next((str(ROOT / "configs" / "federated" / e.split("=", 1)[1]) for e in extra
                        if e.startswith("config=")), "")
    extra = [e for e in extra if not e.startswith("config=")]
    overrides = OVERRIDES + [f"federation.strategy={strategy}", f"federation.ranks={ranks}"]
    if any("{small}" in e for e in extra):
        extra = [e.replace("{small}", small_budget(overrides + extra)) for e in extra]
    overrides += extra
    run_dir = tmp_path / "run"
    with Loopback(tmp_path) as fl:
        fl.superlink()
        for pid in (0, 1):
            fl.supernode(f"supernode{pid}", f"partition-id={pid} num-partitions=2")
        final = fl.run(config_file, overrides, run_dir)

    sim = in_process(config_file, overrides, tmp_path / "inproc")
    flower = torch.load(final, weights_only=False)
    assert_same_lora(flower, sim)
    if strategy == "fedspine":  # same pruning masks on both runtimes, and the outputs a user expects
        fm, sm = flower["meta"]["masks"], sim.global_.meta["masks"]
        assert sorted(fm) == sorted(sm) and any(
            not v.all() for d in sm.values() for dims in d.values() for v in dims.values())
        for cid in sm:
            for key, dims in sm[cid].items():
                assert all(torch.equal(v, fm[cid][key][d]) for d, v in dims.items()), (cid, key)
        assert [(t["device"], t["round"], t["rank"]) for t in flower["meta"]["trace"]] == [
            (t["device"], t["round"], t["rank"]) for t in sim.global_.meta["trace"]]
        assert (run_dir / "bandit_trace.jsonl").exists() and (run_dir / "fedspine" / "outputs.json").exists()
    if strategy == "fedpruner":  # the small device really trained a 2-layer submodel (in both runtimes)
        assert sorted(sim.global_.meta["layer_rounds_trained"]) != [4, 4, 4, 4]
        assert sum(sim.global_.meta["layer_rounds_trained"]) == 2 * (4 + 2)
