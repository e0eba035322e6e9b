"""The in-process federated runtime (the default): one frozen base model shared by every
simulated client, their LoRA (and optionally AdamW) states swapped in and out.

Every random draw depends only on (seed, round, client), and the full server state is
checkpointed atomically after every round, so a run interrupted after round k and resumed
ends in exactly the state of an uninterrupted run.

Run directory:
- ``config.yaml``     the resolved configuration;
- ``checkpoint.pt``   server state after the last completed round (global LoRA, merged base
                      delta, per-client optimiser states, counters);
- ``metrics.jsonl``   one line per round (round 0 = the base model before training);
- ``clients.jsonl``   one line per selected client per round (device, status, times, bytes);
- ``resumes.jsonl``   one line per resume (after which round, which settings changed);
- ``.fedprune.lock``  while a run is writing: its pid and host (a second writer is refused).

A new run needs a missing or empty directory; ``--resume`` validates the checkpoint against the
config before it writes anything (``run_state``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from ... import atomic
from ..config import FederatedConfig, dump_config
from ..cost import cost_scale
from ..devices import compute_share, draws_dropout, parse_fleet, simulated_time
from ..evaluation import evaluate_global
from ..local import ClientResult
from ..lora import SharedBaseModel
from ..partition import client_partitions, heldout_records, tokenize_record
from ..strategies import ClientInfo, GlobalModel, RunView
from .run_state import CHECKPOINT, CHECKPOINT_FORMAT, check_resume, commit_resume, torch_bytes
from .server import aggregate, build_strategy, client_seed, plan_round
from .validation import update_problem

log = logging.getLogger(__name__)


class RoundFailed(RuntimeError):
    """Every client of a round failed; the run directory still holds the last good state."""


def peak_rss_mb() -> float:
    from ...memory_usage import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def load_base(cfg: FederatedConfig):
    """(model, tokenizer) for ``cfg.model`` ('tiny-llama' builds a tiny random LLaMA), in
    ``model.dtype`` on ``model.device`` (``auto``: CUDA when available)."""
    from ... import load_model, load_tokenizer
    from ...models.device import resolve_device
    from ...models.loading import parse_dtype

    if cfg.model.tokenizer == "tiny-bpe":
        from ..tiny_tokenizer import tiny_bpe_tokenizer

        tok = tiny_bpe_tokenizer(data_dir=cfg.data.data_dir)
    else:
        tok = load_tokenizer(cfg.model.tokenizer)
    if cfg.model.name == "tiny-llama":
        from ...models.tiny import tiny_model

        model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=max(256, cfg.train.seq_len))
        model.to(device=resolve_device(cfg.model.device, "model.device"), dtype=parse_dtype(cfg.model.dtype))
    else:
        model = load_model(cfg.model.name, dtype=cfg.model.dtype,
                           device=resolve_device(cfg.model.device, "model.device"))
    return model, tok


class Simulation:
    """Run ``cfg`` in-process, writing into ``run_dir``.

    ``tamper(result) -> result`` lets a test or study play a faulty/Byzantine client: it sees
    every client result before validation.
    """

    def __init__(self, cfg: FederatedConfig, run_dir: str | Path, model=None, tokenizer=None,
                 tamper: Callable[[ClientResult], ClientResult] | None = None):
        self._cpu_mark = time.process_time()  # loading the model counts towards totals["cpu_s"]
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        if model is None or tokenizer is None:
            model, tokenizer = load_base(cfg)
        self.tokenizer = tokenizer
        own_params = sum(p.numel() for p in model.parameters())  # before LoRA is attached
        self.base = SharedBaseModel(model, cfg.lora)
        fed = cfg.federation
        # the modelled deployment's size: factors on every round's FLOPs and bytes (1 = own size)
        self.cost_scale = cost_scale(fed.reference_params, own_params, self.base.shapes.values(),
                                     cfg.lora.target_modules)
        self.seed = fed.seed
        self.partitions = client_partitions(cfg.data, fed.seed)
        self.fleet = parse_fleet(fed.fleet)[: cfg.data.num_clients]
        self.clients = [ClientInfo(c, len(p), self.fleet[c].memory_bytes) for c, p in enumerate(self.partitions)]
        # bound to the model: strategies that size submodels (FedPruner) need the shapes
        self.strategy = build_strategy(cfg, model.config)
        self.test_records = heldout_records(cfg.data)
        self.tamper = tamper
        self._tokenized: dict[int, list[dict]] = {}
        self.global_ = self.strategy.init_global(self.base.shapes, fed.seed)
        self.opt_states: dict[int, dict] = {}
        self.round = 0
        # cpu_s: this machine's process CPU seconds (all threads) over every segment of the run, resumes
        # included, up to the last checkpoint: the cost of the run here, unlike wall_s not inflated by a busy machine
        self.totals = {"sim_time_s": 0.0, "wall_s": 0.0, "bytes_up": 0, "bytes_down": 0, "cpu_s": 0.0}

    # ---- data ---------------------------------------------------------------------------
    def examples(self, cid: int) -> list[dict]:
        if cid not in self._tokenized:
            self._tokenized[cid] = [tokenize_record(self.tokenizer, r, self.cfg.train.seq_len, self.cfg.data.dataset)
                                    for r in self.partitions[cid]]
        return self._tokenized[cid]

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        g = self.global_
        return {"format": CHECKPOINT_FORMAT, "round": self.round, "tensors": g.tensors, "base_delta": g.base_delta,
                "meta": g.meta, "opt_states": self.opt_states, "totals": dict(self.totals),
                "strategy": self.cfg.federation.strategy, "config": self.cfg.to_dict()}

    def load_state_dict(self, st: dict) -> None:
        if st.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {st.get('format')!r} is not {CHECKPOINT_FORMAT!r}")
        if st["strategy"] != self.cfg.federation.strategy:
            raise ValueError(f"checkpoint is from strategy {st['strategy']!r}, config says "
                             f"{self.cfg.federation.strategy!r}")
        self.round = int(st["round"])
        self.global_ = GlobalModel(st["tensors"], st["base_delta"], st["meta"])
        self.opt_states = st["opt_states"]
        self.totals = st["totals"]

    def cpu_seconds(self) -> float:
        """``totals["cpu_s"]`` plus the process CPU seconds since the last checkpoint."""
        return self.totals.get("cpu_s", 0.0) + time.process_time() - self._cpu_mark

    def save_checkpoint(self) -> None:
        now = time.process_time()
        self.totals["cpu_s"] = self.totals.get("cpu_s", 0.0) + now - self._cpu_mark
        self._cpu_mark = now
        atomic.write_bytes(self.run_dir / CHECKPOINT, torch_bytes(self.state_dict()))

    def resume(self) -> None:
        """Continue from the checkpoint: validated against the config before anything is written
        (``run_state.check_resume``), then the logs are cut back to its round and the accepted
        setting changes recorded."""
        state, changes = check_resume(self.run_dir, self.cfg)
        self.load_state_dict(state)
        commit_resume(self.run_dir, self.cfg, self.round, changes)
        log.info("resumed %s after round %d%s", self.run_dir, self.round,
                 f" with {', '.join(f'{k}={v[1]!r}' for k, v in changes.items())}" if changes else "")

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict:
        t = time.perf_counter()
        out = evaluate_global(self.base, self.tokenizer, self.test_records, self.cfg.eval, self.cfg.train.seq_len,
                              self.global_.base_delta, self.strategy.eval_delta(self.global_), self.cfg.data.dataset,
                              self.cfg.data.data_dir)
        out["eval_s"] = time.perf_counter() - t
        return out

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, resume: bool = False, stop_after: int | None = None,
            initial_metrics: dict | None = None) -> GlobalModel:
        """Run (or continue) the federation; ``stop_after`` ends early after that round (as an
        interruption would). ``initial_metrics`` replaces the round-0 evaluation of the base model
        (benchmarks reuse it across methods evaluated with the same settings)."""
        from ...outputs import check_run_output, check_run_to_resume, run_lock

        # a new run needs a missing or empty directory; the run holds the directory's lock throughout
        check_run_to_resume(self.run_dir) if resume else check_run_output(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with run_lock(self.run_dir):
            return self._run_locked(resume, stop_after, initial_metrics)

    def _run_locked(self, resume: bool, stop_after: int | None, initial_metrics: dict | None) -> GlobalModel:
        from ...outputs import check_run_output

        if resume:
            self.resume()
        else:
            check_run_output(self.run_dir)  # again, under the lock: another run may have started meanwhile
            atomic.write_text(self.run_dir / "config.yaml", dump_config(self.cfg))
            self.base.set_base_delta(self.global_.base_delta)
            m = {"round": 0, **(initial_metrics or self.evaluate()), "sim_time_s": 0.0, "wall_s": 0.0, "bytes_up": 0, "bytes_down": 0,
                 "cpu_s": self.cpu_seconds(), "peak_rss_mb": peak_rss_mb()}
            atomic.append_jsonl(self.run_dir / "metrics.jsonl", m)
            self.save_checkpoint()
        rounds = self.cfg.federation.rounds
        while self.round < rounds:
            self.run_round(self.round + 1)
            if stop_after is not None and self.round >= stop_after:
                break
        if self.round >= rounds:  # the strategy's own outputs (FedSpine: deployable models)
            self.strategy.finalize(self.view())
        return self.global_

    def view(self) -> RunView:
        """The run as a strategy's ``finalize`` sees it (the same type on Flower)."""
        return RunView(self.run_dir, self.global_, self.base, self.tokenizer, self.fleet)

    def run_round(self, r: int) -> dict:
        cfg, fed = self.cfg, self.cfg.federation
        t_round = time.perf_counter()
        t = time.perf_counter()
        tasks = plan_round(self.strategy, r, self.clients, self.global_, fed)
        self.base.set_base_delta(self.global_.base_delta)
        server_s = time.perf_counter() - t
        accepted: list[ClientResult] = []
        records, client_wall, bytes_up, bytes_down, times = [], 0.0, 0, 0, []
        cut_short = False
        for task in tasks:
            prof = self.fleet[task.cid]
            rec = {"round": r, "cid": task.cid, "device": prof.name, "rank": task.rank}
            down = task.download_bytes()
            bytes_down += down
            if fed.dropout and draws_dropout(prof, self.seed, r, task.cid):
                records.append({**rec, "status": "dropped"})
                cut_short = True
                continue
            tc = time.perf_counter()
            # the strategy's device program (FedSpine: prune while tuning; most: plain LoRA training)
            res, opt = self.strategy.client_trainer(self.base, task, self.examples(task.cid), cfg.train,
                                                    client_seed(self.seed, r, task.cid), self.tokenizer.pad_token_id,
                                                    self.opt_states.get(task.cid))
            client_wall += time.perf_counter() - tc
            if self.tamper is not None:
                res = self.tamper(res)
            up = res.upload_bytes()
            sim = simulated_time(prof, res.metrics["train_flops"], down + up, self.seed, r, task.cid, fed.links,
                                 self.cost_scale.flops, self.cost_scale.bytes)
            res.metrics["time_s"] = sim["total_s"]
            rec.update(sim_time_s=sim["total_s"], compute_s=sim["compute_s"], comm_s=sim["comm_s"],
                       bytes_down=down, bytes_up=up, wall_s=res.metrics["wall_s"],
                       train_loss=res.metrics["train_loss_last"], tokens=res.metrics["tokens"])
            if fed.deadline_s and sim["total_s"] > fed.deadline_s:
                records.append({**rec, "status": "straggler"})
                cut_short = True
                continue
            tv = time.perf_counter()
            problem = update_problem(res, task, fed.max_update_norm)
            server_s += time.perf_counter() - tv
            bytes_up += up
            if problem:
                log.warning("round %d: rejected the update of client %d: %s", r, task.cid, problem)
                records.append({**rec, "status": "rejected", "reason": problem})
                continue
            accepted.append(res)
            times.append(sim["total_s"])
            if opt is not None:
                self.opt_states[task.cid] = opt
            records.append({**rec, "status": "ok"})
        if not accepted:
            for rec in records:
                log.error("round %d: client %d %s %s", r, rec["cid"], rec["status"], rec.get("reason", ""))
            raise RoundFailed(
                f"round {r}: every selected client failed ({', '.join(x['status'] for x in records)}); the global "
                f"model was not updated and {self.run_dir / CHECKPOINT} still holds round {self.round}. "
                "Check the client log, relax federation.deadline_s / max_update_norm, or resume with --resume."
            )
        ta = time.perf_counter()
        # capped weights (the server knows each partition's size), clipped updates, robust average
        self.global_, robust_diag = aggregate(self.strategy, r, accepted, {t.cid: t for t in tasks},
                                              self.global_, fed, {c.cid: c.num_examples for c in self.clients})
        by_cid = {d["cid"]: d for d in robust_diag}
        for rec in records:
            if rec["status"] == "ok":
                rec.update({k: v for k, v in by_cid[rec["cid"]].items() if k != "cid"})
        self.base.set_base_delta(self.global_.base_delta)
        server_s += time.perf_counter() - ta
        sim_round = fed.deadline_s if (cut_short and fed.deadline_s) else max(times)
        self.round = r
        wall = time.perf_counter() - t_round
        self.totals["sim_time_s"] += sim_round
        self.totals["bytes_up"] += bytes_up
        self.totals["bytes_down"] += bytes_down
        evaluate = r % cfg.eval.every == 0 or r == fed.rounds
        ev = self.evaluate() if evaluate else {}
        self.totals["wall_s"] += wall
        m = {"round": r, **ev, "clients_ok": len(accepted), "clients_selected": len(tasks),
             "train_loss": sum(x.metrics["train_loss_last"] for x in accepted) / len(accepted),
             "round_sim_time_s": sim_round, "sim_time_s": self.totals["sim_time_s"], "round_wall_s": wall,
             "wall_s": self.totals["wall_s"], "cpu_s": self.cpu_seconds(), "client_wall_s": client_wall, "server_s": server_s,
             "prev_checkpoint_s": self.totals.get("checkpoint_s", 0.0),
             "server_share": server_s / max(server_s + client_wall, 1e-9),
             "round_bytes_up": bytes_up, "round_bytes_down": bytes_down, "compute_share": compute_share(records),
             "bytes_up": self.totals["bytes_up"], "bytes_down": self.totals["bytes_down"], "peak_rss_mb": peak_rss_mb()}
        for rec in records:
            atomic.append_jsonl(self.run_dir / "clients.jsonl", rec)
        atomic.append_jsonl(self.run_dir / "metrics.jsonl", m)
        tc = time.perf_counter()
        self.save_checkpoint()  # logs first: a resume drops log lines newer than the checkpoint
        self.totals["checkpoint_s"] = time.perf_counter() - tc
        log.info("round %d/%d: %d/%d clients ok, train loss %.4f%s, sim %.1fs, wall %.1fs", r, fed.rounds,
                 len(accepted), len(tasks), m["train_loss"],
                 f", test loss {ev['test_loss']:.4f}" if "test_loss" in ev else "", sim_round, wall)
        return m


def run_federated(cfg: FederatedConfig, run_dir: str | Path, resume: bool = False, **kw) -> GlobalModel:
    """Public entry point: what ``fedprune federate`` calls."""
    return Simulation(cfg, run_dir, **kw).run(resume=resume)
