"""The adapter contract: where things are in a decoder-only model, and how to shrink it.

Algorithms never touch ``model.model.layers`` directly; they ask the adapter. Surgery
methods physically remove units and keep the model a valid ``PreTrainedModel``: weights
are sliced, per-module attributes (head counts) updated, ``config`` updated for whole
layers, and a *plan* records what was kept so a pruned checkpoint can be rebuilt.

Units:
- layer: a whole decoder block.
- query head ``h`` belongs to KV group ``h // group_size`` (grouped-query attention).
  Any kept set must keep the same number of query heads in every kept KV group, so that
  ``repeat_kv`` stays valid; a KV group with no kept query head is removed with its k/v.
- FFN channel: one intermediate neuron (gate/up row + down column, or fc1 row + fc2 column).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .shape import ModelShape

#: output projections that may be given a bias by surgery (``DecoderAdapter.add_output_bias``)
BIAS_SITES = ("o_proj", "ffn_out")
#: config fields holding one entry per decoder layer, cut down with the layers
PER_LAYER_CONFIG_LISTS = ("layer_types",)


@dataclass
class LayerPlan:
    """What one kept decoder layer holds, in indices of the original model."""

    orig_index: int
    q_heads: list[int]
    kv_heads: list[int]
    ffn_channels: list[int]
    added_biases: list[str] = field(default_factory=list)
    """output projections (``o_proj``, ``ffn_out``) given a bias the architecture lacks (FLAP's
    bias compensation): a reload must declare them before the weights load"""

    def to_dict(self) -> dict[str, Any]:
        d = {
            "orig_index": self.orig_index,
            "num_heads": len(self.q_heads),
            "num_kv_heads": len(self.kv_heads),
            "intermediate_size": len(self.ffn_channels),
            "q_heads": self.q_heads,
            "kv_heads": self.kv_heads,
            "ffn_channels": self.ffn_channels,
        }
        if self.added_biases:
            d["added_biases"] = list(self.added_biases)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerPlan":
        biases = list(d.get("added_biases", []))
        bad = sorted(set(biases) - set(BIAS_SITES))
        if bad:
            raise ValueError(f"layer {d.get('orig_index')}: unknown added_biases {bad}; known: {list(BIAS_SITES)}")
        return cls(int(d["orig_index"]), list(d["q_heads"]), list(d["kv_heads"]), list(d["ffn_channels"]), biases)


@dataclass
class PrunePlan:
    """The record saved next to a pruned model (``plan.json``)."""

    orig_num_layers: int
    orig_num_heads: int
    orig_num_kv_heads: int
    orig_intermediate_size: int
    layers: list[LayerPlan] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "fedprune-plan/1",
            "orig_num_layers": self.orig_num_layers,
            "orig_num_heads": self.orig_num_heads,
            "orig_num_kv_heads": self.orig_num_kv_heads,
            "orig_intermediate_size": self.orig_intermediate_size,
            "kept_layers": [lp.orig_index for lp in self.layers],
            "layers": [lp.to_dict() for lp in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrunePlan":
        if d.get("format") != "fedprune-plan/1":
            raise ValueError(f"unsupported plan format {d.get('format')!r} (expected 'fedprune-plan/1')")
        return cls(
            int(d["orig_num_layers"]), int(d["orig_num_heads"]), int(d["orig_num_kv_heads"]),
            int(d["orig_intermediate_size"]), [LayerPlan.from_dict(x) for x in d["layers"]],
        )

    def is_uniform(self) -> bool:
        return all(
            len(lp.q_heads) == self.orig_num_heads
            and len(lp.kv_heads) == self.orig_num_kv_heads
            and len(lp.ffn_channels) == self.orig_intermediate_size
            for lp in self.layers
        )


def _slice_linear(lin: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    """Keep rows (dim=0, output features) or columns (dim=1, input features) ``idx`` in place."""
    idx = idx.to(lin.weight.device)
    w = lin.weight.data.index_select(dim, idx).contiguous()
    lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if dim == 0:
        lin.out_features = w.shape[0]
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data.index_select(0, idx).contiguous(), requires_grad=lin.bias.requires_grad)
    else:
        lin.in_features = w.shape[1]


def head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Row indices of a projection that belong to ``heads`` (each head owns ``head_dim`` rows)."""
    if len(heads) == 0:
        return torch.zeros(0, dtype=torch.long)
    h = torch.as_tensor(list(heads), dtype=torch.long)
    return (h[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


class DecoderAdapter:
    """Base class for one architecture family. Subclasses fill in the attribute names."""

    #: Hugging Face ``model_type`` values this adapter handles.
    model_types: tuple[str, ...] = ()
    #: the FFN is gated (gate/up/down) rather than fc1/fc2.
    gated_ffn: bool = True

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        if not hasattr(model, "_fedprune_plan"):
            model._fedprune_plan = self._initial_plan()

    # ---- where things are -------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def head_dim(self) -> int:
        raise NotImplementedError

    def embed_tokens(self) -> nn.Module:
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def decoder(self) -> nn.Module:
        """The decoder body: ``forward(input_ids, attention_mask, use_cache)`` returns the
        ``last_hidden_state`` that :meth:`lm_head` reads directly (final norm applied)."""
        return self.model.get_decoder()

    def attention(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def mlp(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def qkv(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        a = self.attention(layer)
        return a.q_proj, a.k_proj, a.v_proj

    def o_proj(self, layer: nn.Module) -> nn.Linear:
        raise NotImplementedError

    def ffn_in(self, layer: nn.Module) -> list[nn.Linear]:
        """Projections whose *rows* are FFN channels (gate+up, or fc1)."""
        raise NotImplementedError

    def ffn_out(self, layer: nn.Module) -> nn.Linear:
        """Projection whose *columns* are FFN channels (down, or fc2)."""
        raise NotImplementedError

    def ffn_act_input(self, layer: nn.Module) -> nn.Module:
        """Module whose *input* is the per-channel activation (the input of ``ffn_out``)."""
        return self.ffn_out(layer)

    def input_norm(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def post_attention_norm(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def num_heads(self, layer: nn.Module) -> int:
        return self.o_proj(layer).in_features // self.head_dim

    def num_kv_heads(self, layer: nn.Module) -> int:
        return self.qkv(layer)[1].out_features // self.head_dim

    def group_size(self, layer: nn.Module) -> int:
        return self.num_heads(layer) // max(self.num_kv_heads(layer), 1)

    def intermediate_size(self, layer: nn.Module) -> int:
        return self.ffn_out(layer).in_features

    def linear_modules(self, layer: nn.Module) -> dict[str, nn.Linear]:
        q, k, v = self.qkv(layer)
        out = {"q_proj": q, "k_proj": k, "v_proj": v, "o_proj": self.o_proj(layer)}
        names = ["gate_proj", "up_proj"] if self.gated_ffn else ["fc1"]
        out.update(dict(zip(names, self.ffn_in(layer))))
        out["down_proj" if self.gated_ffn else "fc2"] = self.ffn_out(layer)
        return out

    # ---- the family's sizes and configs -----------------------------------------
    @classmethod
    def model_shape(cls, config: Any) -> ModelShape:
        """The sizes the memory model and budgets need, read from a config of this family."""
        raise NotImplementedError

    @classmethod
    def tiny_config(cls, model_type: str, **overrides: Any) -> Any:
        """A tiny random-init config of this family (tests, docs): 4 layers, hidden 64, vocab 128."""
        from transformers import AutoConfig

        kw = dict(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=256, **cls._tiny_config_fields(model_type))
        kw.update(overrides)
        return AutoConfig.for_model(model_type, **kw)

    @classmethod
    def _tiny_config_fields(cls, model_type: str) -> dict[str, Any]:
        raise NotImplementedError

    def write_uniform_sizes(self, config: Any, num_heads: int, num_kv_heads: int, width: int) -> bool:
        """Write sizes shared by every kept layer into ``config`` (a copy saved with the weights).

        Returns False when the family's config cannot express them (the checkpoint then needs
        its plan to be rebuilt). LLaMA family: head count (with an explicit ``head_dim``), KV
        heads and FFN width are all config fields.
        """
        if num_heads != config.num_attention_heads:
            config.head_dim = self.head_dim
            config.num_attention_heads = num_heads
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = num_kv_heads
        config.intermediate_size = width
        return True

    # ---- the plan ----------------------------------------------------------------
    def _initial_plan(self) -> PrunePlan:
        c = self.config
        n_heads = int(c.num_attention_heads)
        n_kv = int(getattr(c, "num_key_value_heads", None) or n_heads)
        inter = int(getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim"))
        return PrunePlan(
            orig_num_layers=int(c.num_hidden_layers), orig_num_heads=n_heads, orig_num_kv_heads=n_kv,
            orig_intermediate_size=inter,
            layers=[LayerPlan(i, list(range(n_heads)), list(range(n_kv)), list(range(inter)))
                    for i in range(int(c.num_hidden_layers))],
        )

    @property
    def plan(self) -> PrunePlan:
        return self.model._fedprune_plan

    def num_parameters(self) -> int:
        """All parameters, tied embeddings counted once."""
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    # ---- surgery -----------------------------------------------------------------
    def remove_layers(self, indices: Sequence[int]) -> None:
        """Remove decoder layers (current indices) for good, plan included. Refuses to remove every layer."""
        drop = sorted(set(int(i) for i in indices))
        n = self.num_layers
        bad = [i for i in drop if not 0 <= i < n]
        if bad:
            raise ValueError(f"layer indices {bad} out of range: the model has {n} layers")
        if len(drop) >= n:
            raise ValueError(f"cannot remove {len(drop)} layers from a model with {n} layers (at least one must remain)")
        keep = [i for i in range(n) if i not in drop]
        self.keep_only_layers(keep)
        self.plan.layers = [self.plan.layers[i] for i in keep]

    def keep_only_layers(self, indices: Sequence[int]) -> None:
        """Keep decoder layers ``indices`` (current indices, run in ascending order), drop the rest.

        The config follows (``num_hidden_layers`` and per-layer lists such as ``layer_types``)
        and every kept layer's ``layer_idx`` is renumbered, because KV caches index by it. The
        plan is not touched: :meth:`remove_layers` is the permanent surgery, :meth:`only_layers`
        the temporary one (a submodel, a trial removal).
        """
        n = self.num_layers
        keep = sorted(set(int(i) for i in indices))
        if not keep or any(not 0 <= i < n for i in keep):
            raise ValueError(f"layers to keep must be a non-empty subset of range({n}), got {keep}")
        layers = list(self.layers)
        self._set_layers([layers[i] for i in keep])
        c = self.config
        for name in PER_LAYER_CONFIG_LISTS:
            values = getattr(c, name, None)
            if isinstance(values, list) and len(values) == n:
                setattr(c, name, [values[i] for i in keep])
        c.num_hidden_layers = len(keep)
        for new_i, layer in enumerate(self.layers):
            for holder in self._layer_idx_holders(layer):
                holder.layer_idx = new_i

    @contextlib.contextmanager
    def only_layers(self, indices: Sequence[int]) -> Iterator[None]:
        """Within the block the model runs only decoder layers ``indices`` (:meth:`keep_only_layers`);
        on exit its layers, config and ``layer_idx`` values are as they were."""
        layers = list(self.layers)
        c = self.config
        saved_config = {name: getattr(c, name) for name in ("num_hidden_layers", *PER_LAYER_CONFIG_LISTS)
                        if hasattr(c, name)}
        saved_idx = [(m, m.layer_idx) for layer in layers for m in self._layer_idx_holders(layer)]
        self.keep_only_layers(indices)
        try:
            yield
        finally:
            self._set_layers(layers)
            for name, value in saved_config.items():
                setattr(c, name, value)
            for m, idx in saved_idx:
                m.layer_idx = idx

    def _layer_idx_holders(self, layer: nn.Module) -> list[nn.Module]:
        return [m for m in (layer, self.attention(layer)) if hasattr(m, "layer_idx")]

    def _set_layers(self, new_layers: list[nn.Module]) -> None:
        raise NotImplementedError

    def prune_heads(self, layer_idx: int, keep_q_heads: Sequence[int]) -> None:
        """Keep the query heads ``keep_q_heads`` (current indices) of layer ``layer_idx``.

        KV groups with no kept query head are removed. Every kept group must keep the same
        number of query heads (grouped-query attention repeats each k/v head uniformly).
        """
        layer = self.layers[layer_idx]
        nh, nkv, hd = self.num_heads(layer), self.num_kv_heads(layer), self.head_dim
        g = nh // nkv
        keep = sorted(set(int(h) for h in keep_q_heads))
        if any(not 0 <= h < nh for h in keep):
            raise ValueError(f"head indices out of range for layer {layer_idx} with {nh} heads: {keep}")
        if not keep:
            raise ValueError(f"cannot keep zero heads in layer {layer_idx}; remove the layer instead")
        per_group: dict[int, list[int]] = {}
        for h in keep:
            per_group.setdefault(h // g, []).append(h)
        counts = {len(v) for v in per_group.values()}
        if len(counts) != 1:
            raise ValueError(
                f"layer {layer_idx}: kept query heads must be spread evenly over kept KV groups "
                f"(group size {g}); got {{group: heads}} = {per_group}"
            )
        kv_keep = sorted(per_group)
        q, k, v = self.qkv(layer)
        o = self.o_proj(layer)
        _slice_linear(q, head_rows(keep, hd), 0)
        _slice_linear(k, head_rows(kv_keep, hd), 0)
        _slice_linear(v, head_rows(kv_keep, hd), 0)
        _slice_linear(o, head_rows(keep, hd), 1)
        self._set_head_counts(layer, len(keep), len(kv_keep))
        lp = self.plan.layers[layer_idx]
        lp.q_heads = [lp.q_heads[h] for h in keep]
        lp.kv_heads = [lp.kv_heads[k_] for k_ in kv_keep]

    def _set_head_counts(self, layer: nn.Module, n_heads: int, n_kv: int) -> None:
        raise NotImplementedError

    def prune_ffn_channels(self, layer_idx: int, keep: Sequence[int]) -> None:
        """Keep FFN channels ``keep`` (current indices) of layer ``layer_idx``."""
        layer = self.layers[layer_idx]
        n = self.intermediate_size(layer)
        keep = sorted(set(int(c) for c in keep))
        if any(not 0 <= c < n for c in keep):
            raise ValueError(f"channel indices out of range for layer {layer_idx} with {n} channels")
        if not keep:
            raise ValueError(f"cannot keep zero FFN channels in layer {layer_idx}; remove the layer instead")
        idx = torch.as_tensor(keep, dtype=torch.long)
        for lin in self.ffn_in(layer):
            _slice_linear(lin, idx, 0)
        _slice_linear(self.ffn_out(layer), idx, 1)
        self._set_ffn_width(layer, len(keep))
        lp = self.plan.layers[layer_idx]
        lp.ffn_channels = [lp.ffn_channels[c] for c in keep]

    def _set_ffn_width(self, layer: nn.Module, width: int) -> None:
        mlp = self.mlp(layer)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width

    def add_output_bias(self, layer_idx: int, site: str, delta: torch.Tensor) -> None:
        """Add ``delta`` ``[hidden]`` to the bias of layer ``layer_idx``'s ``site`` (``o_proj`` or
        ``ffn_out``), creating the bias where the architecture has none; the plan records a
        created bias so that a reloaded checkpoint declares it (recovery steps such as FLAP's
        bias compensation use this)."""
        if site not in BIAS_SITES:
            raise ValueError(f"unknown bias site {site!r}; known: {list(BIAS_SITES)}")
        lin = getattr(self, site)(self.layers[layer_idx])
        delta = delta.to(lin.weight.dtype)
        if lin.bias is None:
            lin.bias = nn.Parameter(delta.clone(), requires_grad=False)
            self.plan.layers[layer_idx].added_biases.append(site)
        else:
            with torch.no_grad():
                lin.bias.add_(delta)

    def soft_masks(self, head_masks=None, channel_masks=None):
        """Attach soft keep-masks (:class:`~fedprune.adapters.soft_masks.SoftMasks`); ``remove()`` detaches."""
        from .soft_masks import SoftMasks

        return SoftMasks(self, head_masks, channel_masks)

    # ---- rebuilding from a plan --------------------------------------------------
    def apply_plan_shapes(self, plan: PrunePlan) -> None:
        """Shrink a freshly built full-size model to the shapes ``plan`` describes.

        Used on reload: weights are loaded afterwards, so which rows are kept is irrelevant
        here, only how many.
        """
        keep_layers = [lp.orig_index for lp in plan.layers]
        if len(self.layers) == plan.orig_num_layers and len(keep_layers) < plan.orig_num_layers:
            self.remove_layers([i for i in range(plan.orig_num_layers) if i not in keep_layers])
        elif len(self.layers) != len(keep_layers):
            raise ValueError(f"plan lists {len(keep_layers)} layers, the config builds {len(self.layers)}")
        for i, lp in enumerate(plan.layers):
            layer = self.layers[i]
            g = self.group_size(layer)
            # keep the first heads of the first groups, evenly: shapes only
            n_kv, n_q = len(lp.kv_heads), len(lp.q_heads)
            per = n_q // n_kv
            heads = [grp * g + j for grp in range(n_kv) for j in range(per)]
            if n_q != self.num_heads(layer) or n_kv != self.num_kv_heads(layer):
                self.prune_heads(i, heads)
            if len(lp.ffn_channels) != self.intermediate_size(layer):
                self.prune_ffn_channels(i, range(len(lp.ffn_channels)))
            for site in lp.added_biases:  # declared so the saved bias loads into it
                lin = getattr(self, site)(layer)
                if lin.bias is None:
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                        device=lin.weight.device), requires_grad=False)
        self.model._fedprune_plan = plan
