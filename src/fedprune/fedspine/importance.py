"""LoRAPrune-style importance from LoRA gradients only (*reconstruction* for FedSpine).

For a frozen weight ``W`` (out x in) with LoRA ``W' = W + s B A`` (``B``: out x r,
``A``: r x in, scaling ``s = alpha / r``), the LoRA gradients are ``dB = s G* A^T`` and
``dA = s B^T G*`` where ``G* = dL/dW'``. One SGD step of size 1 on (A, B) moves the merged
weight by ``s [(B - dB)(A - dA) - B A]``; its negation is the *estimated weight gradient*

    G = s (dB A + B dA - dB dA)

which needs no full-size gradient. Element importance is the first-order saliency

    I = | G ⊙ (W + s B A) |

and unit importance sums ``I`` over the unit's weights:

- FFN channel ``c``: row ``c`` of gate and up (or fc1) + column ``c`` of down (or fc2);
- query head ``h`` (group ``g = h // group_size``): rows of ``h`` in q + columns of ``h``
  in o + ``1 / group_size`` of the rows of KV head ``g`` in k and v (a KV head is shared by
  its query heads, so its weight is split evenly); the KV-group score is the sum of its
  query heads' scores, i.e. all of q/k/v/o of the group.

Each module's element importance is first divided by its mean (``normalise_module``), so
q/k/v/o (and gate/up/down) have an equal say in a unit's score. A module without LoRA contributes nothing (its gradient is unknown under LoRA-only
training). Scores are smoothed over iterations by ``ImportanceEMA``:
``S <- 0.9 S + 0.1 S_new`` (the first observation initialises ``S``).

Every score is computed and accumulated in float32 (on the weights' device) whatever the
base model's dtype: a bfloat16 or float16 model's saliencies would otherwise be summed over
thousands of elements in 8 or 11 bits of mantissa.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


def lora_weight_grad_estimate(A: torch.Tensor, B: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor,
                              scaling: float = 1.0) -> torch.Tensor:
    """``G = s (dB A + B dA - dB dA)``, shape (out, in), from ``A`` (r, in), ``B`` (out, r) and their grads."""
    return scaling * (dB @ A + B @ dA - dB @ dA)


def lora_element_importance(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, dA: torch.Tensor,
                            dB: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """``|G ⊙ (W + s B A)|``, shape (out, in), computed in float32."""
    f = lambda x: x.detach().float()  # noqa: E731
    A, B, dA, dB = f(A), f(B), f(dA), f(dB)
    G = lora_weight_grad_estimate(A, B, dA, dB, scaling)
    return (G * (f(W) + scaling * (B @ A))).abs()


def head_importance(imp_q: torch.Tensor | None, imp_k: torch.Tensor | None, imp_v: torch.Tensor | None,
                    imp_o: torch.Tensor | None, num_heads: int, num_kv_heads: int,
                    head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head ``[num_heads]`` and per KV group ``[num_kv_heads]`` scores (see module doc).

    ``imp_q`` (nh*hd, hidden), ``imp_k``/``imp_v`` (nkv*hd, hidden), ``imp_o`` (hidden, nh*hd);
    any may be ``None`` (no LoRA there).
    """
    g = num_heads // num_kv_heads
    if g * num_kv_heads != num_heads:
        raise ValueError(f"{num_heads} heads are not divisible into {num_kv_heads} KV groups")
    dev = next((m.device for m in (imp_q, imp_k, imp_v, imp_o) if m is not None), None)
    per_q = torch.zeros(num_heads, dtype=torch.float32, device=dev)
    if imp_q is not None:
        per_q += imp_q.reshape(num_heads, head_dim, -1).sum(dim=(1, 2))
    if imp_o is not None:
        per_q += imp_o.reshape(imp_o.shape[0], num_heads, head_dim).sum(dim=(0, 2))
    kv = torch.zeros(num_kv_heads, dtype=torch.float32, device=dev)
    for m in (imp_k, imp_v):
        if m is not None:
            kv += m.reshape(num_kv_heads, head_dim, -1).sum(dim=(1, 2))
    per_q += (kv / g).repeat_interleave(g)
    return per_q, per_q.reshape(num_kv_heads, g).sum(dim=1)


def ffn_channel_importance(imp_in: list[torch.Tensor | None], imp_out: torch.Tensor | None,
                           width: int) -> torch.Tensor:
    """Per FFN channel ``[width]``: rows of every ``imp_in`` (gate, up) + columns of ``imp_out`` (down)."""
    dev = next((m.device for m in [*imp_in, imp_out] if m is not None), None)
    s = torch.zeros(width, dtype=torch.float32, device=dev)
    for m in imp_in:
        if m is not None:
            s += m.sum(dim=1)
    if imp_out is not None:
        s += imp_out.sum(dim=0)
    return s


