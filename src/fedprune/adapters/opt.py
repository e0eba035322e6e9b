"""OPT adapter: ReLU FFN ``fc1``/``fc2`` with biases, LayerNorms, multi-head attention.

Layout: ``model.model.decoder.layers[i].self_attn.{q,k,v,out}_proj`` (all biased),
``.fc1`` / ``.fc2`` on the layer itself, ``self_attn_layer_norm`` / ``final_layer_norm``.
OPT attention reshapes with ``self.num_heads``, so it is updated on head pruning. Every
head is its own KV group (group size 1).
"""
from __future__ import annotations

from torch import nn

from .base import DecoderAdapter


class OPTAdapter(DecoderAdapter):
    model_types = ("opt",)
    gated_ffn = False

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.decoder.layers

    def _set_layers(self, new_layers):
        self.model.model.decoder.layers = nn.ModuleList(new_layers)

    @property
    def head_dim(self) -> int:
        return int(self.config.hidden_size // self.config.num_attention_heads)

    def decoder(self):
        return self.model.model.decoder  # final LayerNorm and project_out included

    def embed_tokens(self):
        return self.model.model.decoder.embed_tokens

    def final_norm(self):
        return self.model.model.decoder.final_layer_norm

    def attention(self, layer):
        return layer.self_attn

    def mlp(self, layer):
        return layer

    def o_proj(self, layer):
        return layer.self_attn.out_proj

    def ffn_in(self, layer):
        return [layer.fc1]

    def ffn_out(self, layer):
        return layer.fc2

    def input_norm(self, layer):
        return layer.self_attn_layer_norm

    def post_attention_norm(self, layer):
        return layer.final_layer_norm

    def _set_head_counts(self, layer, n_heads, n_kv):
        layer.self_attn.num_heads = n_heads
