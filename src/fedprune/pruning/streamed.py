"""The steps a layer-by-layer pruner takes so that it also runs on a streamed model (``weight_offload``).

A model loaded with ``weight_offload="cpu"|"disk"`` (:mod:`fedprune.models.streaming`) has its decoder
layers on the meta device; a pruner materialises one at a time. For a model loaded whole every step
here is a no-op (or calls ``compute`` directly), so a method written with them behaves exactly as
before. The pieces:

- :func:`layer_weights` (``with``): a layer materialised for a read-only use (a calibration pass, scores).
- :func:`load_layer` .. :func:`finish_layer`: a layer materialised, pruned, then final: written to the
  output checkpoint, with its report entry (resumable, :mod:`fedprune.models.stream_checkpoint`).
- :func:`resumed_layer`: in a resumed run, the report entry of a layer finished before the interruption
  (its plan and shapes restored), so the method skips it; None otherwise.
- :func:`original_weights` (``with``): the original weights of a layer that may be pruned already.
- :func:`saved_state`: a pre-loop result (Block Influence, activation moments) saved with the
  checkpoint, loaded instead of recomputed by a resumed run.

Which methods stream, and how many passes over the weights each makes:

=========  ===========================================================================================
comp       two passes: (1) Block Influence of every layer on the dense model (needed before any layer
           is pruned: it picks the layers to remove and, ``allocation_strength > 0``, each kept layer's
           share of the budget); (2) layer by layer, the dense and pruned calibration streams advance
           together, each kept layer is pruned and mask-tuned on them and written, each removed layer
           only advances the dense stream. ``layer_metric="sleb"`` and ``layer_fraction="auto"`` need
           the whole model (full-model calibration loss, model copies) and are refused.
wanda_sp   two: activation moments (dense pass), then per layer: scores, surgery, written.
flap       three: moments; scores of every layer (the global, adaptive structure needs them all);
           per layer: bias compensation, surgery, written.
shortgpt   two: Block Influence; the kept layers copied to the output.
magnitude  one (two with ``width_multiple > 1``: all scores first): per layer scores, surgery, written.
=========  ===========================================================================================

LLM-Pruner (gradients of the calibration loss through the whole model) and SLEB (full-model
calibration loss for every candidate removal) declare ``whole_model`` in the registry and are refused.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..adapters import DecoderAdapter, LayerPlan
from ..models.streaming import LayerStore, check_weight_offload, weight_store


def store_of(adapter: DecoderAdapter) -> LayerStore | None:
    return weight_store(adapter.model)


def position(adapter: DecoderAdapter, layer: nn.Module) -> int:
    for i, m in enumerate(adapter.layers):
        if m is layer:
            return i
    raise ValueError("the layer is not in the model (removed?)")


@contextlib.contextmanager
def layer_weights(adapter: DecoderAdapter, layer: nn.Module) -> Iterator[nn.Module]:
    """``layer`` with its weights for the block (materialised and released when streamed)."""
    store = store_of(adapter)
    if store is None:
        yield layer
        return
    store.load(layer)
    try:
        yield layer
    finally:
        store.release(layer)


@contextlib.contextmanager
def original_weights(adapter: DecoderAdapter, layer: nn.Module) -> Iterator[nn.Module]:
    """A module with ``layer``'s original weights: a separate copy when streamed; without streaming,
    ``layer`` itself (which must not have been pruned yet)."""
    store = store_of(adapter)
    if store is None:
        yield layer
        return
    twin = store.twin(layer)
    try:
        yield twin
    finally:
        del twin


def load_layer(adapter: DecoderAdapter, layer: nn.Module) -> nn.Module:
    """Materialise ``layer`` until :func:`finish_layer` (no-op without streaming)."""
    store = store_of(adapter)
    if store is not None:
        store.load(layer)
    return layer


def finish_layer(adapter: DecoderAdapter, layer: nn.Module, entry: dict[str, Any] | None = None) -> None:
    """``layer`` is final: written (with ``entry``, its report entry, and its plan) and released."""
    store = store_of(adapter)
    if store is not None:
        pos = position(adapter, layer)
        store.finish(layer, pos, entry, adapter.plan.layers[pos].to_dict())


def resumed_layer(adapter: DecoderAdapter, layer: nn.Module) -> dict[str, Any] | None:
    """The saved report entry of a layer an interrupted run had finished (its plan and shapes restored), else None."""
    store = store_of(adapter)
    rec = store.resumed(layer) if store is not None else None
    if rec is None:
        return None
    pos = position(adapter, layer)
    if rec["position"] != pos:
        raise RuntimeError(f"the interrupted run wrote this layer at position {rec['position']}, this run has it at "
                           f"{pos}: the two runs differ (delete the partial output to start afresh)")
    adapter.plan.layers[pos] = LayerPlan.from_dict(rec["plan"])
    return rec["entry"]


def per_layer(adapter: DecoderAdapter, fn: Callable[[int, nn.Module], Any]) -> list[Any]:
    """``[fn(i, layer) for every decoder layer]``, each with its (original) weights materialised: a pass
    before any layer is pruned (in a resumed run it must have been saved, :func:`saved_state`)."""
    store = store_of(adapter)
    out = []
    for i, layer in enumerate(list(adapter.layers)):
        if store is not None and store.is_finished(layer):
            raise RuntimeError(f"a pass over the original weights reached layer {i}, which is pruned already "
                               "(a resumed run must load such a pass's result with saved_state)")
        with layer_weights(adapter, layer):
            out.append(fn(i, layer))
    return out


def digest(t: torch.Tensor) -> str:
    """A short digest of a tensor's values (names a saved state computed from it)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def saved_state(adapter: DecoderAdapter, name: str, compute: Callable[[], Any]) -> Any:
    """``compute()``; with a streamed checkpoint, saved under ``name`` (tensors, lists, dicts, numbers)
    and loaded by a resumed run instead of recomputed."""
    store = store_of(adapter)
    if store is None or store.checkpoint is None:
        return compute()
    return store.checkpoint.saved_state(name, compute)


