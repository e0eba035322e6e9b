"""FedSpine as a federated strategy: one bandit per device over (pruning ratio, LoRA rank),
iterative prune-and-tune on the device, heterogeneity-aware aggregation.

Server, each round:
- ``configure_train``: for every selected device its own chooser picks ``(p, r)``; the device
  gets the global LoRA at rank ``r`` (FlexLoRA SVD / HetLoRA truncation / as is), its
  persistent masks (as LoRA row/column masks), the target ``p`` and the schedule that makes a
  round recover (at most ``max_step_sparsity`` closer to ``p`` per round, ``recovery_steps``
  after the last prune, first and last layers protected). In the ``warmup_rounds`` first and
  ``cooldown_rounds`` last rounds of the run nobody prunes (pure tuning at fixed masks, rank
  ``phase_rank``) and no bandit is consulted or rewarded;
- ``aggregate_train``: a reward per device from what the server observed (one local batch's loss
  before and after the round, the sparsity it reached, its completion time relative to the
  slowest accepted device of the round; never its profile) updates its chooser
  (``fedspine.reward``, default ``efficiency``: improvement of the recovered pruned model per
  unit of time); the masks the
  device returned replace the stored ones (they only grow); the LoRA updates are scattered to
  full index space and averaged per entry over their holders (``fedspine.aggregate``).

All server state (bandits incl. RNG, pending arms, masks, sparsities, the trace) lives in
``GlobalModel.meta`` and is checkpointed with it, so a resumed run continues exactly.

Options (``federation.options`` in YAML): :class:`FedSpineOptions`. On Flower, each node runs
the same device program and keeps its importance averages in its node state.
"""
from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import aggregators as agg
from ..local import ClientTask
from ..lora import init_lora_state
from .base import GlobalModel, LoraStrategy, RunView

log = logging.getLogger(__name__)

TRACE_FILE = "bandit_trace.jsonl"


