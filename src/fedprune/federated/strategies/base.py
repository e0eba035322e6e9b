"""The strategy contract, in the Flower spirit: ``select_clients`` and ``configure_train`` give
each selected client its own task (rank, LoRA state, layer subset, masks...), the device runs
``client_trainer`` on it, ``aggregate_train`` turns the accepted results into the next global.
The maths lives in :mod:`fedprune.federated.aggregators`; strategies only route.

Every method a runtime calls is declared on :class:`Strategy`, and :class:`LoraStrategy`
gives each a default (``bind`` and ``finalize`` do nothing, ``client_trainer`` is the plain
local training loop), so the runtimes call them directly. A strategy's options are a dataclass
(its ``Options``): ``federation.options`` is checked against it by name and type before any
model is loaded. All state a strategy changes during a run lives in :class:`GlobalModel`
(``meta`` for small plain values), which the runtime checkpoints: a resumed run continues
exactly where an uninterrupted one would be.

A strategy never sees device profiles: only client ids, self-reported facts (number of
examples, memory) and the results (metrics include the observed round time ``time_s``).

The registry :data:`STRATEGIES` is filled by the package (``strategies/__init__.py``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Protocol, Sequence

import torch

from ...options import build_options
from ...registry import Registry
from .. import aggregators as agg
from ..local import ClientResult, ClientTask, TrainSettings, train_client
from ..lora import LoraSettings, init_lora_state


@dataclass
class ClientInfo:
    """What the server knows about a client without being told its profile."""

    cid: int
    num_examples: int
    memory_bytes: int | None = None
    """self-reported memory budget (what a device would report about itself)"""


@dataclass
class GlobalModel:
    """Server state that strategies read and write (checkpointed every round)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """the global LoRA state (or, for FlexLoRA, the full-space update per module)"""
    base_delta: dict[str, torch.Tensor] = field(default_factory=dict)
    """updates merged into the frozen base (FLoRA); the runtime applies ``W = W0 + delta``"""
    meta: dict[str, Any] = field(default_factory=dict)
    """small plain strategy state (numbers, strings, lists, dicts, tensors): everything a strategy
    changes from round to round, so that a resume continues it"""


@dataclass
class RunView:
    """What a strategy's ``finalize`` sees of a finished run; both runtimes pass this type."""

    run_dir: Path
    global_: GlobalModel
    base: Any
    """the shared base model (``federated.lora.SharedBaseModel``)"""
    tokenizer: Any
    fleet: Sequence[Any]
    """the device profile of every client id (``federated.devices.DeviceProfile``)"""


@dataclass(frozen=True)
class NoOptions:
    """The options of a strategy that takes none (``federation.options`` must be empty)."""


class Strategy(Protocol):
    """What the runtimes (in-process simulator, Flower) call, in this order."""

    name: str
    Options: ClassVar[type]
    """the dataclass ``federation.options`` is built into (``NoOptions`` when there are none)"""
    supports_robust_aggregation: ClassVar[bool]
    """``aggregate_train`` averages same-indexed entries and honours ``aggregation``/``trim_ratio``"""
    aggregation: str
    trim_ratio: float

    def bind(self, model_config: Any, cfg: Any) -> None:
        """Once, before anything else: the base model's config and the run config."""

    def init_global(self, shapes: dict[str, tuple[int, int]], seed: int) -> GlobalModel: ...

    def select_clients(self, round_idx: int, clients: Sequence[ClientInfo], k: int, seed: int,
                       global_: GlobalModel) -> list[ClientInfo]:
        """The round's clients; may record what it decided in ``global_.meta``."""

    def configure_train(self, round_idx: int, clients: Sequence[ClientInfo], global_: GlobalModel,
                        seed: int) -> list[ClientTask]: ...

    def client_trainer(self, base: Any, task: ClientTask, examples: Sequence[dict], settings: TrainSettings,
                       seed: int, pad_id: int, device_state: Mapping | None = None) -> tuple[ClientResult, dict | None]:
        """The device program (runs on the device): the result and the state the device keeps."""

    def aggregate_train(self, round_idx: int, results: Sequence[ClientResult], global_: GlobalModel) -> GlobalModel: ...

    def eval_delta(self, global_: GlobalModel) -> dict[str, torch.Tensor]:
        """The dense update the server evaluates (``W0 + base_delta + eval_delta``)."""

    def finalize(self, run: RunView) -> dict | None:
        """After the last round: write the strategy's own outputs into ``run.run_dir``."""


