"""Local training on a device: the task a strategy sends, the result it gets back, and the one
local LoRA training loop (``train_steps``) that every device program runs.

- :mod:`.training`      ``ClientTask`` / ``ClientResult``, ``TrainSettings``, ``train_steps`` (with a
                        ``StepHook`` for programs that act between steps, as FedSpine's pruning),
                        ``train_client`` (the plain program: a submodel's LoRA), ``detach_state``
- :mod:`.chunked_loss`  the causal-LM loss through the LM head in checkpointed chunks
"""
from __future__ import annotations

from .chunked_loss import DEFAULT_CHUNK_TOKENS, causal_lm_loss, chunked_causal_lm_loss
from .training import (ClientResult, ClientTask, StepHook, TrainSettings, adamw, detach_state, sample_batches,
                       train_client, train_steps, training_loss)

__all__ = ["DEFAULT_CHUNK_TOKENS", "causal_lm_loss", "chunked_causal_lm_loss", "ClientResult", "ClientTask",
           "StepHook", "TrainSettings", "adamw", "detach_state", "sample_batches", "train_client", "train_steps",
           "training_loss"]
