"""Importance criteria: one score per unit (layer, head, channel); higher means keep.

``layer``: Block Influence and SLEB's removal order; ``neuron``: COMP's condition-number
criteria on second-moment statistics; ``units``: the peers' head/channel scores (magnitude,
Wanda-sp, FLAP's fluctuation, first-order Taylor).
"""
from .layer import block_influence, block_influence_scores, calibration_nll, sleb_removal
from .neuron import NEURON_CRITERIA, UnitStats, removal_order

__all__ = ["NEURON_CRITERIA", "UnitStats", "removal_order", "block_influence", "block_influence_scores",
           "calibration_nll", "sleb_removal"]
