"""The Flower runtime: a ``ServerApp`` / ``ClientApp`` pair (flwr 1.41 message API) driving the
*same* strategy objects, aggregators, client training and update validation as the in-process
simulator.

Why not ``flwr.serverapp.strategy.FedAvg``: it sends one payload to every node and refuses
replies whose array keys differ. Here every node gets its own message (rank, LoRA at that
rank, layer subset, unit masks), built by ``Strategy.configure_train``, and the replies go
through ``Strategy.aggregate_train``.

Protocol (one run):
1. ``query`` to every node: it answers its ``partition-id`` (node config), data size and memory
   budget (node config ``memory-gb``, else its class in ``federation.fleet``).
2. per round, ``train`` to each selected node. Content: ``config`` (ConfigRecord: the resolved
   fedprune config as JSON, cid, round, rank, seed, layers), ``lora`` (ArrayRecord),
   ``unit_masks`` (ArrayRecord, ``head.{layer}`` / ``channel.{layer}``), ``base_delta``
   (ArrayRecord; FLoRA's merged update, sent dense - a simplification), ``extra.<key>``
   (ArrayRecord: a mask dict of the strategy's per-task extras, e.g. FedSpine's persistent
   masks; the rest of the extras travel as JSON in ``config``). Reply: ``lora``
   (compact), ``masks`` (``{key}|{dim}``), ``metrics`` (MetricRecord).

A device keeps what it carries from one round to the next (AdamW moments when
``train.keep_optimizer_state``, FedSpine's importance averages) in its node's run state
(``context.state``), as the simulator keeps it per client. After the last round the server
writes ``final_global.pt`` and runs the strategy's ``finalize`` (FedSpine: the bandit trace,
the global pruned model and the deployable per-class models).

Run config (``[tool.flwr.app.config]`` or ``flwr run --run-config``): ``config-file`` (a
fedprune YAML), ``overrides`` (space-separated ``section.key=value``), ``run-dir`` (where
the server writes metrics.jsonl, clients.jsonl and ``final_global.pt``).
"""
from __future__ import annotations

import io
import json
import logging
import shlex
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ... import atomic
from ..config import FederatedConfig, load_config
from ..devices import parse_fleet
from ..local import ClientResult, ClientTask
from ..strategies import ClientInfo, RunView
from .server import aggregate, build_strategy, client_seed, plan_round
from .validation import update_problem

log = logging.getLogger(__name__)

server_app = ServerApp()
client_app = ClientApp()


# ---- (de)serialisation shared by both sides --------------------------------------------------
def _arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord.from_torch_state_dict({k: v.detach().contiguous() for k, v in state.items()})


def _tensors(record: ArrayRecord | None) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict()) if record is not None and len(record) else {}


def _unit_masks(task: ClientTask) -> dict[str, torch.Tensor]:
    out = {f"head.{i}": m.to(torch.uint8) for i, m in (task.head_masks or {}).items()}
    out.update({f"channel.{i}": m.to(torch.uint8) for i, m in (task.channel_masks or {}).items()})
    return out


def _split_unit_masks(t: dict[str, torch.Tensor]) -> tuple[dict | None, dict | None]:
    heads = {int(k.split(".")[1]): v.bool() for k, v in t.items() if k.startswith("head.")}
    chans = {int(k.split(".")[1]): v.bool() for k, v in t.items() if k.startswith("channel.")}
    return heads or None, chans or None


