"""OPT adapter: ReLU FFN ``fc1``/``fc2`` with biases, LayerNorms, multi-head attention.

Layout: ``model.model.decoder.layers[i].self_attn.{q,k,v,out}_proj`` (all biased),
``.fc1`` / ``.fc2`` on the layer itself, ``self_attn_layer_norm`` / ``final_layer_norm``.
OPT attention reshapes with ``self.num_heads``, so it is updated on head pruning. Every
head is its own KV group (group size 1).
"""
from __future__ import annotations

from torch import nn

from .base import DecoderAdapter
from .shape import ModelShape


class OPTAdapter(DecoderAdapter):
    model_types = ("opt",)
    gated_ffn = False

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.decoder.layers

    @classmethod
    def model_shape(cls, config) -> ModelShape:
        H, V, P = int(config.hidden_size), int(config.vocab_size), int(config.word_embed_proj_dim)
        tied = bool(getattr(config, "tie_word_embeddings", True))
        norm = 2 if getattr(config, "layer_norm_elementwise_affine", True) else 0
        final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        extra = (int(config.max_position_embeddings) + 2) * H  # learned positions, offset by 2
        extra += V * (P - H) * (1 if tied else 2)  # embeddings and LM head are V x word_embed_proj_dim
        if P != H:
            extra += 2 * P * H  # project_in, project_out (no bias)
        if not final_norm:
            extra -= norm * H
        biased = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2") if getattr(config, "enable_bias", True) else ()
        nh = int(config.num_attention_heads)
        return ModelShape(H, int(config.ffn_dim), nh, nh, V, int(config.num_hidden_layers), tied, None,
                          gated_ffn=False, biased=biased, norm_params=norm, extra_params=extra)

    @classmethod
    def _tiny_config_fields(cls, model_type):
        return dict(ffn_dim=96, word_embed_proj_dim=64, do_layer_norm_before=True, enable_bias=True,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2)

    def write_uniform_sizes(self, config, num_heads, num_kv_heads, width) -> bool:
        """OPT derives ``head_dim`` from ``hidden_size / num_attention_heads``: fewer heads need the plan."""
        config.ffn_dim = width
        return num_heads == self.plan.orig_num_heads

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
