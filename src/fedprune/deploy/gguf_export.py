"""Export LLaMA-family models (pruned ones included) to a GGUF file that llama.cpp runs.

Layout decisions, checked against llama.cpp's model loader:

- Every layer the same shape -> architecture ``llama`` with scalar head counts and FFN length.
- Layers of different shapes (fedprune's per-layer pruning) -> architecture ``deci``. llama.cpp
  *parses* per-layer arrays for ``llama`` too, but its ``llama`` graph sizes every layer's
  tensors from layer 0; the ``deci`` graph (Nemotron-NAS: a LLaMA block with per-layer head
  counts and FFN widths) reads ``head_count``, ``head_count_kv`` and ``feed_forward_length``
  per layer and is otherwise the same block (RMSNorm, normal RoPE, SwiGLU).
- ``attention.key_length``/``value_length`` are always written: llama.cpp otherwise derives the
  head size from ``embedding_length / head_count[0]``, which is wrong once heads are pruned.
- q/k rows are reordered for llama.cpp's RoPE pairing (see :mod:`.rotary`).
- Biases on ``o_proj``/``down_proj`` (FLAP's bias compensation) are written as
  ``attn_output.bias``/``ffn_down.bias``, which both graphs add; q/k/v/gate/up biases are not
  part of these graphs and are refused.

``outtype`` (:data:`OUTTYPES`), the type of the 2-D weights (norms and biases stay f32):

- ``f32``, ``f16``, ``bf16``, ``q8_0`` are written here with the ``gguf`` package (no llama.cpp
  needed). q8_0 is quantized from the float32 weights, as llama.cpp's reference quantizer does;
  a tensor whose rows are not a multiple of 32 is stored f16.
- ``q6_k``, ``q5_k_m``, ``q4_k_m``, ``q4_0`` are quantized by llama.cpp's own quantizer
  (``llama_model_quantize`` inside llama-cpp-python, the ``deploy`` extra) from an f16 file written
  first (a temporary sibling of the output, removed afterwards). It uses llama.cpp's tensor-type mix
  and falls back to another type for rows (``ne[0]``, a weight's input width) that are not a
  multiple of the type's block (256 for k-quants, 32 for q4_0/q8_0).

The report reads the written file back (:func:`file_summary`): ``tensor_types``, ``bits_per_weight``
and ``fallbacks``, every 2-D weight stored in a type other than the one the outtype asks for
(:func:`wanted_types` gives the rule).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .. import atomic
from .errors import UnsupportedModelError
from .gguf_tokenizer import gguf_vocab
from .rotary import to_llamacpp_rotary

log = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
DIRECT_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # written here; the others by llama.cpp's quantizer
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_BIAS_OK = {"o_proj": "attn_output", "down_proj": "ffn_down"}


# ---- inputs -------------------------------------------------------------------------
def _resolve(model_or_dir, tokenizer):
    """A plain (LoRA-merged) model and its tokenizer."""
    from .. import load_model, load_tokenizer

    if isinstance(model_or_dir, (str, os.PathLike)):
        model = load_model(model_or_dir)
        if tokenizer is None:
            tokenizer = load_tokenizer(model_or_dir)
    else:
        model = model_or_dir
    if hasattr(model, "merge_and_unload"):  # a PEFT model: fold the LoRA deltas into the base weights
        log.info("merging LoRA adapters into the base weights before export")
        model = model.merge_and_unload()
    if tokenizer is None:
        spec = getattr(model, "_fedprune_spec", None)
        if spec is None:
            raise ValueError("export_gguf needs tokenizer= for an in-memory model (GGUF files carry the tokenizer)")
        tokenizer = load_tokenizer(spec)
    return model, tokenizer


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def unsupported_reasons(model) -> list[str]:
    """Why ``model`` cannot be written as a llama.cpp LLaMA/deci GGUF (empty list: it can)."""
    c = model.config
    if c.model_type not in SUPPORTED_MODEL_TYPES:
        return [f"architecture {c.model_type!r} is not exported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"]
    reasons = []
    if getattr(c, "hidden_act", "silu") != "silu":
        reasons.append(f"activation {c.hidden_act!r}: llama.cpp's LLaMA block is SwiGLU (silu)")
    params = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if rope_type not in (None, "default"):
        reasons.append(f"RoPE scaling {rope_type!r} is not exported (only plain RoPE)")
    sw = getattr(c, "sliding_window", None)
    if c.model_type == "mistral" and sw is not None and sw < c.max_position_embeddings:
        reasons.append(f"sliding-window attention ({sw} tokens) is not part of the llama graph")
    for name, mod in model.named_modules():
        if "lora_" in name:
            reasons.append(f"unmerged LoRA module {name}: pass the PEFT model (it is merged) or merge it first")
            break
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            proj = name.split(".")[-2]
            if proj not in _BIAS_OK:
                reasons.append(f"bias {name}: llama.cpp's LLaMA graph has no {proj} bias")
    return reasons


# ---- tensors ------------------------------------------------------------------------
def _encode(t: torch.Tensor, outtype: str) -> tuple[np.ndarray, Any, str]:
    """(data, raw_dtype, stored type) for one tensor, ``outtype`` one of :data:`DIRECT_OUTTYPES`."""
    import gguf

    a = t.detach().to(torch.float32).cpu().numpy()
    if a.ndim == 1 or outtype == "f32":
        return a, None, "f32"
    if outtype in ("q8_0", "bf16"):
        qtype = gguf.GGMLQuantizationType[outtype.upper()]
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if a.shape[-1] % block == 0:
            return gguf.quants.quantize(a, qtype), qtype, outtype
    return a.astype(np.float16), None, "f16"


def model_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in llama.cpp layout) for every weight, in file order."""
    from ..adapters import get_adapter

    ad = get_adapter(model)
    yield "token_embd.weight", ad.embed_tokens().weight
    for i, layer in enumerate(ad.layers):
        q, k, v = ad.qkv(layer)
        o = ad.o_proj(layer)
        gate, up = ad.ffn_in(layer)
        down = ad.ffn_out(layer)
        blk = f"blk.{i}"
        yield f"{blk}.attn_norm.weight", ad.input_norm(layer).weight
        yield f"{blk}.attn_q.weight", to_llamacpp_rotary(q.weight, ad.num_heads(layer))
        yield f"{blk}.attn_k.weight", to_llamacpp_rotary(k.weight, ad.num_kv_heads(layer))
        yield f"{blk}.attn_v.weight", v.weight
        yield f"{blk}.attn_output.weight", o.weight
        if o.bias is not None:
            yield f"{blk}.attn_output.bias", o.bias
        yield f"{blk}.ffn_norm.weight", ad.post_attention_norm(layer).weight
        yield f"{blk}.ffn_gate.weight", gate.weight
        yield f"{blk}.ffn_up.weight", up.weight
        yield f"{blk}.ffn_down.weight", down.weight
        if down.bias is not None:
            yield f"{blk}.ffn_down.bias", down.bias
    yield "output_norm.weight", ad.final_norm().weight
    head = ad.lm_head()
    if not getattr(model.config, "tie_word_embeddings", False) or head.weight is not ad.embed_tokens().weight:
        yield "output.weight", head.weight


