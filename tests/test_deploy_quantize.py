"""Quantized GGUF export (llama.cpp's own quantizer), bits per weight and fallbacks read back from the
file, perplexity in llama.cpp against PyTorch, ``eval --backend llama.cpp``, and the extras' errors.

Tiny random LLaMA models, real llama.cpp through llama-cpp-python (skipped where it is not
installed). Hidden size 256 lets every k-quant apply (llama.cpp's k-quant block is 256 weights of a
row); hidden size 64 makes every k-quant fall back.
"""
from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch

from fedprune.adapters import get_adapter
from fedprune.deploy import OUTTYPES, export_gguf, llamacpp_perplexity, torch_perplexity, wanted_types
from fedprune.models.tiny import tiny_model

gguf = pytest.importorskip("gguf")

CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")
QUANTIZED = ("q6_k", "q5_k_m", "q4_k_m", "q4_0")


def llama(tok, hidden: int, ffn: int, layers: int = 2, tied: bool = False, seed: int = 0):
    return tiny_model("llama", seed=seed, vocab_size=len(tok), hidden_size=hidden, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=hidden // 4, intermediate_size=ffn, num_hidden_layers=layers,
                      max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)


def deci_256(tok):
    """Hidden 256, layers of different shapes: layer 0 keeps 2 of 4 heads (attn_output rows 128 wide),
    layer 1 keeps 320 of 512 FFN channels (ffn_down rows 320 wide); every other row is 256 wide."""
    m = llama(tok, 256, 512)
    ad = get_adapter(m)
    ad.prune_heads(0, [2, 3])
    ad.prune_ffn_channels(1, range(320))  # keeps 320
    return m


def windows(tok, n: int = 3, seq_len: int = 48, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(tok), (n, seq_len), generator=g)


def stored(path) -> dict[str, tuple[str, list[int]]]:
    """tensor name -> (stored type, ggml shape [ne0 = row width, ne1, ...])."""
    return {t.name: (t.tensor_type.name.lower(), [int(d) for d in t.shape]) for t in gguf.GGUFReader(str(path)).tensors}


@pytest.fixture(scope="module")
def chat_tok(tok):
    t = copy.deepcopy(tok)  # the module's tokenizer stays as it is
    t.chat_template = CHAT
    return t


# ---- the rule, by hand ---------------------------------------------------------------------------
def test_wanted_types_by_hand():
    assert wanted_types("f16", "blk.0.attn_q.weight", False) == ("f16",)
    assert wanted_types("q8_0", "output.weight", True) == ("q8_0",)
    assert wanted_types("q6_k", "output.weight", True) == ("q6_k",)
    assert wanted_types("q4_k_m", "blk.3.attn_q.weight", False) == ("q4_k",)
    assert wanted_types("q4_k_m", "blk.3.attn_v.weight", False) == ("q4_k", "q6_k")
    assert wanted_types("q5_k_m", "blk.3.ffn_down.weight", False) == ("q5_k", "q6_k")
    assert wanted_types("q4_k_m", "token_embd.weight", True) == ("q6_k",)  # tied: the output matrix
    assert wanted_types("q4_k_m", "token_embd.weight", False) == ("q4_k",)
    assert wanted_types("q4_0", "output.weight", True) == ("q6_k",)
    assert wanted_types("q4_0", "blk.0.ffn_down.weight", False) == ("q4_0",)
    with pytest.raises(ValueError, match="q3_k"):
        wanted_types("q3_k", "output.weight", True)


def test_nll_from_logits_by_hand():
    from fedprune.deploy.verify import nll_from_logits

    logits = np.array([[0.0, np.log(3.0)], [1000.0, 1000.0]], dtype=np.float32)  # p = 1/4, 3/4; then 1/2, 1/2
    assert nll_from_logits(logits, [1, 0]) == pytest.approx(np.log(4 / 3) + np.log(2), rel=1e-6)