def _flat_masks(masks: dict[str, dict[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{k}|{d}": m.to(torch.uint8) for k, dims in masks.items() for d, m in dims.items()}


def _nested_masks(flat: dict[str, torch.Tensor]) -> dict[str, dict[int, torch.Tensor]]:
    out: dict[str, dict[int, torch.Tensor]] = {}
    for k, m in flat.items():
        key, d = k.rsplit("|", 1)
        out.setdefault(key, {})[int(d)] = m.bool()
    return out


def _is_mask_dict(v) -> bool:
    return isinstance(v, dict) and bool(v) and all(
        isinstance(d, dict) and all(isinstance(m, torch.Tensor) for m in d.values()) for d in v.values())


def _split_extra(extra: dict) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """A task's ``extra``: the JSON part and the mask dicts (FedSpine's ``row_masks``), which
    travel as ArrayRecords named ``extra.<key>``."""
    masks = {k: _flat_masks(v) for k, v in extra.items() if _is_mask_dict(v)}
    return {k: v for k, v in extra.items() if k not in masks}, masks


# ---- client side ---------------------------------------------------------------------------------
class _ClientRuntime:
    """Per-process cache: the shared base model, tokenizer and this run's partitions."""

    _cache: dict[str, "_ClientRuntime"] = {}

    def __init__(self, cfg: FederatedConfig):
        from ..lora import SharedBaseModel
        from ..partition import client_partitions
        from .simulation import load_base

        model, self.tokenizer = load_base(cfg)
        self.base = SharedBaseModel(model, cfg.lora)
        # the strategy object for its device program (FedSpine prunes while tuning, FedPruner plans)
        self.strategy = build_strategy(cfg, model.config)
        self.partitions = client_partitions(cfg.data, cfg.federation.seed)
        self.cfg = cfg
        self._tok: dict[int, list[dict]] = {}

    @classmethod
    def get(cls, cfg_json: str) -> "_ClientRuntime":
        if cfg_json not in cls._cache:
            cls._cache.clear()
            cls._cache[cfg_json] = cls(FederatedConfig.from_dict(json.loads(cfg_json)))
        return cls._cache[cfg_json]

    def examples(self, cid: int) -> list[dict]:
        from ..partition import tokenize_record

        if cid not in self._tok:
            self._tok[cid] = [tokenize_record(self.tokenizer, r, self.cfg.train.seq_len, self.cfg.data.dataset)
                              for r in self.partitions[cid]]
        return self._tok[cid]


def _partition_id(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError("this SuperNode has no partition-id: start it with "
                         "--node-config \"partition-id=0 num-partitions=N\"") from None


@client_app.query()
def client_query(msg: Message, context: Context) -> Message:
    rt = _ClientRuntime.get(str(msg.content["config"]["fedprune-config"]))
    pid = _partition_id(context)
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid, "num-examples": len(rt.partitions[pid]),
                                                        "memory-bytes": _memory_budget(context, rt.cfg, pid)})}),
                   reply_to=msg)


def _memory_budget(context: Context, cfg: FederatedConfig, pid: int) -> int:
    """The memory budget this device declares: node config ``memory-gb`` when the SuperNode was
    started with one, else its device class in ``federation.fleet`` (memory-aware strategies plan with it)."""
    if "memory-gb" in context.node_config:
        gb = float(context.node_config["memory-gb"])
        if gb <= 0:
            raise ValueError(f"node config memory-gb must be positive, got {gb}")
        return int(gb * 2**30)
    return parse_fleet(cfg.federation.fleet)[pid].memory_bytes  # the config holds a class per partition


DEVICE_STATE = "fedprune-device-state"


def _device_state(context: Context) -> dict | None:
    """What this device kept from its last round (AdamW moments, FedSpine's importance averages):
    it stays on the device, in the node's run state, as the simulator keeps it per client."""
    from .run_state import load_plain

    rec = context.state.config_records.get(DEVICE_STATE)
    if rec is None:
        return None
    # tensors and plain values only: a node's state must not be able to run code when read back
    return load_plain(bytes(rec["torch"]), "this node's saved device state")


def _store_device_state(context: Context, keep: dict | None) -> None:
    if keep is None:
        return
    from .run_state import torch_bytes

    context.state[DEVICE_STATE] = ConfigRecord({"torch": torch_bytes(keep)})


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    c = msg.content["config"]
    rt = _ClientRuntime.get(str(c["fedprune-config"]))
    cid = int(c["cid"])
    if cid != _partition_id(context):
        raise ValueError(f"server sent client id {cid} to the node holding partition {_partition_id(context)}")
    heads, chans = _split_unit_masks(_tensors(msg.content.array_records.get("unit_masks")))
    layers = [int(x) for x in c["layers"]] if "layers" in c else None
    task = ClientTask(cid, int(c["round"]), int(c["rank"]), _tensors(msg.content["lora"]), layers=layers,
                      head_masks=heads, channel_masks=chans, local_steps=int(c["local-steps"]) or None,
                      extra=json.loads(str(c.get("extra-json", "{}"))))
    for name, rec in msg.content.array_records.items():
        if name.startswith("extra."):
            task.extra[name[len("extra."):]] = _nested_masks(_tensors(rec))
    rt.base.set_base_delta(_tensors(msg.content.array_records.get("base_delta")))
    res, keep = rt.strategy.client_trainer(rt.base, task, rt.examples(cid), rt.cfg.train, int(c["seed"]),
                                           rt.tokenizer.pad_token_id, _device_state(context))
    _store_device_state(context, keep)
    metrics = {k: float(v) for k, v in res.metrics.items()}
    metrics.update({"cid": cid, "round": task.round, "rank": task.rank, "num-examples": res.num_examples})
    content = RecordDict({"lora": _arrays(res.lora), "metrics": MetricRecord(metrics)})
    if res.masks:
        content["masks"] = _arrays(_flat_masks(res.masks))
    return Message(content, reply_to=msg)


