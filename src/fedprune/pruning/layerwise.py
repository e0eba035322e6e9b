"""Run a model one decoder layer at a time on calibration data.

Post-training pruners never need the whole network's activations at once: they capture
the hidden states entering the first decoder layer, then push them through one layer at a
time. Memory holds the current layer, its weights and ``N x L x d`` hidden states per
stream (the *dense* stream, the unpruned model's hidden states, and the *pruned* stream,
the hidden states of the model pruned so far), never all layers' activations.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..adapters import DecoderAdapter
from .activations import HiddenStream


class _Stop(Exception):
    pass


@dataclass
class LayerInputs:
    """Hidden states entering layer 0 (``[N, L, d]``) and the shared keyword arguments."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


def _capture(adapter: DecoderAdapter, input_ids: torch.Tensor, batch_size: int,
             sink: Callable[[int, torch.Tensor], None]) -> dict[str, Any]:
    """Run embeddings batch by batch up to layer 0; ``sink(batch_index, hidden)`` gets each batch."""
    model = adapter.model
    first = adapter.layers[0]
    saved: dict[str, Any] = {}
    state = {"batch": 0}

    def hook(_mod, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        sink(state["batch"], hs.detach())
        if not saved:
            saved.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for b, i in enumerate(range(0, input_ids.shape[0], batch_size)):
            state["batch"] = b
            try:
                model(input_ids=input_ids[i:i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    saved["use_cache"] = False
    saved.pop("past_key_values", None)
    return saved


@torch.no_grad()
def capture_layer0_inputs(adapter: DecoderAdapter, input_ids: torch.Tensor, batch_size: int = 8) -> LayerInputs:
    """Run embeddings (and rotary tables) and stop at the first decoder layer.

    ``input_ids``: ``[N, L]``. Returns the inputs of layer 0 for every sample and the keyword
    arguments the layer is called with (attention mask, position embeddings, ...), which
    are the same for every batch of equal shape.
    """
    chunks: list[torch.Tensor] = []
    kwargs = _capture(adapter, input_ids, batch_size, lambda _b, hs: chunks.append(hs))
    return LayerInputs(torch.cat(chunks), kwargs)


@torch.no_grad()
def capture_layer0_stream(adapter: DecoderAdapter, input_ids: torch.Tensor, batch_size: int = 8,
                          offload: str = "auto", scratch_dir=None) -> tuple[HiddenStream, dict[str, Any]]:
    """Like :func:`capture_layer0_inputs`, into a :class:`HiddenStream` (batches of ``batch_size``)."""
    n, seq = input_ids.shape
    d = adapter.hidden_size
    first = next(adapter.model.parameters())
    stream = HiddenStream(n, seq, d, batch_size, first.dtype, offload, scratch_dir, device=first.device)
    kwargs = _capture(adapter, input_ids, batch_size, stream.write)
    return stream, kwargs


def _batch_kwargs(kwargs: dict[str, Any], n: int) -> dict[str, Any]:
    """Cut batch-shaped keyword arguments (captured on a full batch) down to ``n`` rows."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and k in ("attention_mask", "position_ids", "cache_position") \
                and v.shape[0] > n and k != "cache_position":
            v = v[:n]
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            v = tuple(t[:n] if t.dim() >= 3 and t.shape[0] > n else t for t in v)
        out[k] = v
    return out


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch_size: int = 8) -> torch.Tensor:
    """Apply one decoder layer to ``hidden`` ``[N, L, d]`` in batches; returns ``[N, L, d]``."""
    outs = []
    for i in range(0, hidden.shape[0], batch_size):
        x = hidden[i:i + batch_size]
        y = layer(x, **_batch_kwargs(kwargs, x.shape[0]))
        outs.append(y[0] if isinstance(y, tuple) else y)
    return torch.cat(outs)


@torch.no_grad()
def advance_stream(layer: nn.Module, stream: HiddenStream, kwargs: dict[str, Any]) -> None:
    """Replace every batch of ``stream`` by ``layer``'s output on it (samples are independent)."""
    for b, xb in stream.batches():
        stream.write(b, run_layer(layer, xb, kwargs, stream.batch_size))


@contextmanager
def hooks(modules: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Register forward hooks ``(module, fn(module, inputs, output))`` for the duration of a block."""
    handles = [m.register_forward_hook(fn) for m, fn in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def final_logits_nll(adapter: DecoderAdapter, hidden: torch.Tensor, input_ids: torch.Tensor,
                     batch_size: int = 8, chunk_tokens: int = 2048) -> float:
    """Mean next-token NLL from the last decoder layer's output ``hidden`` ``[N, L, d]``.

    The logits (vocabulary-wide, float) exist for at most ``chunk_tokens`` positions at a time, so
    the peak memory does not grow with the calibration windows' length."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    norm, head = adapter.final_norm(), adapter.lm_head()
    extra = getattr(adapter.model.model.decoder, "project_out", None) if hasattr(adapter.model.model, "decoder") else None
    total, count = 0.0, 0
    for i in range(0, hidden.shape[0], batch_size):
        h = hidden[i:i + batch_size, :-1]  # the last position predicts nothing: no logits for it
        h = norm(h) if norm is not None else h
        if extra is not None:
            h = extra(h)
        h = h.reshape(-1, h.shape[-1])
        targets = input_ids[i:i + batch_size, 1:].reshape(-1).to(h.device)
        for t in range(0, h.shape[0], chunk_tokens):
            logits = head(h[t:t + chunk_tokens]).float()
            total += nn.functional.cross_entropy(logits, targets[t:t + chunk_tokens], reduction="sum").item()
        count += targets.numel()
    return total / count