def test_scratch_file_is_removed_and_sweepable(tmp_path):
    """The f16 intermediate: gone after the block (also on an error), and named like fedprune.atomic's
    temporaries, so one left by a killed writer is swept by the next writer of the same output."""
    import os
    import subprocess

    from fedprune import atomic

    out = tmp_path / "m.gguf"
    with pytest.raises(RuntimeError):
        with atomic.scratch_file(out, "f16") as f16:
            f16.write_bytes(b"x")
            raise RuntimeError("quantizer failed")
    assert not list(tmp_path.iterdir())
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = tmp_path / f".{out.name}.{dead.pid}-{atomic.host_tag()}.abcd1234_f16.tmp"  # a dead writer's
    left.write_bytes(b"x")
    assert atomic.sweep_stale(out) == [left] and not left.exists()
    assert not os.path.exists(out)


# ---- every outtype: exported, read back, loaded and run by llama.cpp --------------------------------
@pytest.fixture(scope="module")
def dense_256(chat_tok, tmp_path_factory):
    """A uniform hidden-256 model (every row a multiple of 256) and its direct f16 file."""
    m = llama(chat_tok, 256, 256)
    d = tmp_path_factory.mktemp("dense256")
    export_gguf(m, d / "ref.f16.gguf", "f16", tokenizer=chat_tok)
    return m, d


# stored types of the 2-D weights of the 2-layer hidden-256 model: llama.cpp's mix gives attn_v and
# ffn_down of layer 1 (its use_more_bits: the last eighth of the layers) and output.weight q6_k
EXPECTED_TYPES = {"f32": {"f32"}, "f16": {"f16"}, "bf16": {"bf16"}, "q8_0": {"q8_0"}, "q6_k": {"q6_k"},
                  "q5_k_m": {"q5_k", "q6_k"}, "q4_k_m": {"q4_k", "q6_k"}, "q4_0": {"q4_0", "q6_k"}}
PPL_TOL = {"f32": 1e-4, "f16": 2e-3, "bf16": 1e-2, "q8_0": 2e-3, "q6_k": 5e-3, "q5_k_m": 1e-2, "q4_k_m": 3e-2,
           "q4_0": 3e-2}


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_every_outtype_exports_loads_and_generates(outtype, dense_256, chat_tok, tmp_path, one_thread):
    pytest.importorskip("llama_cpp")
    from fedprune.deploy.llamacpp import load_gguf

    m, d = dense_256
    path = tmp_path / f"m.{outtype}.gguf"
    rep = export_gguf(m, path, outtype, tokenizer=chat_tok, n_threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # the f16 intermediate is gone
    assert rep["quantizer"] == ("llama.cpp" if outtype in QUANTIZED else "gguf")
    assert rep["fallbacks"] == [] and rep["fallback_count"] == 0, rep["fallbacks"]
    types = stored(path)
    matrices = {n: t for n, (t, shape) in types.items() if len(shape) == 2}
    assert set(matrices.values()) == EXPECTED_TYPES[outtype], matrices
    assert {t for t, shape in types.values() if len(shape) == 1} == {"f32"}  # norms stay f32
    if outtype in ("q4_k_m", "q5_k_m"):
        assert matrices["blk.1.attn_v.weight"] == matrices["blk.1.ffn_down.weight"] == matrices["output.weight"] == "q6_k"
        assert matrices["blk.0.attn_v.weight"] == matrices["blk.0.attn_q.weight"] != "q6_k"
    counts = {}
    for t, _ in types.values():
        counts[t] = counts.get(t, 0) + 1
    assert rep["tensor_types"] == counts
    # the tokenizer and the chat template travel through llama.cpp's quantizer
    ref, got = gguf.GGUFReader(str(d / "ref.f16.gguf")), gguf.GGUFReader(str(path))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.pre",
                "tokenizer.ggml.eos_token_id", "tokenizer.chat_template", "llama.feed_forward_length"):
        assert got.fields[key].contents() == ref.fields[key].contents(), key
    assert got.fields["tokenizer.chat_template"].contents() == CHAT
    # llama.cpp loads it and generates a token
    llm = load_gguf(path, n_ctx=64, n_threads=1)
    try:
        out = llm.create_completion("The quick brown", max_tokens=1, temperature=0.0, top_k=1)
    finally:
        llm.close()
    assert out["usage"]["completion_tokens"] == 1 and out["choices"][0]["finish_reason"] == "length", out
    # and its perplexity is the PyTorch model's, within what the type loses
    wins = windows(chat_tok, 2, 32)
    ref_ppl = torch_perplexity(m, wins)["ppl"]
    assert abs(llamacpp_perplexity(path, wins, n_threads=1)["ppl"] / ref_ppl - 1) < PPL_TOL[outtype]