# ---- server side ---------------------------------------------------------------------------------
def _result_from_reply(reply: Message) -> ClientResult:
    """The client's result as sent: masks keep their wire dtype so that ``update_problem`` sees a
    mask value other than 0/1 (``_nested_masks`` would turn it into True)."""
    m = reply.content["metrics"]
    masks: dict[str, dict[int, torch.Tensor]] = {}
    for k, t in _tensors(reply.content.array_records.get("masks")).items():
        key, d = k.rsplit("|", 1)
        masks.setdefault(key, {})[int(d)] = t
    metrics = {k: float(v) for k, v in m.items()}
    return ClientResult(int(m["cid"]), int(m["round"]), int(m["rank"]), _tensors(reply.content["lora"]), masks,
                        int(m["num-examples"]), metrics)


def wait_for_nodes(grid: Grid, n: int, timeout: float = 300.0) -> list[int]:
    t0 = time.time()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.time() - t0 > timeout:
            raise RuntimeError(f"only {len(nodes)} of {n} SuperNodes connected after {timeout:.0f} s")
        time.sleep(1.0)


def run_server(grid: Grid, cfg: FederatedConfig, run_dir: Path, timeout: float = 3600.0) -> dict:
    """The federation over Flower: same strategy, validation and aggregation as the simulator.

    ``run_dir`` is guarded as the simulator's is: it must be missing or empty (a Flower run starts
    afresh) and is locked for the whole run, so a second ``flwr run`` into it fails naming the owner."""
    from ...outputs import check_run_output, run_lock

    check_run_output(run_dir)
    with run_lock(run_dir):
        check_run_output(run_dir)  # again, under the lock: another run may have started meanwhile
        return _serve(grid, cfg, run_dir, timeout)


