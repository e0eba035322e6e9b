"""Memory-efficient causal-LM loss: cross-entropy through the LM head in checkpointed chunks
of the supervised tokens only.

The usual ``model(**batch, labels=labels)`` materialises the logits of every position
(``N x V``, ``N`` = batch x sequence tokens, ``V`` = vocabulary), upcasts them to float32,
and keeps the log-softmax output for backward; at the start of backward the logits, the
log-softmax output, its gradient and the logits' gradient (about ``4 N V x 4`` bytes) are
alive together. For a small model with a large vocabulary (SmolLM2-135M: ``V = 49152``)
that is more than a whole device's budget.

:func:`chunked_causal_lm_loss` computes the same loss from the decoder body's final hidden
states:

1. shift (position ``t`` predicts label ``t + 1``) and keep only the positions whose label is
   supervised (``!= ignore_index``): prompt and padding positions never reach the LM head;
2. split them into chunks of ``chunk_tokens`` tokens; each chunk's ``lm_head`` + float32
   cross-entropy (summed) runs under :func:`torch.utils.checkpoint.checkpoint`, so its
   ``chunk x V`` logits are freed right after the forward and recomputed, one chunk at a
   time, in backward;
3. divide by the number of supervised tokens (the mean, as Hugging Face's loss).

Peak extra memory is then ``~3 chunk V x 4`` bytes (one chunk's log-softmax output, its
gradient and the logits' gradient) plus the gathered hidden states of the supervised tokens,
for one extra LM-head forward in compute. The loss and its gradients equal the standard
loss up to float summation order.

A batch with no supervised token returns a loss of exactly 0 that is still attached to the
graph (``backward()`` works and every gradient is zero); the standard mean reduction would
return NaN (0 / 0) there and poison the update.

:func:`causal_lm_loss` runs a (PEFT-wrapped) LLaMA-family or OPT model this way: the
architecture adapter names the decoder body (whose ``last_hidden_state`` the LM head reads
directly) and the LM head, so LoRA layers, submodel layer lists and sub-block hooks inside
the body take effect as in the model's own forward.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 64


def _chunk_nll_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                           chunk_tokens: int = DEFAULT_CHUNK_TOKENS, ignore_index: int = IGNORE_INDEX,
                           checkpoint_chunks: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised positions, the LM head applied in chunks.

    ``hidden``: final hidden states ``(B, T, H)`` (after the final norm, what ``head`` reads);
    ``labels``: ``(B, T)`` token ids, ``ignore_index`` where not supervised (unshifted, as for
    Hugging Face's ``labels=``); ``head``: the LM head module (a ``Linear``, possibly
    LoRA-wrapped). ``checkpoint_chunks=False`` keeps each chunk's graph (for comparison only:
    it saves every chunk's log-softmax output, as much as the full logits).

    Returns a 0-dim float32 tensor: the mean over supervised tokens, or an exact, graph-attached
    0 when there are none.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden (B, T, H) and labels (B, T); got {tuple(hidden.shape)} and "
                         f"{tuple(labels.shape)}")
    H = hidden.shape[-1]
    h = hidden[:, :-1, :].reshape(-1, H)
    y = labels[:, 1:].reshape(-1).to(h.device)
    idx = (y != ignore_index).nonzero().squeeze(1)
    hs = h.index_select(0, idx)  # (n, H): only supervised positions reach the head
    ys = y.index_select(0, idx)
    n = int(idx.numel())
    if n == 0:
        return hs.float().sum()  # exact 0, attached to the graph: zero gradients, no NaN
    total = None
    for h_c, y_c in zip(hs.split(chunk_tokens), ys.split(chunk_tokens)):
        if checkpoint_chunks and torch.is_grad_enabled():
            part = checkpoint(_chunk_nll_sum, head, h_c, y_c, use_reentrant=False)
        else:
            part = _chunk_nll_sum(head, h_c, y_c)
        total = part if total is None else total + part
    return total / n


def body_and_head(model: nn.Module, adapter=None) -> tuple[nn.Module, nn.Module]:
    """The decoder body and LM head of a (PEFT-wrapped) causal LM, via its architecture adapter."""
    if adapter is None:
        from ...adapters import get_adapter

        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        adapter = get_adapter(inner)
    return adapter.decoder(), adapter.lm_head()


def causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                   adapter=None) -> torch.Tensor:
    """The loss of ``model(**batch)`` with ``batch['labels']``, computed by :func:`chunked_causal_lm_loss`.

    ``batch`` holds ``input_ids``, ``labels`` and optionally ``attention_mask`` (as
    ``federated.partition.collate`` builds it). ``adapter`` saves the look-up when the caller
    already has the model's architecture adapter.
    """
    body, head = body_and_head(model, adapter)
    out = body(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return chunked_causal_lm_loss(hidden, batch["labels"], head, chunk_tokens)
