"""Wanda-sp (structured Wanda, as the FLAP paper runs it): heads + FFN channels, uniform per
layer, scored by ``sum_i |W_ij| * ||X_j||_2`` on the output projections' input columns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...adapters import DecoderAdapter
from ...options import require_int
from ..budget import check_ratio
from ..criteria.units import activation_moments, wanda_sp_scores
from .common import prune_units_uniformly


@dataclass
class BatchOptions:
    """Options of the methods whose only knob is the calibration batch."""

    batch_size: int = 8
    """calibration samples per forward pass"""

    def __post_init__(self):
        require_int("batch_size", self.batch_size, 1)


def prune_wanda_sp(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, opts: BatchOptions) -> dict[str, Any]:
    check_ratio(ratio)
    mom = activation_moments(adapter, ids, opts.batch_size)
    return prune_units_uniformly(adapter, ratio, lambda i: wanda_sp_scores(adapter, adapter.layers[i], mom[i]))
