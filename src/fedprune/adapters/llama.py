"""LLaMA-family adapter: LLaMA (incl. SmolLM2), Mistral and Qwen2 (q/k/v biases).

Layout: ``model.model.layers[i].self_attn.{q,k,v,o}_proj``, ``.mlp.{gate,up,down}_proj``
(SwiGLU), RMSNorms ``input_layernorm`` / ``post_attention_layernorm``. Attention infers the
head count from the projection shape; only ``num_key_value_groups`` must be kept in step.
"""
from __future__ import annotations

from torch import nn

from .base import DecoderAdapter


class LlamaAdapter(DecoderAdapter):
    model_types = ("llama", "mistral", "qwen2")
    gated_ffn = True

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def _set_layers(self, new_layers):
        self.model.model.layers = nn.ModuleList(new_layers)

    @property
    def head_dim(self) -> int:
        c = self.config
        return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)

    def decoder(self):
        return self.model.model

    def embed_tokens(self):
        return self.model.model.embed_tokens

    def final_norm(self):
        return self.model.model.norm

    def attention(self, layer):
        return layer.self_attn

    def mlp(self, layer):
        return layer.mlp

    def o_proj(self, layer):
        return layer.self_attn.o_proj

    def ffn_in(self, layer):
        return [layer.mlp.gate_proj, layer.mlp.up_proj]

    def ffn_out(self, layer):
        return layer.mlp.down_proj

    def input_norm(self, layer):
        return layer.input_layernorm

    def post_attention_norm(self, layer):
        return layer.post_attention_layernorm

    def _set_head_counts(self, layer, n_heads, n_kv):
        attn = layer.self_attn
        attn.num_key_value_groups = n_heads // n_kv
        for name, val in (("num_heads", n_heads), ("num_key_value_heads", n_kv)):
            if hasattr(attn, name):
                setattr(attn, name, val)
