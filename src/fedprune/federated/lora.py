"""One frozen base model shared by every simulated client, with swappable PEFT LoRA states.

PEFT holds one adapter per distinct rank (``r4``, ``r8``, ...), created on first use; a
client's LoRA tensors are copied into the adapter of its rank before it trains and copied out
afterwards, so 80 clients cost 80 small dicts, not 80 models.

LoRA tensors travel under architecture-neutral keys ``layers.{i}.{path}.lora_A`` (r x d_in)
and ``.lora_B`` (d_out x r), where ``layers.{i}.{path}`` names the target linear inside
decoder layer ``i`` (e.g. ``layers.3.self_attn.q_proj``).

The base weights can carry a merged *base delta* (FLoRA merges every round): the runtime
keeps the original target weights and sets ``W = W0 + delta`` (never accumulates in place,
so a resumed run reproduces the same floats).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..adapters import get_adapter
from .aggregators import A_SUFFIX, B_SUFFIX


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (rank may differ per client; alpha, dropout and targets may not)."""

    rank: int = 8
    """default rank (strategies may assign others per client)"""
    alpha: float = 16.0
    """LoRA alpha; scaling = alpha / rank"""
    dropout: float = 0.05
    """dropout on the LoRA input"""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """names of the linear modules that get a LoRA pair"""

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty; e.g. [q_proj, v_proj]")


def init_lora_state(shapes: Mapping[str, tuple[int, int]], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """PEFT's default init, seeded: ``A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))`` (kaiming-uniform, a=sqrt 5), ``B = 0``."""
    out = {}
    for i, (m, (d_out, d_in)) in enumerate(sorted(shapes.items())):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        bound = 1.0 / math.sqrt(d_in)
        out[m + A_SUFFIX] = (torch.rand(rank, d_in, generator=g) * 2 - 1) * bound
        out[m + B_SUFFIX] = torch.zeros(d_out, rank)
    return out


class SharedBaseModel:
    """A frozen causal LM with PEFT LoRA adapters whose tensors are swapped per client."""

    def __init__(self, model: nn.Module, settings: LoraSettings):
        from peft import LoraConfig, get_peft_model

        self.settings = settings
        self.adapter = get_adapter(model)
        for p in model.parameters():
            p.requires_grad_(False)
        self._config = lambda r: LoraConfig(r=r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                            target_modules=list(settings.target_modules), bias="none")
        self.peft = get_peft_model(model, self._config(settings.rank), adapter_name=f"r{settings.rank}")
        self.model = model  # modules were replaced in place; the adapter still finds the layers
        self.ranks = {settings.rank}
        # canonical key -> PEFT LoRA layer
        self.modules: dict[str, nn.Module] = {}
        for i, layer in enumerate(self.adapter.layers):
            for name, mod in layer.named_modules():
                if hasattr(mod, "lora_A") and hasattr(mod, "base_layer"):
                    self.modules[f"layers.{i}.{name}"] = mod
        if not self.modules:
            raise ValueError(f"no module matched lora.target_modules={settings.target_modules}")
        self.base_original = {k: m.base_layer.weight.detach().clone() for k, m in self.modules.items()}
        self.base_delta_applied = False
        self.use_rank(settings.rank)

    # ---- shapes and names ----------------------------------------------------------------
    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {k: tuple(m.base_layer.weight.shape) for k, m in self.modules.items()}

    @staticmethod
    def layer_of(key: str) -> int:
        return int(key.split(".")[1])

    def scaling(self, rank: int) -> float:
        return self.settings.alpha / rank

    # ---- adapters per rank ---------------------------------------------------------------
    def use_rank(self, rank: int) -> None:
        name = f"r{rank}"
        if rank not in self.ranks:
            self.peft.add_adapter(name, self._config(rank))
            self.ranks.add(rank)
        self.peft.set_adapter(name)
        for k, m in self.modules.items():
            for r in self.ranks:
                req = r == rank
                m.lora_A[f"r{r}"].weight.requires_grad_(req)
                m.lora_B[f"r{r}"].weight.requires_grad_(req)
        for p in self.model.parameters():
            if p.requires_grad and not any(p is t for t in self.trainable(rank)):
                p.requires_grad_(False)
        self.rank = rank

    def trainable(self, rank: int | None = None) -> list[nn.Parameter]:
        r = f"r{rank or self.rank}"
        out = []
        for k in sorted(self.modules):
            m = self.modules[k]
            out += [m.lora_A[r].weight, m.lora_B[r].weight]
        return out

    def named_trainable(self, keys: Sequence[str] | None = None) -> dict[str, nn.Parameter]:
        r = f"r{self.rank}"
        out = {}
        for k in sorted(keys or self.modules):
            m = self.modules[k]
            out[k + A_SUFFIX] = m.lora_A[r].weight
            out[k + B_SUFFIX] = m.lora_B[r].weight
        return out

    # ---- LoRA state in and out ----------------------------------------------------------
    def load_lora(self, state: Mapping[str, torch.Tensor], rank: int) -> None:
        """Activate the rank-``rank`` adapter and copy ``state`` into it (every key required)."""
        self.use_rank(rank)
        params = self.named_trainable()
        missing = sorted(set(params) - set(state))
        extra = sorted(set(state) - set(params))
        if missing or extra:
            raise ValueError(f"LoRA state does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for k, p in params.items():
                if tuple(state[k].shape) != tuple(p.shape):
                    raise ValueError(f"{k}: shape {tuple(state[k].shape)} != expected {tuple(p.shape)}")
                p.copy_(state[k])

    def lora_state(self, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.named_trainable(keys).items()}

    # ---- base delta (FLoRA merges, server evaluation) ------------------------------------
    def set_base_delta(self, delta: Mapping[str, torch.Tensor] | None) -> None:
        """Set ``W = W0 + delta[m]`` for each target module (``W0`` where ``delta`` has no entry)."""
        with torch.no_grad():
            for k, m in self.modules.items():
                w0 = self.base_original[k]
                d = (delta or {}).get(k)
                m.base_layer.weight.copy_(w0 if d is None else w0 + d.to(w0.dtype))
        self.base_delta_applied = bool(delta)

    @contextlib.contextmanager
    def lora_disabled(self) -> Iterator[None]:
        with self.peft.disable_adapter():
            yield

    # ---- cost bookkeeping ---------------------------------------------------------------
    def params_through(self, layers: Sequence[int] | None = None, head_frac: Mapping[int, float] | None = None,
                       channel_frac: Mapping[int, float] | None = None) -> int:
        """Frozen matmul weights a token flows through (kept layers, kept heads/channels, LM head)."""
        ad = self.adapter
        keep = range(ad.num_layers) if layers is None else layers
        total = 0
        for i in keep:
            layer = ad.layers[i]
            hf = (head_frac or {}).get(i, 1.0)
            cf = (channel_frac or {}).get(i, 1.0)
            lin = ad.linear_modules(layer)
            for role, mod in lin.items():
                n = getattr(mod, "base_layer", mod).weight.numel()
                frac = cf if role in ("gate_proj", "up_proj", "down_proj", "fc1", "fc2") else hf
                total += int(n * frac)
        head = ad.lm_head()
        total += getattr(head, "base_layer", head).weight.numel()
        return total