# ---- writing ------------------------------------------------------------------------
def layer_shapes(model) -> list[dict[str, int]]:
    from ..adapters import get_adapter

    ad = get_adapter(model)
    return [{"heads": ad.num_heads(l), "kv_heads": ad.num_kv_heads(l), "ffn": ad.intermediate_size(l)}
            for l in ad.layers]


FFN_ALIGNMENT = 32
"""FFN widths that are multiples of this keep llama.cpp's ``ffn_down`` rows whole q8_0/q4_0 blocks and
on its tiled CPU kernels (benchmarks/deploy: an unrounded COMP 30 % prefills at 0.95x the dense model
at f16, rounded to 32 at 1.43x)."""

RECOMMENDED_WIDTH_MULTIPLE = 64
"""What the export warning suggests: in benchmarks/deploy, COMP 30 % rounded to 64 decodes faster than
rounded to 32 (f16: 1.39x against 1.26x the dense model; faster in 11 of 12 passes paired with it) with no loss in
perplexity, and is the one file that met every speed target there."""


def unaligned_ffn_layers(shapes: list[dict[str, int]], multiple: int = FFN_ALIGNMENT) -> list[int]:
    """Indices of the layers (:func:`layer_shapes`) whose FFN width is not a multiple of ``multiple``."""
    return [i for i, s in enumerate(shapes) if s["ffn"] % multiple]


