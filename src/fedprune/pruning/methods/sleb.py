"""SLEB (Song et al., 2024): remove blocks one at a time, each time the block whose removal
raises calibration NLL least; granularity is one layer.

Presets (``-o preset=``, :mod:`.presets`): both remove blocks greedily, one at a time, the
block whose removal gives the lowest calibration NLL (the SLEB repository sums token NLLs:
the same ranking). ``official`` adds the repository's barriers (``early_barrier=1``,
``latter_barrier=1``: the first and the last remaining block are never removed) and its window
length, 2048 tokens (``model.seqlen``), in 128 windows. The repository draws its calibration
differently: 128 shuffled WikiText-2 training lines joined and cut into 2048-token windows (a
few windows in all); here they are 128 random windows of the ``--calibration`` corpus (pass
``--calibration wikitext2`` for the official corpus).
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
    """'project' or 'official' (SLEB repository: first and last block never removed; 128 windows of 2048 tokens)"""

    OFFICIAL_CALIBRATION: ClassVar[dict[str, int]] = {"nsamples": 128, "seq_len": 2048}

    def __post_init__(self):
        super().__post_init__()
        check_preset(self.preset)


def prune_sleb(adapter: DecoderAdapter, ids: torch.Tensor, ratio: float, opts: SlebOptions) -> dict[str, Any]:
    check_ratio(ratio)
    n = layers_for_ratio(adapter, ratio)
    barrier = 1 if opts.preset == "official" else 0
    drop = sleb_removal(adapter, ids, n, opts.batch_size, keep_first=barrier, keep_last=barrier)
    adapter.remove_layers(drop)
    return {"removed_layers": drop, "preset": opts.preset}
