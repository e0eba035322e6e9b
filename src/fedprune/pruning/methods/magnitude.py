"""magnitude: heads + FFN channels, uniform per layer, by the norm of their weights; no calibration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...adapters import DecoderAdapter
from ..budget import check_ratio
from ..criteria.units import magnitude_scores
from .common import prune_units_uniformly


@dataclass
class MagnitudeOptions:
    """magnitude takes no options (no calibration pass)."""


def prune_magnitude(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, opts: MagnitudeOptions) -> dict[str, Any]:
    check_ratio(ratio)
    return prune_units_uniformly(adapter, ratio, lambda i: magnitude_scores(adapter, adapter.layers[i]))
