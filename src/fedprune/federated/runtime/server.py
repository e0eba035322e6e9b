"""The server-side steps both runtimes share (the in-process simulator and the Flower
ServerApp), so a strategy is set up, asked and aggregated the same way in both:

- :func:`build_strategy`: the configured strategy, bound to the base model and the run config
  (also what a Flower ClientApp uses to find the device program);
- :func:`plan_round`: select the round's clients and configure their tasks;
- :func:`aggregate`: weight capping, clipping and the strategy's (robust) average, in client order;
- :func:`client_seed`: the seed a client trains with in a round (the same on both runtimes).
"""
from __future__ import annotations

import zlib
from typing import Mapping, Sequence

from ..config import FederatedConfig, FederationSettings
from ..local import ClientResult, ClientTask
from ..robust import aggregate_round
from ..strategies import ClientInfo, GlobalModel, Strategy, make_strategy


def client_seed(seed: int, round_idx: int, cid: int) -> int:
    """Client ``cid``'s training seed in round ``round_idx``: depends on nothing else."""
    return zlib.crc32(f"{seed}|{round_idx}|{cid}|train".encode())


def build_strategy(cfg: FederatedConfig, model_config) -> Strategy:
    """``federation.strategy`` with its options, bound to the base model's config and the run config."""
    fed = cfg.federation
    strategy = make_strategy(fed.strategy, cfg.lora, fed.ranks or None, fed.options)
    strategy.bind(model_config, cfg)
    return strategy


def plan_round(strategy: Strategy, round_idx: int, clients: Sequence[ClientInfo], global_: GlobalModel,
               fed: FederationSettings) -> list[ClientTask]:
    """The round's tasks: ``federation.clients_per_round`` clients selected, each configured."""
    selected = strategy.select_clients(round_idx, clients, fed.clients_per_round, fed.seed, global_)
    return strategy.configure_train(round_idx, selected, global_, fed.seed)


def aggregate(strategy: Strategy, round_idx: int, accepted: Sequence[ClientResult], tasks: Mapping[int, ClientTask],
              global_: GlobalModel, fed: FederationSettings,
              registered: Mapping[int, int]) -> tuple[GlobalModel, list[dict]]:
    """The next global from the accepted results, sorted by client id (aggregation order must not
    depend on arrival order); ``registered``: the size the server knows for each client.
    Returns the new global and one diagnostic dict per client (weights, clipping)."""
    ordered = sorted(accepted, key=lambda r: r.cid)
    return aggregate_round(strategy, round_idx, ordered, tasks, global_, fed, registered)
