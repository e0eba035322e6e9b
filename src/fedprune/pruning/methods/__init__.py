"""Pruning methods, one module each, registered here by name with their options class.

A method is ``run(adapter, calib_ids, ratio, options) -> report``: it prunes ``adapter.model``
in place to remove ``ratio`` of its parameters and returns a JSON-able report; ``options`` is an
instance of its options dataclass (built from user keys by ``fedprune.pruning.method_options``,
an unknown key refused by name). The CLI's ``--method`` choices and ``--help``, the pruning
benchmark and the contract tests (``tests/test_pruning_contract.py``) all read :data:`METHODS`,
so a new method is one module plus one line in :data:`BUILTIN`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ...registry import Registry
from .comp import CompOptions, comp_prune
from .flap import FlapOptions, prune_flap
from .llm_pruner import LlmPrunerOptions, prune_llm_pruner
from .magnitude import MagnitudeOptions, prune_magnitude
from .shortgpt import prune_shortgpt
from .presets import PRESETS, calibration_sizes
from .sleb import SlebOptions, prune_sleb
from .wanda_sp import BatchOptions, WandaSpOptions, prune_wanda_sp


@dataclass(frozen=True)
class PruningMethod:
    """A registered method: how to run it, its options, what it promises."""

    name: str
    run: Callable[..., dict[str, Any]]
    options: type
    summary: str
    """one line for ``fedprune prune --help``"""
    whole_layers: bool = False
    """removes whole layers only: the achieved ratio moves in steps of one layer"""
    whole_model: str | None = None
    """why the method needs the whole model in memory at once (it then refuses ``weight_offload``
    ``cpu``/``disk``, naming this); None: it works layer by layer (``pruning.streamed``)"""
    ratio_tolerance: float = 0.02
    """|achieved - asked| ratio on a model with a few hundred units per layer (plus one layer's
    share for ``whole_layers`` methods); the contract tests hold every method to it"""

    def tolerance(self, num_parameters: int, layer_parameters: int) -> float:
        """The allowed |achieved - asked| ratio on a model of that size."""
        return self.ratio_tolerance + (layer_parameters / num_parameters if self.whole_layers else 0.0)


BUILTIN = (
    PruningMethod("comp", comp_prune, CompOptions,
                  "COMP: whole layers by Block Influence, then heads/channels by a condition-number criterion, "
                  "mask tuning"),
    PruningMethod("magnitude", prune_magnitude, MagnitudeOptions,
                  "heads + FFN channels by weight norm, uniform per layer, no calibration"),
    PruningMethod("wanda_sp", prune_wanda_sp, WandaSpOptions,
                  "Wanda-sp: |W| x activation norm on output-projection columns, uniform per layer"),
    PruningMethod("flap", prune_flap, FlapOptions,
                  "FLAP: fluctuation metric, global adaptive structure, bias compensation"),
    PruningMethod("llm_pruner", prune_llm_pruner, LlmPrunerOptions,
                  "LLM-Pruner: first-order Taylor importance of coupled groups (needs gradients)",
                  whole_model="needs gradients of the calibration loss through the whole model (a backward pass "
                              "holds every layer's weights and activations at once)"),
    PruningMethod("shortgpt", prune_shortgpt, BatchOptions,
                  "ShortGPT: remove the layers with the lowest Block Influence", whole_layers=True),
    PruningMethod("sleb", prune_sleb, SlebOptions,
                  "SLEB: remove layers one by one, each raising calibration NLL least", whole_layers=True,
                  whole_model="scores every candidate removal by the whole model's calibration loss (all layers, "
                              "many times over)"),
)

METHODS: Registry[PruningMethod] = Registry("pruning method")
for _method in BUILTIN:
    METHODS.register(_method.name, _method)

__all__ = ["METHODS", "PruningMethod", "BUILTIN", "CompOptions", "MagnitudeOptions", "BatchOptions", "FlapOptions",
           "LlmPrunerOptions", "WandaSpOptions", "SlebOptions", "PRESETS", "calibration_sizes"]
