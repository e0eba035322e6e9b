"""Importance criteria: one score per unit (layer, head, channel); higher means keep."""
from .neuron import NEURON_CRITERIA, UnitStats, removal_order
from .layer import block_influence

__all__ = ["NEURON_CRITERIA", "UnitStats", "removal_order", "block_influence"]