def check_streamable(method: str, spec, opts, weight_offload: str) -> None:
    """Refuse, naming the method and why, a method (or option) that needs the whole model at once."""
    weight_offload = check_weight_offload(weight_offload)
    if weight_offload == "none":
        return
    reason = spec.whole_model or (opts.whole_model() if hasattr(opts, "whole_model") else None)
    if reason:
        raise ValueError(f"method {method!r} cannot stream its weights (weight offload {weight_offload!r}): it "
                         f"{reason}; use weight offload 'none' (the whole model in memory)")


def run_arguments(model, method: str, ratio: float, opts, calibration: str, calib_ids: torch.Tensor, seed: int,
                  weight_offload: str) -> dict[str, Any]:
    """Everything a streamed prune's result depends on: a resumed run must match it."""
    import dataclasses

    store = weight_store(model)
    options = dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else dict(vars(opts))
    return {"model": str(store.files.directory.resolve()), "weights": store.files.fingerprint(),
            "dtype": str(store.dtype).removeprefix("torch."), "device": str(store.device),
            "weight_offload": weight_offload, "method": method, "ratio": ratio,
            "options": {k: (v if isinstance(v, (bool, int, float, str, type(None), list, tuple)) else str(v))
                        for k, v in options.items()},
            "calibration": calibration, "nsamples": int(calib_ids.shape[0]), "seq_len": int(calib_ids.shape[1]),
            "seed": seed, "calibration_ids": digest(calib_ids)}


def begin(model, output, arguments: dict[str, Any]) -> None:
    """Attach the resumable partial output of ``output`` (None: no checkpoint, pruned layers kept in memory)."""
    from ..models.stream_checkpoint import StreamCheckpoint

    store = weight_store(model)
    store.checkpoint = StreamCheckpoint(output, arguments) if output is not None else None


def end(model, output, tokenizer=None, extra: dict | None = None, overwrite: bool = False) -> None:
    """Write every layer no method finished (e.g. kept by ShortGPT unchanged), then complete and swap in
    the checkpoint; without an output, load the pruned layers into the model for good."""
    from ..adapters import get_adapter

    store = weight_store(model)
    adapter = get_adapter(model)
    for layer in list(adapter.layers):
        if not store.is_finished(layer):
            store.load(layer)
            finish_layer(adapter, layer)
    if output is None:
        store.materialise_finished(list(adapter.layers))
        return
    store.checkpoint.finalize(model, store.prefix, tokenizer=tokenizer, extra=extra, overwrite=overwrite)


__all__ = ["layer_weights", "original_weights", "load_layer", "finish_layer", "resumed_layer", "per_layer",
           "saved_state", "check_streamable", "run_arguments", "begin", "end", "store_of"]
