"""LLaMA-family adapter: LLaMA (incl. SmolLM2), Mistral and Qwen2 (q/k/v biases).

Layout: ``model.model.layers[i].self_attn.{q,k,v,o}_proj``, ``.mlp.{gate,up,down}_proj``
(SwiGLU), RMSNorms ``input_layernorm`` / ``post_attention_layernorm``. Attention infers the
head count from the projection shape; only ``num_key_value_groups`` must be kept in step.
"""
from __future__ import annotations

from torch import nn

from .base import DecoderAdapter
from .shape import ModelShape

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


class LlamaAdapter(DecoderAdapter):
    model_types = ("llama", "mistral", "qwen2")
    gated_ffn = True

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @classmethod
    def model_shape(cls, config) -> ModelShape:
        nh = int(config.num_attention_heads)
        if config.model_type == "qwen2":
            biased = ATTENTION[:3]  # Qwen2: q/k/v always biased
        else:
            biased = (ATTENTION if getattr(config, "attention_bias", False) else ()) + \
                (FFN if getattr(config, "mlp_bias", False) else ())
        return ModelShape(int(config.hidden_size), int(config.intermediate_size), nh,
                          int(getattr(config, "num_key_value_heads", None) or nh), int(config.vocab_size),
                          int(config.num_hidden_layers), bool(getattr(config, "tie_word_embeddings", False)),
                          getattr(config, "head_dim", None), biased=biased)

    @classmethod
    def _tiny_config_fields(cls, model_type):
        kw = dict(intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=model_type == "llama", head_dim=16)
        if model_type == "qwen2":
            kw.update(use_sliding_window=False)
        if model_type == "mistral":
            kw.update(sliding_window=None)
        return kw

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
