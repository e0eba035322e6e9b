"""SLEB (Song et al., 2024): remove blocks one at a time, each time the block whose removal
raises calibration NLL least; granularity is one layer."""
from __future__ import annotations

from typing import Any

import torch

from ...adapters import DecoderAdapter
from ..budget import check_ratio
from ..criteria.layer import sleb_removal
from .common import layers_for_ratio
from .wanda_sp import BatchOptions


def prune_sleb(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, opts: BatchOptions) -> dict[str, Any]:
    check_ratio(ratio)
    n = layers_for_ratio(adapter, ratio)
    drop = sleb_removal(adapter, ids, n, opts.batch_size)
    adapter.remove_layers(drop)
    return {"removed_layers": drop}
