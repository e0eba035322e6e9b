"""Check an exported GGUF file against the PyTorch model it came from, in llama.cpp itself.

Nothing the exporter wrote is trusted: the file is loaded by llama.cpp, fed the same token
ids as the PyTorch model, and the next-token logits at every position are compared; on
perplexity windows, both sides' perplexities are computed by the same convention
(:mod:`fedprune.evaluate.perplexity`: every window scored on its own, its first token as context).
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
import torch

from .llamacpp import load_gguf


@torch.no_grad()
def torch_logits(model, token_ids: Sequence[int]) -> np.ndarray:
    """``[len(token_ids), vocab]`` float32 next-token logits of the PyTorch model."""
    ids = torch.as_tensor([list(token_ids)], dtype=torch.long, device=next(model.parameters()).device)
    return model(input_ids=ids).logits[0].float().cpu().numpy()


def llamacpp_logits(gguf_file: str | os.PathLike, token_ids: Sequence[int], n_threads: int | None = None) -> np.ndarray:
    """``[len(token_ids), vocab]`` next-token logits computed by llama.cpp from ``gguf_file``."""
    n = len(token_ids)
    llm = load_gguf(gguf_file, n_ctx=max(n, 8), logits_all=True, n_threads=n_threads, n_batch=max(n, 8))
    try:
        llm.eval(list(int(t) for t in token_ids))
        return np.array(llm.scores[:n], dtype=np.float32)
    finally:
        llm.close()


def _window_list(windows) -> list[list[int]]:
    """Windows as lists of ints; every window must hold at least 2 tokens (one predicted)."""
    wins = windows.tolist() if hasattr(windows, "tolist") else [list(w) for w in windows]
    if not wins:
        raise ValueError("no perplexity windows given")
    for i, w in enumerate(wins):
        if len(w) < 2:
            raise ValueError(f"perplexity window {i} has {len(w)} tokens; a window needs at least 2")
    return [[int(t) for t in w] for w in wins]


def nll_from_logits(logits: np.ndarray, targets: Sequence[int]) -> float:
    """Summed NLL (float64) of ``targets`` under ``[len(targets), vocab]`` next-token logits."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(-1, keepdims=True)
    logz = np.log(np.exp(x - top).sum(-1)) + top[:, 0]
    return float((logz - x[np.arange(x.shape[0]), np.asarray(targets)]).sum())


def llamacpp_perplexity(gguf_file: str | os.PathLike, windows, n_threads: int | None = None,
                        return_top1: bool = False) -> dict[str, Any]:
    """Perplexity of the GGUF model over token ``windows`` (a list of lists of ids, or a LongTensor
    ``[n, seq_len]``), from llama.cpp's own logits.

    The convention of :func:`fedprune.evaluate.perplexity.perplexity_of_tokens`: each window is scored
    on its own (a fresh KV cache, nothing before it; its first token is only context), predicting its
    tokens 2..len from the ones before; ``ppl = exp(nll_mean)``, ``nll_mean`` the mean NLL over all
    predicted tokens. Returns ``{"ppl", "nll_mean", "tokens", "windows"}``; with ``return_top1`` also
    ``"top1"``: per window, llama.cpp's argmax prediction at each scored position (for agreement checks).
    """
    wins = _window_list(windows)
    top1 = []
    longest = max(len(w) for w in wins)
    llm = load_gguf(gguf_file, n_ctx=max(longest, 8), logits_all=True, n_threads=n_threads, n_batch=max(longest, 8))
    try:
        total, predicted = 0.0, 0
        for w in wins:
            llm.reset()
            llm.eval(w)
            total += nll_from_logits(llm.scores[:len(w) - 1], w[1:])
            predicted += len(w) - 1
            if return_top1:
                top1.append(np.asarray(llm.scores[:len(w) - 1]).argmax(-1).tolist())
    finally:
        llm.close()
    nll_mean = total / predicted
    out = {"ppl": math.exp(nll_mean), "nll_mean": nll_mean, "tokens": predicted, "windows": len(wins)}
    if return_top1:
        out["top1"] = top1
    return out


