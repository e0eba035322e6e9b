"""Bias compensation (FLAP's recovery step): a removed unit's mean output goes into the bias.

Removing input columns ``R`` of an output projection ``W`` drops ``W[:, R] x_R`` from every
token's output; its calibration mean ``W[:, R] E[x_R]`` can be kept as a constant, added to
the projection's bias (``DecoderAdapter.add_output_bias``, which creates the bias where the
architecture has none and records it in the plan so the checkpoint reloads).
"""
from __future__ import annotations

import torch


def removed_mean_contribution(lin: torch.nn.Linear, cols: list[int], mean: torch.Tensor) -> torch.Tensor | None:
    """``W[:, cols] @ mean[cols]`` ``[out_features]`` (float64), computed on the unpruned weights;
    None when nothing is removed."""
    if not cols:
        return None
    W = lin.weight.detach().double()
    idx = torch.as_tensor(cols)
    return W[:, idx.to(W.device)] @ mean[idx].double().to(W.device)
