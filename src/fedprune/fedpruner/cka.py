"""Linear CKA (Kornblith et al., 2019) between layer representations.

For ``X`` (n x d1) and ``Y`` (n x d2), rows = the same n examples (tokens), each column
centred over the rows:

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

in [0, 1]; 1 for identical representations; invariant to orthogonal transforms and
isotropic scaling of either side; 0 when the (centred) column spaces are orthogonal.
Computed in float64 whatever the dtype of the layer outputs (bfloat16 and float16 included).
"""
from __future__ import annotations

from typing import Sequence

import torch


def _centre(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return x - x.mean(dim=0, keepdim=True)


def linear_cka(X: torch.Tensor, Y: torch.Tensor, eps: float = 1e-12) -> float:
    """Linear CKA of ``X`` ``[n, d1]`` and ``Y`` ``[n, d2]`` (leading dims are flattened into ``n``)."""
    X, Y = _centre(X), _centre(Y)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y need the same number of rows, got {X.shape[0]} and {Y.shape[0]}")
    num = torch.linalg.matrix_norm(Y.T @ X) ** 2
    den = torch.linalg.matrix_norm(X.T @ X) * torch.linalg.matrix_norm(Y.T @ Y)
    if den <= eps:
        return 0.0
    return float(num / den)


def cka_matrix(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[L, L]`` symmetric matrix of pairwise linear CKA between layer outputs.

    Each output is ``[n, d]`` or ``[batch, seq, d]`` (flattened to tokens); all share ``n``.
    The diagonal is 1 (0 for an all-constant output).
    """
    feats = [_centre(o) for o in outputs]
    L = len(feats)
    S = torch.zeros(L, L, dtype=torch.float64)
    n = feats[0].shape[0] if feats else 0
    if feats and n < min(f.shape[1] for f in feats):
        # fewer tokens than features: ||Y^T X||_F^2 = <X X^T, Y Y^T>_F, so work with the n x n
        # token Gram matrices (one product per layer instead of one d x d product per pair)
        grams = [f @ f.T for f in feats]
        norms = [torch.linalg.matrix_norm(g) for g in grams]
        for i in range(L):
            for j in range(i, L):
                den = norms[i] * norms[j]
                v = 0.0 if den <= 1e-12 else float((grams[i] * grams[j]).sum() / den)
                S[i, j] = S[j, i] = v
        return S
    grams = [f.T @ f for f in feats]
    norms = [torch.linalg.matrix_norm(g) for g in grams]
    for i in range(L):
        for j in range(i, L):
            den = norms[i] * norms[j]
            v = 0.0 if den <= 1e-12 else float(torch.linalg.matrix_norm(feats[j].T @ feats[i]) ** 2 / den)
            S[i, j] = S[j, i] = v
    return S


@torch.no_grad()
def layer_outputs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  ) -> list[torch.Tensor]:
    """Output hidden state ``[batch, seq, hidden]`` of every decoder layer (forward hooks via the adapter).

    Padding positions (``attention_mask == 0``) are dropped, giving ``[n_tokens, hidden]``.
    """
    from ..adapters import get_adapter

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ad = get_adapter(base)
    outs: list[torch.Tensor] = [None] * ad.num_layers  # type: ignore[list-item]

    def make(i):
        def hook(module, args, output):
            outs[i] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    hooks = [layer.register_forward_hook(make(i)) for i, layer in enumerate(ad.layers)]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in hooks:
            h.remove()
    if attention_mask is not None:
        keep = attention_mask.bool()
        return [o[keep] for o in outs]
    return [o.reshape(-1, o.shape[-1]) for o in outs]