STRATEGIES: Registry[type] = Registry("strategy")


class LoraStrategy:
    """Shared plumbing and the contract's defaults: rank per client, seeded client sampling,
    the plain device program, eval as a dense delta. Subclasses set ``Options`` to their
    options dataclass and read it from ``self.options``."""

    name = "base"
    Options: ClassVar[type] = NoOptions
    supports_robust_aggregation = False
    """True when ``aggregate_train`` averages same-indexed entries and can use a median or trimmed
    mean instead (``federation.aggregation``); the runtime sets the two attributes below"""
    aggregation = "mean"
    trim_ratio = 0.0

    def __init__(self, lora: LoraSettings, ranks: Sequence[int] | None = None, options: Any = None):
        self.lora = lora
        self.ranks = [int(r) for r in (ranks or [lora.rank])]
        if any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be >= 1, got {self.ranks}")
        self.options = self.Options() if options is None else options
        if not isinstance(self.options, self.Options):
            raise TypeError(f"strategy {self.name!r} takes {self.Options.__name__}, got {type(options).__name__}")
        self.shapes: dict[str, tuple[int, int]] = {}

    # ranks are assigned by client id (cycled), never from the device profile
    def rank_of(self, cid: int) -> int:
        return self.ranks[cid % len(self.ranks)]

    @property
    def r_max(self) -> int:
        return max(self.ranks)

    def scaling(self, rank: int) -> float:
        return self.lora.alpha / rank

    def bind(self, model_config, cfg) -> None:
        pass

    def init_global(self, shapes, seed):
        self.shapes = dict(shapes)
        return GlobalModel(tensors=init_lora_state(shapes, self.r_max, seed))

    def select_clients(self, round_idx, clients, k, seed, global_):
        rng = random.Random(f"{seed}|select|{round_idx}")
        k = min(k, len(clients))
        return sorted(rng.sample(list(clients), k), key=lambda c: c.cid)

    def configure_train(self, round_idx, clients, global_, seed):
        return [ClientTask(c.cid, round_idx, self.rank_of(c.cid), self.client_lora(c, global_, round_idx, seed))
                for c in clients]

    def client_lora(self, client: ClientInfo, global_: GlobalModel, round_idx: int, seed: int):
        return {k: v.clone() for k, v in global_.tensors.items()}

    def client_trainer(self, base, task, examples, settings, seed, pad_id, device_state=None):
        return train_client(base, task, examples, settings, seed, pad_id, device_state)

    def eval_delta(self, global_):
        return agg.lora_delta(global_.tensors, self.scaling(self.r_max))

    def finalize(self, run: RunView) -> dict | None:
        return None


def strategy_options(name: str, options: Mapping[str, Any] | Any | None = None) -> Any:
    """``federation.options`` as strategy ``name``'s ``Options`` dataclass: unknown keys are
    refused by name (with the known ones listed), values coerced to the annotated types."""
    cls = STRATEGIES.get(name).Options
    if isinstance(options, cls):
        return options
    return build_options(cls, dict(options or {}), f"federation.strategy {name!r} (federation.options)",
                         prefix="federation.options.")


def make_strategy(name: str, lora: LoraSettings, ranks: Sequence[int] | None = None,
                  options: Mapping[str, Any] | Any | None = None) -> LoraStrategy:
    """Build a registered strategy; ``options`` (federation.options, a dict or its ``Options``)."""
    return STRATEGIES.get(name)(lora, ranks, strategy_options(name, options))
