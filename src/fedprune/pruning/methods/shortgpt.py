"""ShortGPT (Men et al., 2024): remove the whole layers with the lowest Block Influence
``BI_i = 1 - E_t cos(x_i,t, x_{i+1},t)``; granularity is one layer."""
from __future__ import annotations

from typing import Any

import torch

from ...adapters import DecoderAdapter
from ..budget import check_ratio
from ..criteria.layer import block_influence_scores, lowest
from .common import layers_for_ratio
from .wanda_sp import BatchOptions


def prune_shortgpt(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, opts: BatchOptions) -> dict[str, Any]:
    check_ratio(ratio)
    n = layers_for_ratio(adapter, ratio)
    bi = block_influence_scores(adapter, ids, opts.batch_size)
    drop = lowest(bi, n)
    adapter.remove_layers(drop)
    return {"removed_layers": drop, "block_influence": bi}
