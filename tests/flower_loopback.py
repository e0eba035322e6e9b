"""A real Flower deployment on loopback for the slow tests: one SuperLink, SuperNodes, `flwr run`.

Shared by tests/test_federated_flower.py (plain text, `--insecure`) and
tests/test_flower_secure.py (TLS and SuperNode authentication). Every process binds to
127.0.0.1 only, every wait is bounded, and `close()` (also on a failure) terminates each
launched process together with its descendants, including those Flower detaches into their own
session (the SuperLink's SuperExec, the ServerApp and ClientApp processes).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "configs" / "federated" / "flower"
BIN = Path(sys.executable).parent

OVERRIDES = ["model.name=tiny-llama", "model.tokenizer=tiny-bpe", "data.partition=iid", "data.num_clients=2",
             "data.max_examples_per_client=6", "train.local_steps=2", "train.grad_accum=1", "train.seq_len=48",
             "federation.rounds=2", "federation.clients_per_round=2", "federation.fleet=tx2:1,agx-xavier:1",
             "federation.dropout=false", "lora.rank=4", "eval.loss_examples=0", "eval.rouge_examples=0"]
"""A tiny two-device run (tiny random LLaMA, 2 rounds x 2 local steps) that any strategy finishes in seconds."""


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
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class Loopback:
    """Processes of one deployment, their logs under ``tmp_path``, and a `flwr` connection ``loopback``.

    ``ca_cert``: None for a plain-text deployment (`--insecure` everywhere); else the CA that
    signed the SuperLink's certificate, which SuperNodes and `flwr` must trust.
    """

    def __init__(self, tmp_path: Path, ca_cert: Path | None = None):
        self.tmp = tmp_path
        self.ca_cert = ca_cert
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        flwr_home = tmp_path / "flwr"
        flwr_home.mkdir()
        self.env = dict(os.environ, FLWR_HOME=str(flwr_home), OMP_NUM_THREADS="1",
                        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        tls = f'root-certificates = "{ca_cert}"' if ca_cert else "insecure = true"
        (flwr_home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                               f'address = "127.0.0.1:{self.port}"\n{tls}\n')

    def __enter__(self) -> "Loopback":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        """Launch ``args`` in its own process group, output to ``<name>.log``."""
        with open(self.tmp / f"{name}.log", "w") as fh:
            p = subprocess.Popen(args, env=self.env, stdout=fh, stderr=subprocess.STDOUT, cwd=self.tmp,
                                 start_new_session=True)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def logs_tail(self, n: int = 2000) -> str:
        return "".join(f"\n--- {name}.log\n{self.log(name)[-n:]}" for name in self.procs)

    def superlink(self, *args: str) -> None:
        tls = ["--insecure"] if self.ca_cert is None else []
        self.start("superlink", [str(BIN / "flower-superlink"), *tls, *args, "--host", "127.0.0.1",
                                 "--port", str(self.port), "--disable-runtime-dependency-installation"])
        wait_port(self.port)

    def supernode(self, name: str, node_config: str, *args: str, tls: bool = True) -> subprocess.Popen:
        """A SuperNode; ``tls=False`` leaves out the CA (`--insecure` on a plain-text deployment)."""
        if self.ca_cert is None:
            trust = ["--insecure"]
        else:
            trust = ["--root-certificates", str(self.ca_cert)] if tls else []
        return self.start(name, [str(BIN / "flower-supernode"), *trust, "--superlink", f"127.0.0.1:{self.port}",
                                 *args, "--host", "127.0.0.1", "--port", str(free_port()),
                                 "--node-config", node_config])

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.tmp, capture_output=True,
                              text=True, timeout=timeout)

    def run(self, config_file: str, overrides: list[str], run_dir: Path, timeout: float = 600) -> Path:
        """`flwr run` the fedprune app on this deployment; the server's ``final_global.pt``."""
        run_config = f'config-file="{config_file}" overrides="{" ".join(overrides)}" run-dir="{run_dir}"'
        out = self.flwr("run", str(APP), "loopback", "--stream", "--run-config", run_config, timeout=timeout)
        final = run_dir / "final_global.pt"
        assert final.exists(), out.stdout[-3000:] + out.stderr[-3000:] + self.logs_tail()
        return final

    def close(self) -> None:
        """SIGTERM every launched process still running and its descendants, SIGKILL what is left after 20 s.

        A process that already exited (and was reaped) is skipped: its pid may belong to someone else now.
        """
        running = [p for p in self.procs.values() if p.poll() is None]
        victims: list[psutil.Process] = []
        for p in running:
            try:
                victims += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)  # the group: whatever did not detach
        for v in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                v.terminate()
        _, alive = psutil.wait_procs(victims, timeout=20)
        for v in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                v.kill()
        for p in running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def in_process(config_file: str, overrides: list[str], out: Path):
    """The same run on the in-process simulator (one intra-op thread, as the SuperNodes use)."""
    from fedprune.federated.config import load_config
    from fedprune.federated.runtime.simulation import Simulation

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sim = Simulation(load_config(config_file or None, overrides), out)
        sim.run()
    finally:
        torch.set_num_threads(n)
    return sim


def assert_same_lora(flower: dict, sim) -> None:
    """Flower's final global LoRA equals the simulator's (1e-6), and something was learnt."""
    assert sorted(flower["tensors"]) == sorted(sim.global_.tensors)
    for k, v in sim.global_.tensors.items():
        assert torch.allclose(flower["tensors"][k], v, atol=1e-6), k
    # a LoRA B (zero at start), or FlexLoRA's full-space product
    assert any(v.abs().sum() > 0 for k, v in flower["tensors"].items() if not k.endswith("lora_A"))