def export_gguf(model_or_dir, out_file: str | os.PathLike, outtype: str = "f16", tokenizer=None,
                tokenizer_pre: str | None = None, name: str | None = None,
                n_threads: int | None = None) -> dict[str, Any]:
    """Write ``model_or_dir`` (a model, a PEFT model, or a model directory/spec) to ``out_file``.

    ``outtype``: one of :data:`OUTTYPES`; the k-quants and q4_0 need llama-cpp-python (the ``deploy``
    extra) and quantize on ``n_threads`` threads (default: all). Raises
    :class:`UnsupportedModelError` (a ``ValueError``) naming every reason when the model cannot be
    represented. Returns a report: path, architecture, outtype, bytes, quantizer, and what
    :func:`file_summary` reads back from the written file (tensor types, bits per weight, fallbacks).
    """
    from .llamacpp import quantize_gguf, require_llama_cpp

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} not supported; choose one of {', '.join(OUTTYPES)}")
    if outtype not in DIRECT_OUTTYPES:
        require_llama_cpp(f"--outtype {outtype} (llama.cpp's quantizer)")  # before any work
    model, tokenizer = _resolve(model_or_dir, tokenizer)
    reasons = unsupported_reasons(model)
    if reasons:
        raise UnsupportedModelError("cannot export to GGUF: " + "; ".join(reasons))
    out_file = Path(out_file)
    with atomic.atomic_file(out_file) as tmp:
        if outtype in DIRECT_OUTTYPES:
            info = _write_gguf(model, tokenizer, tmp, outtype, tokenizer_pre, name)
        else:
            with atomic.scratch_file(out_file, "f16") as f16:
                info = _write_gguf(model, tokenizer, f16, "f16", tokenizer_pre, name)
                quantize_gguf(f16, tmp, outtype, n_threads)
    report = {"path": str(out_file), **info, "outtype": outtype, "bytes": out_file.stat().st_size,
              "quantizer": "gguf" if outtype in DIRECT_OUTTYPES else "llama.cpp",
              **file_summary(out_file, outtype),
              "unaligned_ffn_layers": unaligned_ffn_layers(layer_shapes(model))}
    if report["unaligned_ffn_layers"]:
        log.warning("%d of %d layers have an FFN width that is not a multiple of %d: llama.cpp runs their "
                    "ffn_down on slower kernels (prefill can end up slower than the dense model's); prune with "
                    "-o width_multiple=%d to keep the widths aligned", len(report["unaligned_ffn_layers"]),
                    len(layer_shapes(model)), FFN_ALIGNMENT, RECOMMENDED_WIDTH_MULTIPLE)
    if report["fallbacks"]:
        log.warning("%d of %d weight matrices not stored as %s (rows not a multiple of the block), e.g. %s",
                    report["fallback_count"], report["matrices"], outtype,
                    ", ".join(f"{f['tensor']} -> {f['stored']}" for f in report["fallbacks"][:3]))
    return report


def _write_gguf(model, tokenizer, path: Path, outtype: str, tokenizer_pre: str | None, name: str | None) -> dict:
    """Write the GGUF file ``path`` with every 2-D weight encoded by :func:`_encode` (``outtype`` one of
    :data:`DIRECT_OUTTYPES`); returns architecture, layer and tokenizer facts for the report."""
    import gguf

    from ..adapters import get_adapter

    ad = get_adapter(model)
    c = model.config
    shapes = layer_shapes(model)
    uniform = len({tuple(s.values()) for s in shapes}) == 1
    arch = "llama" if uniform else "deci"
    vocab_rows = int(ad.embed_tokens().weight.shape[0])
    vocab = gguf_vocab(tokenizer, vocab_rows, tokenizer_pre)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]

    def per_layer(key: str):
        vals = [s[key] for s in shapes]
        return vals[0] if uniform else vals

    w = gguf.GGUFWriter(path, arch)
    w.add_name(name or Path(str(getattr(c, "_name_or_path", "") or "model")).name or "model")
    w.add_context_length(int(c.max_position_embeddings))
    w.add_embedding_length(ad.hidden_size)
    w.add_block_count(ad.num_layers)
    w.add_feed_forward_length(per_layer("ffn"))
    w.add_head_count(per_layer("heads"))
    w.add_head_count_kv(per_layer("kv_heads"))
    w.add_key_length(ad.head_dim)
    w.add_value_length(ad.head_dim)
    w.add_rope_dimension_count(ad.head_dim)
    w.add_rope_freq_base(_rope_theta(c))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(vocab_rows)
    w.add_file_type(file_type)
    w.add_string("fedprune.layers", json.dumps(shapes, separators=(",", ":")))
    # tokenizer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    w.add_token_merges(vocab.merges)
    for key, tid in vocab.special_ids.items():
        getattr(w, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "pad": "add_pad_token_id",
                    "unk": "add_unk_token_id"}[key])(tid)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)
    with torch.no_grad():
        for tname, t in model_tensors(model):
            data, raw, _ = _encode(t, outtype)
            w.add_tensor(tname, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"architecture": arch, "num_layers": ad.num_layers, "uniform_layers": uniform, "tokenizer_pre": vocab.pre}