# ---- fallbacks -------------------------------------------------------------------------------------
def test_per_layer_pruned_model_quantizes_to_q4_k_m(tok, tmp_path, one_thread):
    """deci architecture: the rows that are not a multiple of 256 (and only they) fall back."""
    pytest.importorskip("llama_cpp")
    m = deci_256(tok)
    path = tmp_path / "deci.q4_k_m.gguf"
    rep = export_gguf(m, path, "q4_k_m", tokenizer=tok, n_threads=1)
    assert rep["architecture"] == "deci"
    types = stored(path)
    assert types["blk.0.attn_output.weight"][1] == [128, 256] and types["blk.1.ffn_down.weight"][1] == [320, 256]
    narrow = sorted(n for n, (_, shape) in types.items() if len(shape) == 2 and shape[0] % 256)
    assert narrow == ["blk.0.attn_output.weight", "blk.1.ffn_down.weight"]
    assert sorted(f["tensor"] for f in rep["fallbacks"]) == narrow and rep["fallback_count"] == 2
    by_name = {f["tensor"]: f for f in rep["fallbacks"]}
    # llama.cpp's demotions: q4_k -> q5_0, and (layer 1 of 2 takes more bits) q6_k -> q8_0
    assert by_name["blk.0.attn_output.weight"] == {"tensor": "blk.0.attn_output.weight", "wanted": "q4_k",
                                                   "stored": "q5_0"}
    assert by_name["blk.1.ffn_down.weight"] == {"tensor": "blk.1.ffn_down.weight", "wanted": "q4_k|q6_k",
                                                "stored": "q8_0"}
    wins = windows(tok, 2, 32)
    assert abs(llamacpp_perplexity(path, wins, n_threads=1)["ppl"] / torch_perplexity(m, wins)["ppl"] - 1) < 3e-2


@pytest.mark.parametrize("outtype", ["q4_k_m", "q4_0"])
def test_narrow_model_falls_back_everywhere_for_k_quants(tok, tmp_path, outtype, one_thread):
    """Hidden 64 (tied embeddings, 40-wide FFN in one layer): no row is a multiple of 256, so every
    k-quant falls back; q4_0 (block 32) falls back only for the 40-wide ffn_down and for the tied
    embedding, which llama.cpp wants q6_k as the output matrix."""
    pytest.importorskip("llama_cpp")
    m = llama(tok, 64, 96, layers=3, tied=True)
    ad = get_adapter(m)
    ad.prune_ffn_channels(1, range(40))  # keeps 40: not a multiple of 32 either
    path = tmp_path / f"narrow.{outtype}.gguf"
    rep = export_gguf(m, path, outtype, tokenizer=tok, n_threads=1)
    types = stored(path)
    matrices = sorted(n for n, (_, shape) in types.items() if len(shape) == 2)
    fell = {f["tensor"]: f["stored"] for f in rep["fallbacks"]}
    if outtype == "q4_k_m":
        assert sorted(fell) == matrices
    else:
        assert sorted(fell) == ["blk.1.ffn_down.weight", "token_embd.weight"]
        assert fell["token_embd.weight"] == "q8_0"
    assert fell["blk.1.ffn_down.weight"] == "f16"  # 40 columns: not even a 32-block type fits