@torch.no_grad()
def torch_perplexity(model, windows) -> dict[str, Any]:
    """:func:`llamacpp_perplexity`'s figure for a PyTorch model (fedprune.evaluate's ``window_nll``),
    same windows, same keys."""
    from ..evaluate.perplexity import window_nll

    wins = _window_list(windows)
    total, predicted = 0.0, 0
    for w in wins:  # windows may differ in length; one forward pass each
        total += float(window_nll(model, torch.tensor([w], dtype=torch.long)).sum())
        predicted += len(w) - 1
    nll_mean = total / predicted
    return {"ppl": math.exp(nll_mean), "nll_mean": nll_mean, "tokens": predicted, "windows": len(wins)}


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """Agreement of two ``[positions, vocab]`` logit arrays (``ref`` is the PyTorch side)."""
    if ref.shape != got.shape:
        raise ValueError(f"logit shapes differ: PyTorch {ref.shape}, llama.cpp {got.shape}")
    diff = np.abs(ref - got)
    top_ref, top_got = ref.argmax(-1), got.argmax(-1)
    agree = top_ref == top_got
    scale = np.abs(ref).max(-1)  # per position
    top2 = np.sort(ref, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]  # PyTorch's lead of its top-1 over its top-2
    cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1) + 1e-12)
    return {
        "positions": int(ref.shape[0]),
        "top1_agreement": float(agree.mean()),
        "top1_mismatch_positions": np.flatnonzero(~agree).tolist()[:20],
        # a flip where PyTorch's own top-2 are closer than the logit error is a near-tie, not a layout bug
        "top1_mismatch_margins": margin[~agree].tolist()[:20],
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_rel_diff": float((diff.max(-1) / np.maximum(scale, 1e-6)).max()),
        "min_cosine": float(cos.min()),
        "logit_range": float(ref.max() - ref.min()),
    }


def verify_gguf(model, gguf_file: str | os.PathLike, token_ids: Sequence[int], tokenizer=None,
                text: str | None = None, n_threads: int | None = None, ppl_windows=None) -> dict[str, Any]:
    """Compare ``model``'s next-token logits on ``token_ids`` with llama.cpp's from ``gguf_file``.

    Returns :func:`compare_logits`'s report; with ``tokenizer`` and ``text`` it also checks that
    llama.cpp tokenizes ``text`` to the same ids as the Hugging Face tokenizer
    (``tokenizer_match``, ``tokenizer_first_diff``). With ``ppl_windows`` (token windows, see
    :func:`llamacpp_perplexity`) it adds both perplexities on those windows: ``torch_ppl``,
    ``llamacpp_ppl``, ``ppl_rel_diff`` (llama.cpp / PyTorch - 1), ``ppl_windows``, ``ppl_tokens``.
    """
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    report = compare_logits(torch_logits(model, token_ids), llamacpp_logits(gguf_file, token_ids, n_threads))
    if tokenizer is not None and text is not None:
        hf = tokenizer(text, add_special_tokens=False)["input_ids"]
        llm = load_gguf(gguf_file, n_ctx=64, n_threads=n_threads)
        try:
            lc = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        finally:
            llm.close()
        first = next((i for i, (a, b) in enumerate(zip(hf, lc)) if a != b), None if len(hf) == len(lc) else min(len(hf), len(lc)))
        report.update(tokenizer_match=first is None, tokenizer_first_diff=first, tokenizer_tokens=len(hf))
    if ppl_windows is not None:
        ref = torch_perplexity(model, ppl_windows)
        got = llamacpp_perplexity(gguf_file, ppl_windows, n_threads)
        report.update(torch_ppl=ref["ppl"], llamacpp_ppl=got["ppl"], ppl_rel_diff=got["ppl"] / ref["ppl"] - 1.0,
                      ppl_windows=got["windows"], ppl_tokens=got["tokens"])
    return report
