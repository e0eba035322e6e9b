"""Cost model: training FLOPs of a (sub)model, bytes of a payload, and the scale of a modelled
deployment. Pure functions.

**The modelled deployment's scale** (``federation.reference_params``). A simulation trains a small
model (SmolLM2-135M on a CPU) but may model the cost of a deployment of another size: FedSpine's
testbed fine-tunes billion-parameter models on Jetsons, where a round's *compute* dominates, while
at 135M a rank-8 LoRA over a 5-100 Mbit/s link costs 10-30x the compute and pruning buys almost no
time. With ``reference_params = N > 0`` every round's cost is rescaled, while the learning
dynamics stay those of the model actually trained:

- FLOPs x ``N / own_params`` (the trained model's total parameter count): pruning's relative
  saving is kept, since the FLOPs a device reports already count only what its masks keep;
- bytes x ``lora_params_per_rank(reference shape) / lora_params_per_rank(trained model)``, the
  ratio of LoRA parameter counts for the same target modules at the same rank; the reference
  shape is the entry of :data:`KNOWN_SHAPES` nearest to ``N`` (in log parameters).

``reference_params = 0`` (the default) is the trained model's own size: both factors are exactly 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch


def train_flops(params_through: int, tokens: int, trainable_params: int = 0) -> float:
    """FLOPs of one forward + backward pass over ``tokens`` tokens.

    ``6 * (params_through + trainable_params) * tokens``: the usual estimate of 2 FLOPs per
    parameter per token forward and 4 backward. ``params_through`` counts the frozen matmul
    weights the tokens actually flow through (skipped layers and pruned heads/channels
    excluded, embedding lookup excluded, LM head included); ``trainable_params`` the LoRA
    weights. With a frozen base the weight-gradient half of the backward of the base is
    not needed, so this is a conservative (upper) estimate, ~1.5x the strict minimum.
    """
    if params_through < 0 or tokens < 0 or trainable_params < 0:
        raise ValueError("train_flops: counts must be non-negative")
    return 6.0 * float(params_through + trainable_params) * float(tokens)


def payload_bytes(state: Mapping[str, torch.Tensor] | None) -> int:
    """Bytes of a dict of tensors on the wire (raw element bytes; keys and framing ignored)."""
    if not state:
        return 0
    return int(sum(t.numel() * t.element_size() for t in state.values()))


# ---- the modelled deployment's shape ---------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceShape:
    """A decoder's shape: what LoRA sizes and parameter counts follow from (LLaMA-style blocks:
    q/k/v/o attention with ``kv_heads`` KV heads, gated FFN gate/up/down, two RMSNorms a layer)."""

    name: str
    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    """input embedding and LM head share one matrix"""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """``{role: (d_out, d_in)}`` of one decoder layer's linear modules."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (self.ffn, h), "up_proj": (self.ffn, h), "down_proj": (h, self.ffn)}

    @property
    def params(self) -> int:
        """Total parameters (embeddings, LM head unless tied, layers, norms)."""
        per_layer = sum(o * i for o, i in self.module_dims().values()) + 2 * self.hidden
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied else 2) + self.layers * per_layer + self.hidden


# Shapes from the models' published config.json files (hidden_size, num_hidden_layers,
# intermediate_size, num_attention_heads, num_key_value_heads, vocab_size, tie_word_embeddings).
KNOWN_SHAPES: dict[str, ReferenceShape] = {s.name: s for s in (
    ReferenceShape("smollm2-135m", 576, 30, 1536, 9, 3, 49152, tied=True),        # 134.5 M
    ReferenceShape("smollm2-360m", 960, 32, 2560, 15, 5, 49152, tied=True),       # 361.8 M
    ReferenceShape("llama-3.2-1b", 2048, 16, 8192, 32, 8, 128256, tied=True),     # 1.24 B
    ReferenceShape("smollm2-1.7b", 2048, 24, 8192, 32, 32, 49152, tied=True),     # 1.71 B
    ReferenceShape("llama-3.2-3b", 3072, 28, 8192, 24, 8, 128256, tied=True),     # 3.21 B
    ReferenceShape("open-llama-3b", 3200, 26, 8640, 32, 32, 32000),               # 3.43 B
    ReferenceShape("llama-2-7b", 4096, 32, 11008, 32, 32, 32000),                 # 6.74 B
    ReferenceShape("llama-2-13b", 5120, 40, 13824, 40, 40, 32000),                # 13.0 B
)}


def nearest_shape(params: float) -> ReferenceShape:
    """The known shape whose parameter count is nearest to ``params`` in log scale."""
    if not params > 0:
        raise ValueError(f"reference parameter count must be > 0, got {params}")
    return min(KNOWN_SHAPES.values(), key=lambda s: abs(math.log(s.params / params)))


def lora_params_per_rank(dims: Iterable[tuple[int, int]]) -> int:
    """LoRA parameters per unit of rank over modules of ``(d_out, d_in)``: ``sum(d_in + d_out)``."""
    return int(sum(o + i for o, i in dims))


_ROLE_ALIASES = {"fc1": "up_proj", "fc2": "down_proj", "out_proj": "o_proj"}  # OPT's names


def shape_lora_params_per_rank(shape: ReferenceShape, roles: Iterable[str]) -> int:
    """``lora_params_per_rank`` of every layer's modules named in ``roles`` (q_proj, ..., down_proj)."""
    dims = shape.module_dims()
    dims.update({alias: dims[role] for alias, role in _ROLE_ALIASES.items()})
    roles = list(roles)
    unknown = [r for r in roles if r not in dims]
    if unknown:
        raise ValueError(f"LoRA target module(s) {unknown} have no counterpart in the reference shape "
                         f"{shape.name!r}; known: {', '.join(dims)}")
    return shape.layers * lora_params_per_rank(dims[r] for r in roles)


@dataclass(frozen=True)
class CostScale:
    """Factors from the trained model's cost to the modelled deployment's (module doc)."""

    flops: float = 1.0
    bytes: float = 1.0
    reference_params: float = 0.0
    """0: the trained model's own size"""
    shape: str = "own"
    """name of the reference shape the byte factor comes from"""

    def to_dict(self) -> dict:
        return {"reference_params": self.reference_params, "reference_shape": self.shape,
                "flops_scale": self.flops, "bytes_scale": self.bytes}


def cost_scale(reference_params: float, own_params: int, own_lora_dims: Iterable[tuple[int, int]],
               roles: Iterable[str]) -> CostScale:
    """The :class:`CostScale` of a deployment of ``reference_params`` parameters.

    ``own_params``: the trained model's total parameters; ``own_lora_dims``: ``(d_out, d_in)`` of
    every module it puts LoRA on; ``roles``: those modules' names within a layer (``q_proj``...).
    """
    if reference_params < 0:
        raise ValueError(f"federation.reference_params must be >= 0 (0 = the trained model's size), "
                         f"got {reference_params}")
    if reference_params == 0:
        return CostScale()
    if own_params <= 0:
        raise ValueError(f"own parameter count must be > 0, got {own_params}")
    shape = nearest_shape(reference_params)
    own_lora = lora_params_per_rank(own_lora_dims)
    if own_lora <= 0:
        raise ValueError("the trained model has no LoRA modules to scale the payload from")
    ref_lora = shape_lora_params_per_rank(shape, sorted(set(roles)))
    return CostScale(float(reference_params) / own_params, ref_lora / own_lora, float(reference_params), shape.name)