# ---- bits per weight, by hand ------------------------------------------------------------------------
def _param_split(m):
    mats = [p for p in m.parameters() if p.dim() == 2]
    vecs = [p for p in m.parameters() if p.dim() == 1]
    return mats, vecs


def test_bits_per_weight_by_hand(tok, tmp_path):
    """f16: 16 bits per matrix weight, 32 per norm weight. q8_0: blocks of 32 weights in 34 bytes
    (8.5 bits) where a row is a multiple of 32, f16 where it is not (the 40-wide ffn_down)."""
    m = llama(tok, 64, 96, layers=3, tied=True)
    get_adapter(m).prune_ffn_channels(1, range(40))
    mats, vecs = _param_split(m)  # tied: the embedding is counted once
    n_mat, n_vec = sum(p.numel() for p in mats), sum(p.numel() for p in vecs)
    rep = export_gguf(m, tmp_path / "m.f16.gguf", "f16", tokenizer=tok)
    assert rep["weights"] == n_mat + n_vec
    assert rep["bits_per_weight"] == pytest.approx((16 * n_mat + 32 * n_vec) / (n_mat + n_vec), rel=1e-12)
    rep = export_gguf(m, tmp_path / "m.q8_0.gguf", "q8_0", tokenizer=tok)
    bits = sum(p.numel() * (8.5 if p.shape[1] % 32 == 0 else 16) for p in mats) + 32 * n_vec
    assert rep["bits_per_weight"] == pytest.approx(bits / (n_mat + n_vec), rel=1e-12)
    assert rep["fallbacks"] == [{"tensor": "blk.1.ffn_down.weight", "wanted": "q8_0", "stored": "f16"}]
    assert 8.5 < rep["bits_per_weight"] < 16


# ---- perplexity in llama.cpp = PyTorch's -------------------------------------------------------------
def test_llamacpp_perplexity_matches_pytorch_on_f32(tok, tmp_path, one_thread):
    """Same windows, same convention (first token of each window only context): within 1e-3 relative,
    and the PyTorch side is fedprune.evaluate's own perplexity."""
    pytest.importorskip("llama_cpp")
    from fedprune.evaluate.perplexity import perplexity_of_tokens

    m = deci_256(tok)
    export_gguf(m, tmp_path / "m.f32.gguf", "f32", tokenizer=tok)
    wins = windows(tok, 3, 48)
    ref = perplexity_of_tokens(m, wins.reshape(-1), 48, progress=False)
    got = llamacpp_perplexity(tmp_path / "m.f32.gguf", wins.tolist(), n_threads=1)
    assert (got["windows"], got["tokens"]) == (3, 3 * 47) == (ref["windows"], ref["tokens"])
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-3)
    assert got["nll_mean"] == pytest.approx(ref["nll"], rel=1e-3)
    assert torch_perplexity(m, wins)["ppl"] == pytest.approx(ref["ppl"], rel=1e-9)
    # llama.cpp's argmax per scored position: on an f32 file, PyTorch's own argmax (allowing a near-tie or two)
    top1 = llamacpp_perplexity(tmp_path / "m.f32.gguf", wins.tolist(), n_threads=1, return_top1=True)["top1"]
    with torch.no_grad():
        want = m(input_ids=wins).logits[:, :-1].argmax(-1)
    assert [len(t) for t in top1] == [47, 47, 47]
    assert (torch.tensor(top1) == want).float().mean() >= 0.97
    # a window scored on its own: prefixing the windows with other text would change the figure
    shifted = llamacpp_perplexity(tmp_path / "m.f32.gguf", [w[1:] for w in wins.tolist()], n_threads=1)
    assert shifted["tokens"] == 3 * 46 and shifted["ppl"] != pytest.approx(got["ppl"], rel=1e-6)


