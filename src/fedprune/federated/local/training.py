"""Local training on a device: what a device is asked to do (:class:`ClientTask`), what it
returns (:class:`ClientResult`), and the one local LoRA training loop (:func:`train_steps`).

:func:`train_client` is the plain device program (a submodel: layer subset, head and channel
masks). A strategy with its own device program (FedSpine prunes while it tunes) runs the same
:func:`train_steps` loop with a :class:`StepHook`, so the loss, the gradient accumulation, the
clipping and the optimiser step exist once. The simulator and the Flower ClientApp call the
same functions.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import torch

from ..aggregators import compact
from ..cost import payload_bytes, train_flops
from ..lora import SharedBaseModel
from ..partition import collate
from ..submodel import lora_masks, submodel
from .chunked_loss import DEFAULT_CHUNK_TOKENS, causal_lm_loss


@dataclass
class TrainSettings:
    """Local training on each client."""

    local_steps: int = 10
    """optimizer steps per round"""
    batch_size: int = 1
    """examples per micro-batch"""
    grad_accum: int = 4
    """micro-batches per optimizer step"""
    seq_len: int = 256
    """maximum tokens per example (prompt + response)"""
    lr: float = 3e-4
    """AdamW learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay (0 keeps untrained entries unchanged)"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 disables)"""
    keep_optimizer_state: bool = False
    """keep each client's AdamW moments between its rounds (swapped in and out with its LoRA)"""
    chunked_loss: bool = True
    """loss through the LM head in checkpointed chunks of the supervised tokens only, never the
    full tokens x vocabulary logits (``federated.local.chunked_loss``); false: Hugging Face's ``labels=`` loss"""
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    """supervised tokens per LM-head chunk of the chunked loss (peak ~ 3 x chunk x vocab x 4 bytes)"""

    def __post_init__(self):
        for name in ("local_steps", "batch_size", "grad_accum", "loss_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 8:
            raise ValueError(f"train.seq_len must be >= 8, got {self.seq_len}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            name = "weight_decay" if self.weight_decay < 0 else "max_grad_norm"
            raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class ClientTask:
    """The per-client configuration a strategy sends (Flower: ``configure_train``)."""

    cid: int
    round: int
    rank: int
    lora: dict[str, torch.Tensor]
    """the LoRA state to start from, at ``rank`` (every target module)"""
    layers: list[int] | None = None
    """decoder layers to train; the others are skipped in the forward pass (None = all)"""
    head_masks: dict[int, torch.Tensor] | None = None
    """{layer: bool[num_heads]} attention heads kept (None = all)"""
    channel_masks: dict[int, torch.Tensor] | None = None
    """{layer: bool[intermediate]} FFN channels kept (None = all)"""
    local_steps: int | None = None
    """override of train.local_steps for this client"""
    extra: dict[str, Any] = field(default_factory=dict)
    """strategy-specific control data (FedSpine: target pruning ratio, ...)"""
    wire_bytes: int | None = None
    """bytes the server really sends, when not the LoRA state itself (FLoRA: the stacked factors)"""

    def download_bytes(self) -> int:
        return payload_bytes(self.lora) if self.wire_bytes is None else int(self.wire_bytes)


@dataclass
class ClientResult:
    cid: int
    round: int
    rank: int
    lora: dict[str, torch.Tensor]
    """trained LoRA tensors, compact along ``masks`` (keys of skipped layers absent)"""
    masks: dict[str, dict[int, torch.Tensor]]
    """{tensor key: {dim: bool}} rows/columns held, for count-based averaging"""
    num_examples: int
    metrics: dict[str, float]

    def upload_bytes(self) -> int:
        return payload_bytes(self.lora)


class StepHook(Protocol):
    """What a device program adds to the loop of :func:`train_steps`, step by step."""

    def after_backward(self, step: int, tokens: int) -> None:
        """The step's gradients are accumulated (not clipped yet); ``tokens`` it trained on."""

    def after_step(self, step: int) -> None:
        """The optimiser has stepped (FedSpine prunes here)."""


def sample_batches(examples: Sequence[dict], steps: int, micro: int, batch: int, seed: int) -> list[list[dict]]:
    """``steps * micro`` micro-batches of ``batch`` examples, walking seeded epochs of the data."""
    rng = random.Random(seed)
    order: list[int] = []
    out = []
    for _ in range(steps * micro):
        mb = []
        for _ in range(batch):
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            mb.append(examples[order.pop()])
        out.append(mb)
    return out


def training_loss(base: SharedBaseModel, batch: Mapping[str, torch.Tensor], settings: TrainSettings) -> torch.Tensor:
    """The local training loss of one micro-batch: chunked (default) or the model's own ``labels=``
    loss (its output, logits included, dropped before backward, as ``fedpruner.memory`` models it)."""
    if settings.chunked_loss:
        return causal_lm_loss(base.peft, batch, settings.loss_chunk_tokens, adapter=base.adapter)
    return base.peft(**batch).loss


def adamw(params: Sequence[torch.nn.Parameter], settings: TrainSettings,
          state: Mapping | None = None) -> torch.optim.AdamW:
    """The local optimiser, resuming the moments in ``state`` when ``train.keep_optimizer_state``."""
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if state is not None and settings.keep_optimizer_state:
        try:
            opt.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError):
            pass  # rank or layer set changed since the client's last round: start fresh
    return opt


def train_steps(base: SharedBaseModel, params: Sequence[torch.nn.Parameter], opt: torch.optim.Optimizer,
                batches: Sequence[Sequence[dict]], settings: TrainSettings, pad_id: int,
                hook: StepHook | None = None) -> tuple[list[float], int]:
    """The local training loop: ``len(batches) // grad_accum`` optimiser steps, each over
    ``grad_accum`` micro-batches (loss averaged over them), gradients clipped to
    ``max_grad_norm``. The caller puts the model in training mode (and any masks in force).

    Returns the mean loss of every step and the number of tokens trained on.
    """
    ga = settings.grad_accum
    if len(batches) % ga:
        raise ValueError(f"{len(batches)} micro-batches are not a whole number of steps of {ga}")
    losses, tokens = [], 0
    for s in range(len(batches) // ga):
        opt.zero_grad(set_to_none=True)
        step_loss, step_tokens = 0.0, 0
        for mb in batches[s * ga:(s + 1) * ga]:
            batch = collate(mb, pad_id)
            loss = training_loss(base, batch, settings)
            (loss / ga).backward()
            step_loss += float(loss.detach()) / ga
            step_tokens += int(batch["attention_mask"].sum())
        tokens += step_tokens
        if hook is not None:
            hook.after_backward(s, step_tokens)
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        opt.step()
        losses.append(step_loss)
        if hook is not None:
            hook.after_step(s)
    return losses, tokens


def train_client(base: SharedBaseModel, task: ClientTask, examples: Sequence[dict], settings: TrainSettings,
                 seed: int, pad_id: int, optimizer_state: Mapping | None = None) -> tuple[ClientResult, dict | None]:
    """Fine-tune the task's LoRA on ``examples`` (tokenised) and return the update.

    Deterministic for ``seed``: data order, LoRA dropout and everything else draw from it.
    Returns the result and the AdamW state to keep (None unless ``keep_optimizer_state``).
    """
    if not examples:
        raise ValueError(f"client {task.cid} has no training examples")
    t0 = time.perf_counter()
    base.load_lora(task.lora, task.rank)  # may create a PEFT adapter (draws random numbers): seed after it
    torch.manual_seed(seed)
    keys = sorted(base.modules)
    if task.layers is not None:
        keep = set(task.layers)
        keys = [k for k in keys if base.layer_of(k) in keep]
    params = list(base.named_trainable(keys).values())
    opt = adamw(params, settings, optimizer_state)
    steps = task.local_steps or settings.local_steps
    batches = sample_batches(examples, steps, settings.grad_accum, settings.batch_size, seed)
    base.model.train()
    with submodel(base.adapter, task.layers, task.head_masks, task.channel_masks):
        losses, tokens = train_steps(base, params, opt, batches, settings, pad_id)
    base.model.eval()
    full = base.lora_state(keys)
    masks = lora_masks(base.adapter, keys, task.head_masks, task.channel_masks)
    lora = {k: compact(v, masks.get(k)) for k, v in full.items()}

    head_frac = {i: float(m.float().mean()) for i, m in (task.head_masks or {}).items()}
    chan_frac = {i: float(m.float().mean()) for i, m in (task.channel_masks or {}).items()}
    through = base.params_through(task.layers, head_frac, chan_frac)
    trainable = sum(p.numel() for p in params)
    metrics = {
        "train_loss_first": losses[0], "train_loss_last": losses[-1],
        "train_loss_mean": sum(losses) / len(losses), "tokens": tokens, "steps": steps,
        "params_through": through, "trainable_params": trainable,
        "train_flops": train_flops(through, tokens, trainable),
        "wall_s": time.perf_counter() - t0,
    }
    opt_state = detach_state(opt.state_dict()) if settings.keep_optimizer_state else None
    return ClientResult(task.cid, task.round, task.rank, lora, masks, len(examples), metrics), opt_state


def detach_state(state: Any) -> Any:
    """A copy of an optimiser (or any nested) state whose tensors are detached from the graph and
    from the live optimiser, so it can be kept between rounds and checkpointed."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: detach_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [detach_state(v) for v in state]
    return state
