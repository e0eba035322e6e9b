"""The Flower runtime, deployed for real on loopback: one SuperLink, two SuperNodes, `flwr run`.

Marked slow (it starts four processes and takes about a minute or more on 2 cores):
    .venv/bin/python -m pytest -q -m slow tests/test_federated_flower.py
"""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "configs" / "federated" / "flower"
OVERRIDES = ["model.name=tiny-llama", "model.tokenizer=tiny-bpe", "data.partition=iid", "data.num_clients=2",
             "data.max_examples_per_client=6", "train.local_steps=2", "train.grad_accum=1", "train.seq_len=48",
             "federation.rounds=2", "federation.clients_per_round=2", "federation.fleet=tx2:1,agx-xavier:1",
             "federation.dropout=false", "lora.rank=4", "eval.loss_examples=0", "eval.rouge_examples=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def small_budget(overrides: list[str]) -> str:
    """A memory budget (in KB) holding 2 of the tiny model's 4 layers under FedPruner's memory model."""
    from fedprune.fedpruner import plan as fp
    from fedprune.federated.config import load_config
    from fedprune.federated.simulation import load_base
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
    bindir = Path(sys.executable).parent
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr"), OMP_NUM_THREADS="1",
               PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    link = free_port()
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    config_file = next((str(ROOT / "configs" / "federated" / e.split("=", 1)[1]) for e in extra
                        if e.startswith("config=")), "")
    extra = [e for e in extra if not e.startswith("config=")]
    overrides = OVERRIDES + [f"federation.strategy={strategy}", f"federation.ranks={ranks}"]
    if any("{small}" in e for e in extra):
        extra = [e.replace("{small}", small_budget(overrides + extra)) for e in extra]
    overrides += extra
    run_dir = tmp_path / "run"
    procs = []
    logs = []

    def start(name, args):
        fh = open(tmp_path / f"{name}.log", "w")
        logs.append(tmp_path / f"{name}.log")
        procs.append(subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path))

    try:
        start("superlink", [str(bindir / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link),
                            "--disable-runtime-dependency-installation"])
        wait_port(link)
        for pid in (0, 1):
            start(f"supernode{pid}", [str(bindir / "flower-supernode"), "--insecure", "--superlink",
                                      f"127.0.0.1:{link}", "--host", "127.0.0.1", "--port", str(free_port()),
                                      "--node-config", f"partition-id={pid} num-partitions=2"])
        run_config = (f'config-file="{config_file}" overrides="{" ".join(overrides)}" run-dir="{run_dir}"')
        out = subprocess.run([str(bindir / "flwr"), "run", str(APP), "loopback", "--stream", "--run-config", run_config],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        final = run_dir / "final_global.pt"
        assert final.exists(), out.stdout[-3000:] + out.stderr[-3000:] + "".join(
            p.read_text()[-2000:] for p in logs)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()

    from fedprune.federated.config import load_config
    from fedprune.federated.simulation import Simulation

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sim = Simulation(load_config(config_file or None, overrides), tmp_path / "inproc")
        sim.run()
    finally:
        torch.set_num_threads(n)
    flower = torch.load(final, weights_only=False)
    assert sorted(flower["tensors"]) == sorted(sim.global_.tensors)
    for k, v in sim.global_.tensors.items():
        assert torch.allclose(flower["tensors"][k], v, atol=1e-6), k
    # something was learnt: a LoRA B (zero at start), or FlexLoRA's full-space product
    assert any(v.abs().sum() > 0 for k, v in flower["tensors"].items() if not k.endswith("lora_A"))
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