def test_verify_reports_perplexities(tok, tmp_path, one_thread):
    pytest.importorskip("llama_cpp")
    from fedprune.deploy import verify_gguf

    m = deci_256(tok)
    export_gguf(m, tmp_path / "m.q4_k_m.gguf", "q4_k_m", tokenizer=tok, n_threads=1)
    wins = windows(tok, 2, 32)
    rep = verify_gguf(m, tmp_path / "m.q4_k_m.gguf", wins[0].tolist(), n_threads=1, ppl_windows=wins)
    assert rep["ppl_windows"] == 2 and rep["ppl_tokens"] == 62
    assert rep["torch_ppl"] == pytest.approx(torch_perplexity(m, wins)["ppl"], rel=1e-9)
    assert rep["ppl_rel_diff"] == pytest.approx(rep["llamacpp_ppl"] / rep["torch_ppl"] - 1, abs=1e-12)
    assert 0 <= rep["top1_agreement"] <= 1 and rep["positions"] == 32


# ---- command line ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory):
    """A hidden-256 model saved with a tokenizer that puts a BOS in front (the window convention must
    treat it the same on both sides)."""
    import fedprune
    from fedprune.data.toy_tokenizer import toy_tokenizer

    t = toy_tokenizer(add_bos=True)
    d = tmp_path_factory.mktemp("bosmodel") / "m"
    fedprune.save_model(llama(t, 256, 256), d, tokenizer=t)
    return d


def test_cli_eval_backend_llamacpp_matches_pytorch(bos_model_dir, tmp_path, capsys, one_thread):
    pytest.importorskip("llama_cpp")
    from fedprune.cli import main

    text = tmp_path / "corpus.txt"
    text.write_text(("The quick brown fox jumps over the lazy dog. Question: is it 42?\nAnswer: yes.\n\n") * 20)
    gg = tmp_path / "m.f32.gguf"
    assert main(["export", "--model", str(bos_model_dir), "--outtype", "f32", "--output", str(gg)]) == 0
    common = ["--tasks", f"text:{text}", "--seq-len", "64", "--limit", "4"]
    assert main(["eval", "--model", str(gg), "--backend", "llama.cpp", "--threads", "1", *common,
                 "--output", str(tmp_path / "lc.json")]) == 0
    assert main(["eval", "--model", str(bos_model_dir), *common, "--output", str(tmp_path / "pt.json")]) == 0
    lc, pt = (json.loads((tmp_path / f).read_text()) for f in ("lc.json", "pt.json"))
    task = f"text:{text}"
    assert lc["complete"] and lc["settings"]["backend"] == "llama.cpp" and lc["settings"]["dtype"] == "f32"
    assert set(lc) == set(pt) and set(lc["settings"]) >= set(pt["settings"]) and lc["average"] is None
    assert lc["settings"]["counts"] == pt["settings"]["counts"] == {task: 4}
    assert lc["results"][task]["ppl"] == pytest.approx(pt["results"][task]["ppl"], rel=1e-3)