# ---- reading back ---------------------------------------------------------------------------
# What llama.cpp's quantizer (default parameters, no importance matrix) stores a weight matrix as when
# its rows fit the block: the *output matrix* (``output.weight``, or ``token_embd.weight`` when the
# embeddings are tied and there is no ``output.weight``) gets q6_k under every k-quant and q4_0; under
# q4_k_m / q5_k_m, ``attn_v`` and ``ffn_down`` get q6_k in some layers (its ``use_more_bits`` rule:
# the first and last eighth of the layers and every third one between) and the base type elsewhere.
_BASE_TYPE = {"q6_k": "q6_k", "q5_k_m": "q5_k", "q4_k_m": "q4_k", "q4_0": "q4_0"}
_MORE_BITS = ("attn_v.weight", "ffn_down.weight")


def wanted_types(outtype: str, tensor: str, output_matrix: bool) -> tuple[str, ...]:
    """The stored types that ``outtype`` asks for the 2-D weight ``tensor`` (lower-case ggml type names).

    f32/f16/bf16/q8_0: that type. q6_k: q6_k. q4_0: q4_0, q6_k for the output matrix.
    q4_k_m/q5_k_m: q4_k/q5_k, q6_k for the output matrix, either (the mix) for ``attn_v``/``ffn_down``.
    Any other stored type is a fallback (llama.cpp's quantizer demotes a k-quant whose rows are not a
    multiple of 256 to q5_0/q5_1/q8_0, and anything whose rows are not a multiple of 32 to f16; it
    stores the output matrix q8_0 rather than q6_k when its rows are not a multiple of 256).
    """
    if outtype in DIRECT_OUTTYPES:
        return (outtype,)
    if outtype not in _BASE_TYPE:
        raise ValueError(f"outtype {outtype!r} not supported; choose one of {', '.join(OUTTYPES)}")
    if output_matrix:
        return ("q6_k",)
    base = _BASE_TYPE[outtype]
    if outtype in ("q4_k_m", "q5_k_m") and tensor.endswith(_MORE_BITS):
        return (base, "q6_k")
    return (base,)


def file_summary(path: str | os.PathLike, outtype: str) -> dict[str, Any]:
    """Read ``path`` back: ``tensor_types`` (tensors per stored type), ``weights`` (elements of all
    tensors), ``bits_per_weight`` (8 x bytes of all tensor data / weights), ``matrices`` (2-D
    tensors), ``fallbacks`` ([{"tensor", "wanted", "stored"}] for every 2-D weight stored in a type
    :func:`wanted_types` does not allow; ``wanted`` joins the allowed types with ``|``) and
    ``fallback_count``."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    out_name = "output.weight" if "output.weight" in names else "token_embd.weight"
    types: dict[str, int] = {}
    fallbacks = []
    n_bytes = n_weights = matrices = 0
    for t in reader.tensors:
        stored = t.tensor_type.name.lower()
        types[stored] = types.get(stored, 0) + 1
        n_bytes += int(t.n_bytes)
        n_weights += int(t.n_elements)
        if len(t.shape) >= 2:
            matrices += 1
            wanted = wanted_types(outtype, t.name, t.name == out_name)
            if stored not in wanted:
                fallbacks.append({"tensor": t.name, "wanted": "|".join(wanted), "stored": stored})
    return {"tensor_types": dict(sorted(types.items())), "weights": n_weights,
            "bits_per_weight": 8.0 * n_bytes / n_weights, "matrices": matrices,
            "fallbacks": fallbacks, "fallback_count": len(fallbacks)}
