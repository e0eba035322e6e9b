"""SLEB (Song et al., 2024): remove blocks one at a time, each time the block whose removal
raises calibration NLL least; granularity is one layer.

Presets (``-o preset=``, :mod:`.presets`): the project's removal rule already is the SLEB
repository's (greedy, one block at a time, the block whose removal gives the lowest calibration
perplexity; NLL ranks the same), so ``official`` only changes the calibration: 128 windows of
2048 tokens (the repository's ``nsamples=128`` at ``model.seqlen = 2048``; it draws them from
WikiText-2, pass ``--calibration wikitext2`` for that).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...adapters import DecoderAdapter
from ..budget import check_ratio
from ..criteria.layer import sleb_removal
from .common import layers_for_ratio
from .presets import check_preset
from .wanda_sp import BatchOptions


@dataclass
class SlebOptions(BatchOptions):
    """SLEB's options."""

    preset: str = "project"
    """'project' or 'official' (same removal rule; official calibration: 128 windows of 2048 tokens)"""

    OFFICIAL_CALIBRATION: ClassVar[dict[str, int]] = {"nsamples": 128, "seq_len": 2048}

    def __post_init__(self):
        super().__post_init__()
        check_preset(self.preset)


def prune_sleb(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, opts: BatchOptions) -> dict[str, Any]:
    check_ratio(ratio)
    n = layers_for_ratio(adapter, ratio)
    drop = sleb_removal(adapter, ids, n, opts.batch_size)
    adapter.remove_layers(drop)
    return {"removed_layers": drop}