def _serve(grid: Grid, cfg: FederatedConfig, run_dir: Path, timeout: float) -> dict:
    from ..evaluation import evaluate_global
    from ..lora import SharedBaseModel
    from ..partition import heldout_records
    from .simulation import load_base

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run_dir / "config.yaml", __import__("yaml").safe_dump(cfg.to_dict(), sort_keys=False))
    fed = cfg.federation
    cfg_json = json.dumps(cfg.to_dict(), sort_keys=True)
    model, tok = load_base(cfg)
    base = SharedBaseModel(model, cfg.lora)
    strategy = build_strategy(cfg, model.config)
    global_ = strategy.init_global(base.shapes, fed.seed)
    test = heldout_records(cfg.data)

    nodes = wait_for_nodes(grid, cfg.data.num_clients)
    queries = [Message(RecordDict({"config": ConfigRecord({"fedprune-config": cfg_json})}), dst_node_id=n,
                       message_type=MessageType.QUERY) for n in nodes]
    node_of: dict[int, int] = {}
    infos = []
    for rep in grid.send_and_receive(queries, timeout=timeout):
        if rep.has_error():
            raise RuntimeError(f"node {rep.metadata.src_node_id} failed the query: {rep.error.reason}")
        pid = int(rep.content["metrics"]["partition-id"])
        if pid in node_of:
            raise RuntimeError(f"two SuperNodes claim partition-id {pid}; give each a distinct one")
        node_of[pid] = rep.metadata.src_node_id
        mem = int(rep.content["metrics"].get("memory-bytes", 0)) or None
        infos.append(ClientInfo(pid, int(rep.content["metrics"]["num-examples"]), mem))
    infos.sort(key=lambda c: c.cid)

    def evaluate() -> dict:
        if not (cfg.eval.loss_examples or cfg.eval.rouge_examples or cfg.eval.accuracy_examples):
            return {}
        return evaluate_global(base, tok, test, cfg.eval, cfg.train.seq_len, global_.base_delta,
                               strategy.eval_delta(global_), cfg.data.dataset, cfg.data.data_dir)

    atomic.append_jsonl(run_dir / "metrics.jsonl", {"round": 0, **evaluate()})
    for r in range(1, fed.rounds + 1):
        t0 = time.perf_counter()
        tasks = {t.cid: t for t in plan_round(strategy, r, infos, global_, fed)}
        msgs = []
        for cid, task in tasks.items():
            conf = {"fedprune-config": cfg_json, "cid": cid, "round": r, "rank": task.rank,
                    "seed": client_seed(fed.seed, r, cid), "local-steps": task.local_steps or 0}
            if task.layers is not None:
                conf["layers"] = [int(i) for i in task.layers]
            extra, extra_masks = _split_extra(task.extra or {})
            if extra:
                try:
                    conf["extra-json"] = json.dumps(extra)
                except TypeError as exc:
                    raise ValueError(f"task.extra of client {cid} must be JSON-serialisable for Flower: {exc}") from None
            content = RecordDict({"config": ConfigRecord(conf), "lora": _arrays(task.lora)})
            for name, flat in extra_masks.items():
                content[f"extra.{name}"] = _arrays(flat)
            if global_.base_delta:
                content["base_delta"] = _arrays(global_.base_delta)
            um = _unit_masks(task)
            if um:
                content["unit_masks"] = _arrays(um)
            msgs.append(Message(content, dst_node_id=node_of[cid], message_type=MessageType.TRAIN))
        accepted, bytes_up, ok_recs = [], 0, {}
        bytes_down = sum(t.download_bytes() for t in tasks.values())
        for rep in grid.send_and_receive(msgs, timeout=timeout):
            rec = {"round": r, "node": rep.metadata.src_node_id}
            if rep.has_error():
                atomic.append_jsonl(run_dir / "clients.jsonl", {**rec, "status": "error", "reason": rep.error.reason})
                continue
            try:
                res = _result_from_reply(rep)
            except (KeyError, ValueError, TypeError, OverflowError) as exc:  # e.g. num-examples NaN
                atomic.append_jsonl(run_dir / "clients.jsonl", {**rec, "status": "rejected",
                                                                 "reason": f"malformed reply: {exc!r}"})
                continue
            # a real deployment has no simulated clock: the device's completion time is the
            # training wall time it reports (FedSpine's reward reads it)
            res.metrics.setdefault("time_s", float(res.metrics.get("wall_s", 0.0)))
            task = tasks.get(res.cid)
            problem = "answers a client that was not asked" if task is None else update_problem(
                res, task, fed.max_update_norm)
            bytes_up += res.upload_bytes()
            rec.update(cid=res.cid, rank=res.rank, wall_s=res.metrics.get("wall_s"))
            if problem:
                log.warning("round %d: rejected the update of client %d: %s", r, res.cid, problem)
                atomic.append_jsonl(run_dir / "clients.jsonl", {**rec, "status": "rejected", "reason": problem})
                continue
            res.masks = {k: {d: m.bool() for d, m in dims.items()} for k, dims in res.masks.items()}
            accepted.append(res)
            ok_recs[res.cid] = {**rec, "status": "ok"}
        if not accepted:
            raise RuntimeError(f"round {r}: every selected client failed; the global model was not updated "
                               f"(see {run_dir / 'clients.jsonl'})")
        # the same capping, clipping and averaging as the simulator, in client order whatever the
        # arrival order; registered = sizes declared at the query
        global_, robust_diag = aggregate(strategy, r, accepted, tasks, global_, fed,
                                         {c.cid: c.num_examples for c in infos})
        for d in robust_diag:
            atomic.append_jsonl(run_dir / "clients.jsonl", {**ok_recs[d["cid"]],
                                                             **{k: v for k, v in d.items() if k != "cid"}})
        base.set_base_delta(global_.base_delta)
        m = {"round": r, **evaluate(), "clients_ok": len(accepted), "clients_selected": len(tasks),
             "train_loss": sum(x.metrics["train_loss_last"] for x in accepted) / len(accepted),
             "round_wall_s": time.perf_counter() - t0, "round_bytes_up": bytes_up, "round_bytes_down": bytes_down}
        atomic.append_jsonl(run_dir / "metrics.jsonl", m)
        log.info("round %d/%d: %d/%d clients ok, train loss %.4f", r, fed.rounds, len(accepted), len(tasks),
                 m["train_loss"])
    buf = io.BytesIO()
    torch.save({"tensors": global_.tensors, "base_delta": global_.base_delta, "meta": global_.meta}, buf)
    atomic.write_bytes(run_dir / "final_global.pt", buf.getvalue())
    # the strategy's own outputs (FedSpine: bandit trace, deployable pruned models)
    strategy.finalize(RunView(run_dir, global_, base, tok, parse_fleet(fed.fleet)))
    return {"rounds": fed.rounds}


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    if "config-file" not in rc:
        raise ValueError("set run config config-file (a fedprune YAML), e.g. flwr run . local "
                         "--run-config 'config-file=\"configs/federated/fedit.yaml\" run-dir=\"runs/flower\"'")
    cfg = load_config(str(rc["config-file"]) or None, shlex.split(str(rc.get("overrides", ""))))
    run_server(grid, cfg, Path(str(rc.get("run-dir", "runs/flower"))))
