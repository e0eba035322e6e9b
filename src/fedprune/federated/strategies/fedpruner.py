"""FedPruner and FedPruner+ as federated strategies, with the memory-aware baselines they are
compared against (all registered by name):

- ``fedpruner``: per round and device, ``K`` = the deepest submodel the device's *declared*
  memory budget holds (``fedpruner.memory``); on the device, linear CKA of the current global
  model's layer outputs on a local batch -> K contiguous groups (exact DP) -> one layer per
  group drawn with ``softmax(importance / temperature)``; LoRA is trained on those layers only,
  the others are skipped in the forward pass.
- ``fedpruner_plus``: the same budget spent on attention and FFN sub-blocks chosen
  independently (a device may keep the attention of one layer and the FFN of another).
- ``fedit_full``: FedIT on the full model; devices whose budget cannot hold full-model LoRA
  training are left out.
- ``depth_truncation``: each device trains the first K layers.
- ``fedra``: K layers drawn uniformly at random per device and round (FedRA).
- ``hetlora_full``: HetLoRA on the full model, each device at the largest rank of ``ranks`` its
  budget holds; devices that cannot hold the full model at any rank are left out.

Server side: the server reads only the memory budget a device declares (``ClientInfo.memory_bytes``),
never its speed. Aggregation: each LoRA tensor is averaged (weighted by data size) over the
devices that held it; tensors nobody held keep the previous global (``aggregators.count_average``).
The global model is always the full model with the aggregated LoRA.

Device side (``client_trainer``): the plan is made where the data is. The statistics forward is
inference only (in a deployment it can stream one layer's weights at a time), so it does not
raise the training peak the budget is about. With ``reuse_stats`` a device keeps the statistics
of its first round in the state it keeps between rounds (checkpointed by the simulator, kept in
the node's state on Flower), next to its AdamW moments.

State: everything that changes during a run is in ``GlobalModel.meta`` (``fallback_rounds``,
``layer_rounds_trained``) or in the devices' kept state; ``last_plans`` is a diagnostic of this
process (the last plan of each device it trained), which nothing reads back.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ...fedpruner import plan as fp
from ...fedpruner.memory import ModelShape, TrainSetup
from ...fedpruner.submodel import skip_blocks
from .. import aggregators as agg
from ..cost import payload_bytes, train_flops
from ..local import ClientResult, ClientTask, train_client
from ..partition import collate
from .base import ClientInfo, GlobalModel, LoraStrategy

ATTN_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")
STATS_FIELDS = ("similarity", "layer_importance", "attn_importance", "mlp_importance")
"""the fields of ``fedpruner.plan.LayerStats`` (plain tensors: they travel in a device's kept state)"""


def _rng(seed: int, round_idx: int, cid: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{seed}|{round_idx}|{cid}|{purpose}".encode()))


@dataclass
class BudgetOptions:
    """``federation.options`` of the memory-budgeted strategies (FedPruner, FedPruner+, baselines)."""

    temperature: float = 0.5
    """softmax temperature of the importance-aware selection"""
    reuse_stats: bool = False
    """compute CKA / importances once per device (its first round) and keep them on the device"""
    calib_examples: int = 2
    """examples in the local statistics batch"""
    objective: str = "scatter"
    """partition objective (``fedpruner.partition``)"""
    fixed_overhead_mb: float = 0.0
    """runtime overhead added to every predicted peak"""
    activation_slack: float = 0.0
    """extra activation bytes the allocator costs (0 when ``MALLOC_MMAP_THRESHOLD_`` is pinned;
    ~0.75 for glibc as shipped)"""
    stats_tokens: int = 128
    """tokens (a seeded subset of the local batch) for CKA and importances"""

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"federation.options.temperature must be > 0, got {self.temperature}")
        if self.calib_examples < 1:
            raise ValueError(f"federation.options.calib_examples must be >= 1, got {self.calib_examples}")
        if self.activation_slack < 0 or self.fixed_overhead_mb < 0:
            raise ValueError("federation.options.activation_slack and fixed_overhead_mb must be >= 0")


class BudgetedStrategy(LoraStrategy):
    """Memory-budgeted LoRA strategies: K per device from its declared budget, per-layer averaging
    (options: :class:`BudgetOptions`)."""

    name = "budgeted"
    Options = BudgetOptions
    needs_full_model = False
    supports_robust_aggregation = True  # per-entry averaging over holders: a median / trimmed mean also fits

    def __init__(self, lora, ranks=None, options: BudgetOptions | None = None):
        super().__init__(lora, ranks, options)
        o = self.options
        self.temperature = float(o.temperature)
        self.reuse_stats = bool(o.reuse_stats)
        self.calib_examples = int(o.calib_examples)
        self.objective = o.objective
        self.fixed_overhead = int(o.fixed_overhead_mb * 2**20)
        self.activation_slack = float(o.activation_slack)
        self.stats_tokens = int(o.stats_tokens)
        self.shape: ModelShape | None = None
        self.setup: TrainSetup | None = None
        self.seed = 0
        self.last_plans: dict[int, dict] = {}
        """diagnostics only: the last plan of each device this process trained (never read back)"""

    # ---- wiring -----------------------------------------------------------------------------
    def bind(self, model_config: Any, cfg: Any) -> None:
        """Called by the runtime with the base model's config and the run config (shapes, seq len)."""
        self.shape = ModelShape.from_config(model_config)
        self.setup = fp.setup_for(cfg.train.seq_len, cfg.train.batch_size, self.r_max, self.lora.target_modules,
                                  getattr(cfg.model, "dtype", "float32"), self.fixed_overhead, self.lora.dropout,
                                  getattr(cfg.train, "chunked_loss", True), getattr(cfg.train, "loss_chunk_tokens", 64))
        # the run's seed, for the per-device draws (server: FedRA's layers; device: the plan)
        self.seed = int(cfg.federation.seed)

    def _need_bound(self) -> None:
        if self.shape is None or self.setup is None:
            raise RuntimeError(f"strategy {self.name!r} needs bind(model_config, cfg) before the first round")

    def layers_for(self, client: ClientInfo, rank: int | None = None) -> int:
        """K: the deepest submodel the client's declared budget holds (L when it declares none)."""
        self._need_bound()
        setup = fp.with_rank(self.setup, rank or self.r_max)
        return fp.layers_for_budget(client.memory_bytes, self.shape, setup, self.activation_slack)

    def eligible(self, client: ClientInfo) -> bool:
        k = self.layers_for(client)
        return k == self.shape.num_layers if self.needs_full_model else k >= 1

    # ---- server -------------------------------------------------------------------------------
    def select_clients(self, round_idx, clients, k, seed, global_):
        """Sample ``k`` of all clients (the same draw for every method), then leave out those whose
        budget cannot hold this method's submodel. A round keeps at least one client: if none of
        the sampled fit, one fitting client is drawn instead (counted in ``meta['fallback_rounds']``)."""
        sampled = super().select_clients(round_idx, clients, k, seed, global_)
        ok = [c for c in sampled if self.eligible(c)]
        if ok:
            return ok
        pool = [c for c in clients if self.eligible(c)]
        if not pool:
            raise ValueError(f"strategy {self.name!r}: no client's memory budget holds its submodel")
        global_.meta["fallback_rounds"] = int(global_.meta.get("fallback_rounds", 0)) + 1
        return [random.Random(f"{seed}|fallback|{round_idx}").choice(pool)]

    def task_extra(self, client: ClientInfo, round_idx: int) -> dict:
        return {"k": self.layers_for(client)}

    def configure_train(self, round_idx, clients, global_, seed):
        tasks = []
        for c in clients:
            r = self.rank_of_client(c)
            lora = self.client_lora(c, global_, round_idx, seed) if r == self.r_max else agg.truncate_rank(
                global_.tensors, r)
            extra = {**self.task_extra(c, round_idx), "memory_bytes": c.memory_bytes}
            t = ClientTask(c.cid, round_idx, r, lora, extra=extra)
            t.layers = self.server_layers(c, round_idx, extra)
            if t.layers is not None:
                held = {k: v for k, v in lora.items() if int(k.split(".")[1]) in set(t.layers)}
                t.wire_bytes = payload_bytes(held)
            tasks.append(t)
        return tasks

    def rank_of_client(self, client: ClientInfo) -> int:
        return self.r_max

    def server_layers(self, client: ClientInfo, round_idx: int, extra: dict) -> list[int] | None:
        """Layers fixed by the server (baselines); None = the device plans them."""
        return None

    def aggregate_train(self, round_idx, results, global_):
        new = agg.robust_count_average([r.lora for r in results], [r.masks for r in results], global_.tensors,
                                       [r.num_examples for r in results], self.aggregation, self.trim_ratio)
        meta = dict(global_.meta)
        counts = list(meta.get("layer_rounds_trained", [0] * (self.shape.num_layers if self.shape else 0)))
        for r in results:
            for i in sorted({int(k.split(".")[1]) for k in r.lora}):
                if i < len(counts):
                    counts[i] += 1
        meta["layer_rounds_trained"] = counts
        meta.setdefault("fallback_rounds", 0)
        return GlobalModel(new, global_.base_delta, meta)

    # ---- device --------------------------------------------------------------------------------
    def device_plan(self, base, task: ClientTask, examples: Sequence[dict], pad_id: int, seed: int,
                    kept: dict | None = None) -> fp.DevicePlan:
        """The layers (and bypassed sub-blocks) the device trains; ``kept``: what the device keeps
        between rounds (the statistics, with ``reuse_stats``)."""
        return fp.DevicePlan(list(task.layers or range(base.adapter.num_layers)), [], [], [])

    def local_stats(self, base, task: ClientTask, examples: Sequence[dict], pad_id: int, seed: int,
                    kept: dict | None = None) -> fp.LayerStats:
        """CKA + importances of the received global model on a local batch. With ``reuse_stats`` the
        first round's are kept in ``kept["stats"]`` (the device's state) and reused after."""
        if self.reuse_stats and kept is not None and kept.get("stats") is not None:
            return fp.LayerStats(**kept["stats"])
        base.load_lora(task.lora, task.rank)
        rng = random.Random(seed)
        batch = collate(rng.sample(list(examples), min(self.calib_examples, len(examples))), pad_id)
        was_training = base.model.training
        base.model.eval()
        try:
            stats = fp.layer_stats(base.peft, batch["input_ids"], batch["attention_mask"], self.stats_tokens, seed)
        finally:
            base.model.train(was_training)
        if self.reuse_stats and kept is not None:
            kept["stats"] = {k: getattr(stats, k) for k in STATS_FIELDS}
        return stats

    def client_trainer(self, base, task: ClientTask, examples, settings, seed: int, pad_id: int,
                       device_state: Mapping | None = None) -> tuple[ClientResult, dict | None]:
        """Plan (if the device plans), then train only the planned layers / sub-blocks.

        What the device keeps between rounds: its AdamW state as ``train_client`` returns it, or,
        with ``reuse_stats``, ``{"adamw": ..., "stats": ...}``."""
        kept = dict(device_state or {}) if self.reuse_stats else {"adamw": device_state}
        plan = self.device_plan(base, task, examples, pad_id, seed, kept)
        if not plan.layers:
            raise ValueError(f"client {task.cid}: empty plan (budget {task.extra.get('memory_bytes')})")
        sub = replace(task, layers=plan.layers)
        # No KV cache in training: federated.submodel keeps the original layer_idx of the kept
        # layers, which a cache sized to the kept depth would index out of range.
        cfg = base.model.config
        use_cache, cfg.use_cache = getattr(cfg, "use_cache", None), False
        try:
            with skip_blocks(base.model, attn=plan.skip_attn, mlp=plan.skip_mlp):
                res, opt = train_client(base, sub, examples, settings, seed, pad_id, kept.get("adamw"))
        finally:
            cfg.use_cache = use_cache
        if plan.skip_attn or plan.skip_mlp:
            self._drop_bypassed(base, res, plan)
        res.metrics["layers_trained"] = float(len(plan.layers))
        res.metrics["attn_blocks"] = float(len(plan.layers) - len(plan.skip_attn))
        res.metrics["mlp_blocks"] = float(len(plan.layers) - len(plan.skip_mlp))
        self.last_plans[task.cid] = plan.to_dict()
        if self.reuse_stats:
            return res, {"adamw": opt, "stats": kept.get("stats")}
        return res, opt

    @staticmethod
    def _drop_bypassed(base, res: ClientResult, plan: fp.DevicePlan) -> None:
        """Bypassed sub-blocks were not trained: do not upload their LoRA, fix the FLOP count."""
        attn, mlp = set(plan.skip_attn), set(plan.skip_mlp)

        def bypassed(key: str) -> bool:
            i = int(key.split(".")[1])
            role = key.split(".lora_")[0].rsplit(".", 1)[-1]
            return (i in attn and role in ATTN_ROLES) or (i in mlp and role not in ATTN_ROLES)

        for k in [k for k in res.lora if bypassed(k)]:
            del res.lora[k]
            res.masks.pop(k, None)
        through = base.params_through(plan.layers, {i: 0.0 for i in attn}, {i: 0.0 for i in mlp})
        trainable = sum(t.numel() for t in res.lora.values())
        res.metrics.update(params_through=through, trainable_params=trainable,
                           train_flops=train_flops(through, int(res.metrics["tokens"]), trainable))


class FedPruner(BudgetedStrategy):
    """FedPruner: CKA groups + importance-aware selection of K layers per device (module doc)."""

    name = "fedpruner"

    def device_plan(self, base, task, examples, pad_id, seed, kept=None):
        stats = self.local_stats(base, task, examples, pad_id, seed, kept)
        return fp.fedpruner_plan(stats, int(task.extra["k"]), self.temperature,
                                 _rng(self.seed, task.round, task.cid, "fedpruner"), self.objective)


class FedPrunerPlus(BudgetedStrategy):
    """FedPruner+: attention and FFN sub-blocks chosen independently under the same budget."""

    name = "fedpruner_plus"

    def task_extra(self, client, round_idx):
        self._need_bound()
        budget = client.memory_bytes if client.memory_bytes is not None else float("inf")
        left = fp.unit_budget(budget, self.shape, self.setup) if budget != float("inf") else 1e30
        return {"k": self.layers_for(client), "unit_budget": left,
                "unit_costs": fp.unit_costs(self.shape, self.setup, self.activation_slack)}

    def eligible(self, client):
        self._need_bound()
        if client.memory_bytes is None:
            return True
        costs = fp.unit_costs(self.shape, self.setup, self.activation_slack)
        return fp.unit_budget(client.memory_bytes, self.shape, self.setup) >= min(costs.values())

    def device_plan(self, base, task, examples, pad_id, seed, kept=None):
        stats = self.local_stats(base, task, examples, pad_id, seed, kept)
        return fp.fedpruner_plus_plan(stats, float(task.extra["unit_budget"]), task.extra["unit_costs"],
                                      self.temperature, _rng(self.seed, task.round, task.cid, "fedpruner+"),
                                      self.objective)


class FedITFull(BudgetedStrategy):
    """FedIT on the full model; devices that cannot hold full-model LoRA training are left out."""

    name = "fedit_full"
    needs_full_model = True

    def server_layers(self, client, round_idx, extra):
        return list(range(self.shape.num_layers))


class DepthTruncation(BudgetedStrategy):
    """Each device trains the first K layers its budget holds (the rest are skipped)."""

    name = "depth_truncation"

    def server_layers(self, client, round_idx, extra):
        return fp.truncation_plan(self.shape.num_layers, extra["k"]).layers


class FedRA(BudgetedStrategy):
    """FedRA: a uniformly random allocation of K layers per device and round."""

    name = "fedra"

    def server_layers(self, client, round_idx, extra):
        return fp.random_plan(self.shape.num_layers, extra["k"], _rng(self.seed, round_idx, client.cid, "fedra")).layers


class HetLoRAFull(BudgetedStrategy):
    """HetLoRA on the full model: rank = the largest of ``ranks`` the device's budget holds
    (devices holding none are left out); zero-padded, ``||B A||``-weighted aggregation."""

    name = "hetlora_full"
    needs_full_model = True
    supports_robust_aggregation = False  # norm-weighted, zero-padded ranks: no per-entry median

    def rank_of_client(self, client):
        fits = [r for r in sorted(self.ranks) if self.layers_for(client, r) == self.shape.num_layers]
        return fits[-1] if fits else min(self.ranks)

    def eligible(self, client):
        return self.layers_for(client, min(self.ranks)) == self.shape.num_layers

    def server_layers(self, client, round_idx, extra):
        return list(range(self.shape.num_layers))

    def aggregate_train(self, round_idx, results, global_):
        new = agg.hetlora_aggregate([r.lora for r in results], self.r_max)
        meta = dict(global_.meta)
        meta.setdefault("fallback_rounds", 0)
        return GlobalModel(new, global_.base_delta, meta)


def full_training_bytes(shape: ModelShape, setup: TrainSetup, activation_slack: float = 0.0) -> float:
    """Predicted peak of full-model LoRA training (the reference the fleets' budgets are fractions of)."""
    return fp.predicted_peak(shape, setup, shape.num_layers, activation_slack)


# ---- device classes by memory budget ---------------------------------------------------------------
# Budgets as fractions of full-model LoRA training of the reference setup: SmolLM2-135M
# (hidden 576, FFN 1536, 9/3 heads, vocab 49152, 30 layers, tied), float32, sequence 256,
# batch 1, LoRA rank 8 (dropout 0.05) on all seven projections, AdamW, the chunked loss
# (64-token LM-head chunks, train.chunked_loss's default; memory model).
# Smaller devices are also slower and flakier (phone-like below half the reference).
REFERENCE_SHAPE = ModelShape(576, 1536, 9, 3, 49152, 30, True)
# LoRA dropout 0.05 and the 19.4 MiB fixed overhead measured by validate_memory_model.py
# (chunked loss, MALLOC_MMAP_THRESHOLD_=65536; it was 16.8 MiB with the full-logits loss).
REFERENCE_SETUP = TrainSetup(seq_len=256, batch_size=1, lora_rank=8, lora_dropout=0.05,
                             fixed_overhead_bytes=int(19.4 * 2**20))
BUDGET_CLASSES = {  # name: (fraction of full-model LoRA training memory, relative throughput, dropout)
    "budget-25": (0.25, 0.8, 0.05),
    "budget-40": (0.40, 1.0, 0.03),
    "budget-55": (0.55, 1.5, 0.02),
    "budget-75": (0.75, 2.5, 0.02),
    "budget-100": (1.00, 6.0, 0.02),
}


def _register_budget_classes() -> None:
    from ..devices import DEVICE_PROFILES, DeviceProfile

    full = full_training_bytes(REFERENCE_SHAPE, REFERENCE_SETUP)
    for name, (frac, thr, drop) in BUDGET_CLASSES.items():
        if name not in DEVICE_PROFILES:
            # +1 MiB so that budget-100 holds the full model despite rounding to GB
            DEVICE_PROFILES.register(name, DeviceProfile(name, memory_gb=(frac * full + 2**20) / 2**30,
                                                         rel_throughput=thr, dropout=drop))


_register_budget_classes()
