"""magnitude: heads + FFN channels, uniform per layer, by the norm of their weights; no calibration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...adapters import DecoderAdapter
from ..budget import check_ratio
from ..criteria.units import magnitude_scores
from ..width import check_option as check_width_option
from .common import prune_units_uniformly


@dataclass
class MagnitudeOptions:
    """magnitude's options (it takes no calibration pass)."""

    width_multiple: int = 1
    """kept FFN widths and kept heads x head_dim multiples of this (32: q4_0/q8_0 blocks, 256: k-quants); 1 = off"""

    def __post_init__(self):
        self.width_multiple = check_width_option(self.width_multiple)


def prune_magnitude(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, opts: MagnitudeOptions) -> dict[str, Any]:
    check_ratio(ratio)
    return prune_units_uniformly(adapter, ratio, lambda i: magnitude_scores(adapter, adapter.layers[i]),
                                 opts.width_multiple)