@dataclass
class LoraParts:
    """What importance needs from one LoRA-wrapped linear (gradients after ``backward``)."""

    W: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    dA: torch.Tensor
    dB: torch.Tensor
    scaling: float


def peft_lora_parts(module: nn.Module, adapter_name: str = "default") -> LoraParts | None:
    """Read ``W, A, B, dA, dB, s`` from a peft ``lora.Linear``; ``None`` when absent or without grads."""
    lora_A = getattr(module, "lora_A", None)
    if lora_A is None or adapter_name not in lora_A:
        return None
    A = module.lora_A[adapter_name].weight
    B = module.lora_B[adapter_name].weight
    if A.grad is None or B.grad is None:
        return None
    return LoraParts(module.base_layer.weight, A, B, A.grad, B.grad, float(module.scaling[adapter_name]))


def normalise_module(imp: torch.Tensor | None, eps: float = 1e-12) -> torch.Tensor | None:
    """``imp / mean(imp)``: one module's element importance on a scale of its own (mean 1).

    The LoRA-gradient saliency of different projections differs by orders of magnitude (their
    weights, LoRA factors and gradients do), so summing raw scores over q/k/v/o or gate/up/down
    lets one projection decide alone which head or channel goes. Per-module normalisation gives
    each projection an equal say; an all-zero module stays zero."""
    if imp is None:
        return None
    m = float(imp.mean())
    return imp / m if m > eps else torch.zeros_like(imp)


def layer_unit_importance(adapter, layer: nn.Module,
                          parts_fn: Callable[[nn.Module], LoraParts | None] = peft_lora_parts,
                          normalise: bool = True,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(per_q_head, per_kv_group, per_ffn_channel)`` scores of one decoder layer.

    ``adapter`` is a ``fedprune.adapters.DecoderAdapter``; ``parts_fn`` extracts the LoRA
    tensors of a linear (peft by default), so another LoRA implementation plugs in here.
    ``normalise``: each module's element importance is divided by its mean first
    (:func:`normalise_module`).
    """
    def imp(mod: nn.Module) -> torch.Tensor | None:
        p = parts_fn(mod)
        out = None if p is None else lora_element_importance(p.W, p.A, p.B, p.dA, p.dB, p.scaling)
        return normalise_module(out) if normalise else out

    q, k, v = adapter.qkv(layer)
    o = adapter.o_proj(layer)
    hd = adapter.head_dim
    nh = o.in_features // hd
    nkv = k.out_features // hd
    per_q, per_kv = head_importance(imp(q), imp(k), imp(v), imp(o), nh, nkv, hd)
    down = adapter.ffn_out(layer)
    per_c = ffn_channel_importance([imp(m) for m in adapter.ffn_in(layer)], imp(down), down.in_features)
    return per_q, per_kv, per_c


class ImportanceEMA:
    """Exponential moving average of unit scores keyed by name: ``S <- m S + (1 - m) S_new``."""

    def __init__(self, momentum: float = 0.9):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.momentum = momentum
        self.scores: dict[str, torch.Tensor] = {}

    def update(self, key: str, new: torch.Tensor) -> torch.Tensor:
        new = new.detach().float()
        old = self.scores.get(key)
        if old is None or old.shape != new.shape:
            self.scores[key] = new.clone()
        else:
            self.scores[key] = self.momentum * old + (1.0 - self.momentum) * new
        return self.scores[key]

    def get(self, key: str) -> torch.Tensor | None:
        return self.scores.get(key)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.scores.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.scores = {k: v.clone() for k, v in state.items()}


def update_model_importance(model: nn.Module, ema: ImportanceEMA,
                            parts_fn: Callable[[nn.Module], LoraParts | None] = peft_lora_parts,
                            ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """After ``loss.backward()``: fold every layer's scores into ``ema``.

    Keys are ``"{layer}.heads"`` (per query head) and ``"{layer}.ffn"``; returns
    ``{layer: (smoothed head scores, smoothed channel scores)}``.
    """
    from ..adapters import get_adapter

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft PeftModel
    ad = get_adapter(base)
    out = {}
    for i, layer in enumerate(ad.layers):
        per_q, _, per_c = layer_unit_importance(ad, layer, parts_fn)
        out[i] = (ema.update(f"{i}.heads", per_q), ema.update(f"{i}.ffn", per_c))
    return out
