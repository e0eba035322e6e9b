"""Federated strategies, registered by name (``federation.strategy``).

- :mod:`.base`      the contract (:class:`Strategy`, its defaults in :class:`LoraStrategy`),
                    :class:`ClientInfo`, :class:`GlobalModel`, :class:`RunView`, the registry
- :mod:`.fedit`, :mod:`.hetlora`, :mod:`.flexlora`, :mod:`.flora`   the LoRA baselines
- :mod:`.fedspine`  FedSpine (per-device bandits, pruning while tuning)
- :mod:`.fedpruner` FedPruner, FedPruner+ and the memory-aware baselines they are compared with

A new strategy is one module (an ``Options`` dataclass and a class) and one line below;
``tests/test_strategy_contract.py`` then runs it by name (docs/extending.md).
"""
from __future__ import annotations

from .base import (STRATEGIES, ClientInfo, GlobalModel, LoraStrategy, NoOptions, RunView, Strategy, make_strategy,
                   strategy_options)
from .fedit import FedIT
from .fedpruner import DepthTruncation, FedITFull, FedPruner, FedPrunerPlus, FedRA, HetLoRAFull
from .fedspine import FedSpine
from .flexlora import FlexLoRA
from .flora import FLoRA
from .hetlora import HetLoRA

STRATEGIES.register("fedit", FedIT)
STRATEGIES.register("hetlora", HetLoRA)
STRATEGIES.register("flexlora", FlexLoRA)
STRATEGIES.register("flora", FLoRA)
STRATEGIES.register("fedspine", FedSpine)
STRATEGIES.register("fedpruner", FedPruner)
STRATEGIES.register("fedpruner_plus", FedPrunerPlus)
STRATEGIES.register("fedit_full", FedITFull)
STRATEGIES.register("depth_truncation", DepthTruncation)
STRATEGIES.register("fedra", FedRA)
STRATEGIES.register("hetlora_full", HetLoRAFull)

__all__ = ["STRATEGIES", "ClientInfo", "GlobalModel", "LoraStrategy", "NoOptions", "RunView", "Strategy",
           "make_strategy", "strategy_options", "FedIT", "HetLoRA", "FlexLoRA", "FLoRA", "FedSpine", "FedPruner",
           "FedPrunerPlus", "FedITFull", "DepthTruncation", "FedRA", "HetLoRAFull"]