@dataclass
class FedSpineOptions:
    """FedSpine's ``federation.options``.

    The LoRA ranks a chooser may pick are ``federation.ranks`` (default 2, 4, 8, 16).
    A uniform-pruning baseline is ``chooser: random`` with ``p_range: [p, p]`` and one rank.
    """

    chooser: str = "s-ucb"
    """``s-ucb``, ``ucb1-grid`` or ``random`` (``fedspine.bandit.CHOOSERS``)"""
    p_range: Sequence[float] = (0.1, 0.6)
    """``[p_min, p_max]`` pruning ratios"""
    p_grid: Sequence[float] | None = None
    """the ratios of the ``ucb1-grid`` arms (default 6 values over ``p_range``)"""
    interval: int = 20
    """local steps between two pruning steps (the paper: 20)"""
    reconcile: str = "flexlora"
    """``flexlora`` (SVD), ``hetlora`` (zero-padding) or ``fedavg`` (one rank)"""
    reward: str = "efficiency"
    """name in ``fedspine.reward.REWARDS`` (``efficiency``: improvement of the recovered pruned model
    per unit of time, plus the sparsity gained; ``fedspine``: the earlier gain x progress / time)"""
    reward_kwargs: dict | None = None
    """extra arguments of the reward"""
    chooser_kwargs: dict | None = None
    """extra arguments of the chooser (``c``, ``lipschitz``, ...)"""
    momentum: float = 0.9
    """importance moving-average momentum on the device"""
    export: str = "class"
    """``class`` (one deployable model per device class), ``all``, or ``none``"""
    global_ratio: float | None = None
    """sparsity of the exported global pruned model (default: the fleet's average, over the
    devices that trained)"""
    fleet_warmup: int = 0
    """pulls a device's own bandit needs before it decides (0: it decides from its first pull).
    Until then the device's configuration comes from one fleet-wide bandit of the same kind that
    every reward also feeds, so a device seen for the first time starts from what the fleet has
    learnt instead of from blind exploration (its own bandit still records every reward and takes
    over after ``fleet_warmup`` pulls). With 80 devices and a few selected per round, a device is
    picked a handful of times per run, too few for its own bandit alone. No device profile is read
    either way. Within a round the fleet bandit's earlier choices count as pending pulls
    (``select(pending=...)``), so one round's cold devices spread over the promising configurations."""

    warmup_rounds: int = 0
    """the run's first rounds: pure LoRA tuning, nobody prunes, no bandit is consulted"""
    cooldown_rounds: int = 0
    """the run's last rounds: tuning at fixed masks (nobody prunes further), no bandit is consulted"""
    phase_rank: int | None = None
    """the LoRA rank of warm-up and cool-down rounds (default: the largest of ``federation.ranks``)"""
    max_step_sparsity: float = 0.1
    """the most a device's sparsity moves toward its chosen ratio in one round (1 = all at once)"""
    recovery_steps: int = 4
    """local steps after the last prune step of a round, before upload (capped at local_steps - 1)"""
    protect_layers: Sequence[int] = (0, -1)
    """layers that are never pruned (-1 = the last); the others prune more to reach the ratio"""
    device_ranks: Sequence[int] | None = None
    """a fixed LoRA rank per device, in fleet order (a HetLoRA-style baseline: the rank is the
    device's, every round); the chooser then only picks the ratio. Each rank must be one of
    ``federation.ranks``."""

    def __post_init__(self):
        from ...fedspine.aggregate import RECONCILE
        from ...fedspine.bandit import CHOOSERS
        from ...fedspine.reward import REWARDS

        if self.chooser not in CHOOSERS:
            raise ValueError(f"fedspine chooser {self.chooser!r} unknown; known: {', '.join(CHOOSERS)}")
        if self.reconcile not in RECONCILE:
            raise ValueError(f"fedspine reconcile {self.reconcile!r} unknown; known: {', '.join(RECONCILE)}")
        if self.reward not in REWARDS:
            raise ValueError(f"fedspine reward {self.reward!r} unknown; known: {', '.join(REWARDS)}")
        if len(self.p_range) != 2 or not 0 <= float(self.p_range[0]) <= float(self.p_range[1]) < 1:
            raise ValueError(f"fedspine p_range must satisfy 0 <= p_min <= p_max < 1, got {list(self.p_range)}")
        if self.interval < 1:
            raise ValueError(f"fedspine interval must be >= 1, got {self.interval}")
        if self.export not in ("class", "all", "none"):
            raise ValueError(f"fedspine export must be class, all or none, got {self.export!r}")
        if self.global_ratio is not None and not 0 <= self.global_ratio < 1:
            raise ValueError(f"fedspine global_ratio must lie in [0, 1), got {self.global_ratio}")
        if self.fleet_warmup < 0:
            raise ValueError(f"fedspine fleet_warmup must be >= 0, got {self.fleet_warmup}")
        for name in ("warmup_rounds", "cooldown_rounds", "recovery_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"fedspine {name} must be >= 0, got {getattr(self, name)}")
        if not 0 < float(self.max_step_sparsity) <= 1:
            raise ValueError(f"fedspine max_step_sparsity must lie in (0, 1], got {self.max_step_sparsity}")
        if self.phase_rank is not None and int(self.phase_rank) < 1:
            raise ValueError(f"fedspine phase_rank must be >= 1, got {self.phase_rank}")
        self.protect_layers = [int(i) for i in self.protect_layers]
        if self.device_ranks is not None:
            self.device_ranks = [int(r) for r in self.device_ranks]
            if not self.device_ranks or min(self.device_ranks) < 1:
                raise ValueError(f"fedspine device_ranks must be a non-empty list of ranks >= 1, got {self.device_ranks}")


class FedSpine(LoraStrategy):
    """FedSpine (see module doc); options: :class:`FedSpineOptions`."""

    name = "fedspine"
    Options = FedSpineOptions

    def __init__(self, lora, ranks=None, options: FedSpineOptions | None = None):
        super().__init__(lora, ranks or [2, 4, 8, 16], options)
        o = self.options
        self.ranks = sorted(set(self.ranks))
        if o.reconcile == "fedavg" and len(self.ranks) != 1:
            raise ValueError(f"reconcile=fedavg needs a single rank, got ranks={self.ranks}")
        p_lo, p_hi = float(o.p_range[0]), float(o.p_range[1])
        self.chooser, self.p_range, self.interval, self.reconcile = o.chooser, (p_lo, p_hi), int(o.interval), o.reconcile
        self.p_grid = list(o.p_grid) if o.p_grid else [round(p_lo + (p_hi - p_lo) * i / 5, 4) for i in range(6)]
        self.reward_name, self.reward_kwargs = o.reward, dict(o.reward_kwargs or {})
        self.chooser_kwargs = dict(o.chooser_kwargs or {})
        self.momentum, self.export = float(o.momentum), o.export
        self.global_ratio = o.global_ratio
        self.fleet_warmup = int(o.fleet_warmup)
        if o.phase_rank is not None and int(o.phase_rank) not in self.ranks:
            raise ValueError(f"fedspine phase_rank={o.phase_rank} is not one of federation.ranks {self.ranks}")
        self.phase_rank = int(o.phase_rank) if o.phase_rank is not None else max(self.ranks)
        self.device_ranks = list(o.device_ranks) if o.device_ranks is not None else None
        if self.device_ranks is not None and not set(self.device_ranks) <= set(self.ranks):
            raise ValueError(f"fedspine device_ranks {sorted(set(self.device_ranks) - set(self.ranks))} are not in "
                             f"federation.ranks {self.ranks}")
        self.total_rounds: int | None = None  # set by bind (the cool-down needs the run's length)

    def bind(self, model_config, cfg) -> None:
        """The run's length (for the cool-down) and checks that need the model and the run."""
        o = self.options
        self.total_rounds = int(cfg.federation.rounds)
        if o.warmup_rounds + o.cooldown_rounds >= self.total_rounds and (o.warmup_rounds or o.cooldown_rounds):
            raise ValueError(f"fedspine warmup_rounds={o.warmup_rounds} + cooldown_rounds={o.cooldown_rounds} leave "
                             f"no pruning round in federation.rounds={self.total_rounds}")
        n_layers = getattr(model_config, "num_hidden_layers", None)
        if n_layers is not None:
            from ...fedspine.masks import resolve_layers

            resolve_layers(o.protect_layers, int(n_layers))

    def phase(self, round_idx: int) -> str:
        """``warmup``, ``prune`` or ``cooldown``: what round ``round_idx`` (1-based) does."""
        o = self.options
        if round_idx <= o.warmup_rounds:
            return "warmup"
        if self.total_rounds is not None and o.cooldown_rounds and round_idx > self.total_rounds - o.cooldown_rounds:
            return "cooldown"
        return "prune"

    # ---- the device program ------------------------------------------------------------
    def client_trainer(self, base, task, examples, settings, seed, pad_id, device_state=None):
        """Prune while tuning (``fedspine.device``); the device keeps its importance averages."""
        from ...fedspine.device import train_fedspine_client

        return train_fedspine_client(base, task, examples, settings, seed, pad_id, device_state)

    # ---- bandits (rebuilt from meta: the strategy object itself holds no state) ----------
    def _new_chooser(self, cid: int, seed: int):
        from ...fedspine.bandit import make_chooser

        s = zlib.crc32(f"{seed}|chooser|{cid}".encode())
        if self.chooser == "ucb1-grid":
            return make_chooser("ucb1-grid", p_values=self.p_grid, r_values=self.ranks, seed=s, **self.chooser_kwargs)
        return make_chooser(self.chooser, p_range=self.p_range, r_range=None, ranks=self.ranks, seed=s,
                            **self.chooser_kwargs)

    FLEET = -1  # the fleet-wide bandit's id (never a device id)

    def _chooser(self, global_: GlobalModel, cid: int, seed: int):
        """Device ``cid``'s bandit (or the fleet-wide one for ``FLEET``), restored from meta."""
        ch = self._new_chooser(cid, seed)
        meta = global_.meta
        st = meta.get("fleet_bandit") if cid == self.FLEET else meta.get("bandits", {}).get(str(cid))
        if st is not None:
            ch.load_state_dict(st)
        return ch

    # ---- Strategy -------------------------------------------------------------------------
    def init_global(self, shapes, seed):
        self.shapes = dict(shapes)
        meta = {"bandits": {}, "pending": {}, "masks": {}, "sparsity": {}, "rounds": {}, "trace": [],
                "init_seed": seed, "aggregated": False}
        if self.reconcile == "flexlora":
            return GlobalModel(tensors={m: torch.zeros(s) for m, s in shapes.items()}, meta=meta)
        return GlobalModel(tensors=init_lora_state(shapes, self.r_max, seed), meta=meta)

    def client_lora(self, global_: GlobalModel, rank: int, seed: int, svd: dict | None = None) -> dict[str, torch.Tensor]:
        from ...fedspine.aggregate import distribute_from_svd, svd_cache

        if self.reconcile == "flexlora":
            if not global_.meta.get("aggregated"):
                return init_lora_state(self.shapes, rank, global_.meta.get("init_seed", seed))
            return distribute_from_svd(svd if svd is not None else svd_cache(global_.tensors), rank, self.lora.alpha)
        return agg.truncate_rank(global_.tensors, rank)

    def configure_train(self, round_idx, clients, global_, seed):
        from ...fedspine.bandit import Arm

        from ...fedspine.aggregate import svd_cache

        meta = global_.meta
        # one SVD per module and round, shared by every client whatever its rank
        svd = svd_cache(global_.tensors) if self.reconcile == "flexlora" and meta.get("aggregated") else None
        tasks = []
        fleet = self._chooser(global_, self.FLEET, seed) if self.fleet_warmup else None
        fleet_pending: list[Arm] = []  # the fleet bandit's choices of this round, rewards still to come
        phase = self.phase(round_idx)
        o = self.options
        for c in clients:
            if phase != "prune":  # pure tuning at the device's current masks; no bandit is asked
                meta["pending"][str(c.cid)] = {"round": round_idx, "source": phase, "p": 0.0, "r": self.phase_rank,
                                               "point": None}
                extra = {"ratio": 0.0, "interval": self.interval, "momentum": self.momentum,
                         "row_masks": meta["masks"].get(str(c.cid)), "recovery_steps": int(o.recovery_steps),
                         "max_step": float(o.max_step_sparsity), "protect_layers": list(o.protect_layers)}
                tasks.append(ClientTask(c.cid, round_idx, self.phase_rank,
                                        self.client_lora(global_, self.phase_rank, seed, svd), extra=extra))
                continue
            ch = self._chooser(global_, c.cid, seed)
            if fleet is not None and ch.t < self.fleet_warmup:  # a cold device: the fleet decides
                arm, source = fleet.select(pending=fleet_pending), "fleet"
                fleet_pending.append(arm)
            else:
                arm, source = ch.select(), "device"
                meta["bandits"][str(c.cid)] = ch.state_dict()  # the RNG moved
            assert isinstance(arm, Arm)
            if self.device_ranks is not None:  # the device's own rank, whatever the chooser drew
                if c.cid >= len(self.device_ranks):
                    raise ValueError(f"fedspine device_ranks has {len(self.device_ranks)} entries; device {c.cid} "
                                     "has none (give one rank per device of the fleet)")
                arm = Arm(arm.p, self.device_ranks[c.cid], arm.point)
            meta["pending"][str(c.cid)] = {"round": round_idx, "source": source, **arm.to_dict()}
            extra = {"ratio": float(arm.p), "interval": self.interval, "momentum": self.momentum,
                     "row_masks": meta["masks"].get(str(c.cid)), "recovery_steps": int(o.recovery_steps),
                     "max_step": float(o.max_step_sparsity), "protect_layers": list(o.protect_layers)}
            tasks.append(ClientTask(c.cid, round_idx, int(arm.r), self.client_lora(global_, int(arm.r), seed, svd),
                                    extra=extra))
        if fleet_pending:
            meta["fleet_bandit"] = fleet.state_dict()  # its RNG moved
        return tasks

    def reward_of(self, metrics: dict, round_time: float) -> float:
        from ...fedspine.reward import RoundOutcome, get_reward

        outcome = RoundOutcome(metrics["loss_before"], metrics["loss_after"], metrics["time_s"], round_time,
                               float(metrics.get("sparsity_start", 0.0)), float(metrics.get("sparsity", 0.0)),
                               float(metrics.get("target_ratio", 0.0)), self.p_range[1])
        return float(get_reward(self.reward_name)(outcome, **self.reward_kwargs))

    def aggregate_train(self, round_idx, results, global_):
        from ...fedspine.aggregate import masked_flexlora_aggregate, masked_lora_aggregate
        from ...fedspine.bandit import Arm

        meta = dict(global_.meta)
        for k in ("bandits", "pending", "masks", "sparsity", "rounds"):
            meta[k] = dict(meta.get(k, {}))
        meta["trace"] = list(meta.get("trace", []))
        round_time = max(r.metrics.get("time_s", 0.0) for r in results) or 1.0
        fleet = self._chooser(GlobalModel(meta=meta), self.FLEET, 0) if self.fleet_warmup else None
        for r in results:
            key = str(r.cid)
            pend = meta["pending"].pop(key, None)
            if pend is None or pend["round"] != round_idx:
                raise ValueError(f"round {round_idx}: result from device {r.cid} that was not configured this round")
            arm = Arm(float(pend["p"]), int(pend["r"]), tuple(pend["point"]) if pend.get("point") else None)
            reward = self.reward_of(r.metrics, round_time)
            if pend.get("source") in ("device", "fleet"):  # warm-up / cool-down rounds teach no bandit
                ch = self._chooser(GlobalModel(meta=meta), r.cid, 0)
                ch.update(arm, reward)
                meta["bandits"][key] = ch.state_dict()
                if fleet is not None:  # every reward also teaches the fleet-wide bandit
                    fleet.update(arm, reward)
            meta["masks"][key] = {k: {int(d): m.clone() for d, m in v.items()} for k, v in r.masks.items()}
            meta["sparsity"][key] = float(r.metrics.get("sparsity", 0.0))
            meta["rounds"][key] = int(meta["rounds"].get(key, 0)) + 1
            meta["trace"].append({"device": r.cid, "round": round_idx, "ratio": arm.p, "rank": arm.r,
                                  "chosen_by": pend.get("source", "device"),
                                  "reward": reward, "sparsity": meta["sparsity"][key],
                                  "time_s": r.metrics.get("time_s"), "loss_before": r.metrics["loss_before"],
                                  "loss_after": r.metrics["loss_after"],
                                  "sparsity_start": r.metrics.get("sparsity_start"),
                                  "round_target": r.metrics.get("round_target")})
        if fleet is not None:
            meta["fleet_bandit"] = fleet.state_dict()
        # arms of devices that dropped out or were cut off get no reward (nothing was observed)
        meta["pending"] = {k: v for k, v in meta["pending"].items() if v["round"] > round_idx}
        states = [r.lora for r in results]
        masks = [r.masks for r in results]
        w = [r.num_examples for r in results]
        if self.reconcile == "flexlora":
            new = masked_flexlora_aggregate(states, masks, w, global_.tensors, self.lora.alpha)
        else:
            r_max = self.r_max if self.reconcile == "hetlora" else None
            new = masked_lora_aggregate(states, masks, w, global_.tensors, r_max)
        meta["aggregated"] = True
        return GlobalModel(new, global_.base_delta, meta)

    def eval_delta(self, global_):
        if self.reconcile == "flexlora":
            return {m: d.clone() for m, d in global_.tensors.items()} if global_.meta.get("aggregated") else {}
        return agg.lora_delta(global_.tensors, self.scaling(self.r_max))

    # ---- outputs ----------------------------------------------------------------------------
    def finalize(self, run: RunView) -> dict[str, Any]:
        """Write the global LoRA, the bandit trace, the global pruned model at the fleet's average
        ratio and the devices' deployable models into the run directory (``fedspine/``)."""
        from ... import atomic
        from ...fedspine.device import full_unit_masks, model_sparsity, unit_masks_from_lora_masks
        from ...fedspine.export import consensus_masks, deployable_model, plain_model_with_delta
        from ..evaluation import merged_delta

        out_dir = Path(run.run_dir) / "fedspine"
        out_dir.mkdir(parents=True, exist_ok=True)
        g = run.global_
        torch.save({"tensors": g.tensors, "reconcile": self.reconcile, "alpha": self.lora.alpha},
                   out_dir / "global_lora.pt")
        atomic.write_text(Path(run.run_dir) / TRACE_FILE,
                          "".join(json.dumps({**t, "device_class": run.fleet[t["device"]].name}) + "\n"
                                  for t in g.meta.get("trace", [])))
        summary: dict[str, Any] = {"reconcile": self.reconcile, "chooser": self.chooser, "devices": {}}
        ad = run.base.adapter
        masks = {int(k): full_unit_masks(ad, *unit_masks_from_lora_masks(ad, v)) for k, v in g.meta["masks"].items()}
        if not masks or self.export == "none":
            atomic.write_json(out_dir / "outputs.json", summary)
            return summary
        delta = merged_delta(g.base_delta, self.eval_delta(g))
        spars = {cid: model_sparsity(ad, *m) for cid, m in masks.items()}
        avg = sum(spars.values()) / len(spars)
        plain = plain_model_with_delta(run.base, delta)
        ratio = avg if self.global_ratio is None else self.global_ratio
        hm, cm = consensus_masks(plain, list(masks.values()), min(ratio, 0.99))
        del plain
        summary["fleet_average_sparsity"] = avg
        summary["global"] = self._save(deployable_model(run.base, delta, hm, cm), out_dir / "global_pruned",
                                       run.tokenizer, {"fedspine": {"role": "global", "target_ratio": ratio}},
                                       ad, hm, cm)
        chosen = sorted(masks)
        if self.export == "class":  # one representative per device class: the one that trained most
            best: dict[str, int] = {}
            for cid in chosen:
                cls = run.fleet[cid].name
                n = g.meta["rounds"].get(str(cid), 0)
                if cls not in best or n > g.meta["rounds"].get(str(best[cls]), 0):
                    best[cls] = cid
            chosen = sorted(best.values())
        for cid in chosen:
            name = f"{run.fleet[cid].name}-{cid}"
            info = self._save(deployable_model(run.base, delta, *masks[cid]), out_dir / "devices" / name,
                              run.tokenizer, {"fedspine": {"role": "device", "device": cid,
                                                           "device_class": run.fleet[cid].name}}, ad, *masks[cid])
            summary["devices"][name] = info
        summary["device_sparsity"] = {str(k): v for k, v in spars.items()}
        atomic.write_json(out_dir / "outputs.json", summary)
        log.info("fedspine: wrote %d deployable model(s) and the global pruned model (sparsity %.3f) to %s",
                 len(chosen), avg, out_dir)
        return summary

    @staticmethod
    def _save(model, path: Path, tokenizer, extra: dict, adapter, hm, cm) -> dict:
        from ... import save_model
        from ...fedspine.device import model_sparsity

        save_model(model, path, tokenizer=tokenizer, extra=extra, overwrite=True)  # its own run's outputs
        n = sum(p.numel() for p in model.parameters())
        rel = f"{path.parent.name}/{path.name}" if path.parent.name == "devices" else path.name
        return {"path": rel, "params": n, "sparsity": model_sparsity(adapter, hm, cm)}
