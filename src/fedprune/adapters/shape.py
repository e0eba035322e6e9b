"""The sizes of a decoder-only model, as its adapter reads them from a config.

A memory model or a parameter budget needs numbers (hidden size, FFN width, heads, which
projections carry a bias, what sits outside the decoder layers), not modules. Each adapter
fills in a :class:`ModelShape` from a config of its family (``DecoderAdapter.model_shape``),
so the formulas built on it hold for OPT (ungated ReLU FFN, biases everywhere, LayerNorms,
learned positions) as well as for LLaMA. ``num_parameters()`` must equal the real model's
count; the adapter contract tests check it for every family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only model the memory model and budgets need.

    The defaults describe the LLaMA layout: gated FFN (gate/up/down), no biases, RMSNorms
    (one weight per element), nothing outside the layers but embeddings, LM head and final norm.
    """

    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    vocab: int
    num_layers: int
    tied_embeddings: bool = True
    head_dim: int | None = None
    gated_ffn: bool = True
    """gate/up/down projections (SwiGLU); False: fc1/fc2"""
    biased: tuple[str, ...] = ()
    """projections (keys of :meth:`linear_shapes`) that carry a bias"""
    norm_params: int = 1
    """parameters per hidden element of one norm: 1 for RMSNorm, 2 for LayerNorm (weight and bias)"""
    extra_params: int = 0
    """parameters outside the layers that the LLaMA layout lacks (learned positions, embedding projections)"""

    def __post_init__(self):
        for name in ("hidden", "intermediate", "num_heads", "num_kv_heads", "vocab", "num_layers"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelShape.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        unknown = set(self.biased) - set(self.linear_shapes())
        if unknown:
            raise ValueError(f"ModelShape.biased names unknown projections {sorted(unknown)}; "
                             f"known: {sorted(self.linear_shapes())}")

    @property
    def d(self) -> int:
        return int(self.head_dim or self.hidden // self.num_heads)

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """From a Hugging Face config of any supported family (read by that family's adapter)."""
        from . import ADAPTERS

        model_type = getattr(config, "model_type", None)
        if model_type not in ADAPTERS:
            raise ValueError(f"unsupported architecture {model_type!r}; supported: {', '.join(ADAPTERS.names())}")
        return ADAPTERS.get(model_type).model_shape(config)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``{projection: (in_features, out_features)}`` of one layer (the adapter's ``linear_modules`` names)."""
        H, I, q, kv = self.hidden, self.intermediate, self.num_heads * self.d, self.num_kv_heads * self.d
        attn = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H)}
        if self.gated_ffn:
            return {**attn, "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
        return {**attn, "fc1": (H, I), "fc2": (I, H)}

    def layer_parameters(self) -> int:
        """Parameters of one decoder layer: projections, their biases, two norms."""
        lin = self.linear_shapes()
        return (sum(i * o for i, o in lin.values()) + sum(lin[name][1] for name in self.biased)
                + 2 * self.norm_params * self.hidden)

    def outer_parameters(self) -> int:
        """Parameters outside the layers: embeddings, LM head (unless tied), final norm, extras."""
        return (self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.norm_params * self.hidden
                + self.extra_params)

    def num_parameters(self) -> int:
        """All parameters, tied embeddings counted once."""
        return self.outer_parameters() + self.num_layers * self.layer_parameters()