def test_cli_eval_backend_llamacpp_refuses_by_name(bos_model_dir, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    from fedprune.cli import main

    assert main(["eval", "--model", str(tmp_path / "x.gguf"), "--backend", "llama.cpp",
                 "--tasks", "wikitext2,piqa,boolq"]) == 1
    assert "zero-shot tasks piqa, boolq run with --backend torch" in capsys.readouterr().err
    assert main(["eval", "--model", str(bos_model_dir), "--backend", "llama.cpp", "--tasks", "wikitext2"]) == 1
    assert f"runs a .gguf file; --model {bos_model_dir} is not one" in capsys.readouterr().err


def test_cli_export_q4_k_m_with_verify(bos_model_dir, tmp_path, capsys, one_thread):
    pytest.importorskip("llama_cpp")
    from fedprune.cli import main

    out = tmp_path / "m.q4_k_m.gguf"
    assert main(["export", "--model", str(bos_model_dir), "--outtype", "q4_k_m", "--output", str(out),
                 "--threads", "1", "--verify", "32", "--verify-ppl-windows", "2", "--verify-seq-len", "32"]) == 0
    text = capsys.readouterr().out
    export_rep, verify_rep = (json.loads(part) for part in _json_objects(text))
    assert export_rep["outtype"] == "q4_k_m" and export_rep["fallback_count"] == 0
    assert set(export_rep["tensor_types"]) == {"f32", "q4_k", "q6_k"}
    assert verify_rep["outtype"] == "q4_k_m" and verify_rep["positions"] == 32
    assert verify_rep["ppl_windows"] == 2 and verify_rep["ppl_seq_len"] == 32 and verify_rep["ppl_tokens"] == 62
    assert verify_rep["tokenizer_match"]
    assert abs(verify_rep["llamacpp_ppl"] / verify_rep["torch_ppl"] - 1) < 3e-2


def _json_objects(text: str) -> list[str]:
    """The top-level JSON objects printed one after the other (indented, each closing with a lone '}')."""
    parts, cur = [], []
    for line in text.splitlines():
        if line == "{":
            cur = [line]
        elif cur:
            cur.append(line)
            if line == "}":
                parts.append("\n".join(cur))
                cur = []
    return parts


# ---- extras: the error names the one to install ---------------------------------------------------------
def test_missing_llama_cpp_names_the_deploy_extra(tok, tmp_path, monkeypatch):
    from fedprune.extras import MissingExtraError

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    m = llama(tok, 64, 96)
    with pytest.raises(MissingExtraError, match=r"pip install 'fedprune\[deploy\]'"):
        export_gguf(m, tmp_path / "m.gguf", "q4_k_m", tokenizer=tok)
    assert not list(tmp_path.iterdir())  # refused before writing anything
    rep = export_gguf(m, tmp_path / "m.gguf", "f16", tokenizer=tok)  # f16 needs only gguf
    assert rep["tensor_types"]["f16"] > 0
    from fedprune.deploy.llamacpp import load_gguf

    with pytest.raises(ImportError, match=r"llama-cpp-python, which is not installed: pip install 'fedprune\[deploy\]'"):
        load_gguf(tmp_path / "m.gguf")


def test_missing_lm_eval_names_the_eval_extra(monkeypatch):
    from fedprune.evaluate.lm_eval_bridge import lm_eval_task
    from fedprune.extras import MissingExtraError

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MissingExtraError, match=r"lm-eval, which is not installed: pip install 'fedprune\[eval\]'"):
        lm_eval_task("piqa", [])


# ---- the real model ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.real_model
def test_real_smollm2_q4_k_m_verify(tmp_path, capsys):
    """SmolLM2-135M to q4_k_m through the CLI, --verify 256 (8 perplexity windows of 256 tokens): observed
    top-1 agreement 0.875 with the float32 PyTorch model, perplexity 42.14 against 39.97 (+5.4 %); 181 of
    the 211 weight matrices fall back (576-wide rows: q4_k -> q5_0, q6_k -> q8_0), 6.17 bits per weight."""
    pytest.importorskip("llama_cpp")
    from fedprune.cli import main

    out = tmp_path / "s.q4_k_m.gguf"
    assert main(["export", "--model", "smollm2-135m", "--outtype", "q4_k_m", "--output", str(out), "--threads", "2",
                 "--verify", "256"]) == 0
    export_rep, verify_rep = (json.loads(p) for p in _json_objects(capsys.readouterr().out))
    assert export_rep["architecture"] == "llama" and 5.5 < export_rep["bits_per_weight"] < 7
    # every matrix whose rows (576 wide) are not a multiple of 256 falls back; the 1536-wide ffn_down do not
    assert {f["tensor"].split(".")[-2] for f in export_rep["fallbacks"]} == {
        "token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"}
    assert export_rep["fallback_count"] == 181
    assert verify_rep["tokenizer_match"] and verify_rep["positions"] == 256 and verify_rep["ppl_windows"] == 8
    assert verify_rep["top1_agreement"] >= 0.8, verify_rep
    assert 0 < verify_rep["ppl_rel_diff"] < 0.1, verify_rep
