"""Check an exported GGUF file against the PyTorch model it came from, in llama.cpp itself.

Nothing the exporter wrote is trusted: the file is loaded by llama.cpp, fed the same token
ids as the PyTorch model, and the next-token logits at every position are compared.
"""
from __future__ import annotations

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
                text: str | None = None, n_threads: int | None = None) -> dict[str, Any]:
    """Compare ``model``'s next-token logits on ``token_ids`` with llama.cpp's from ``gguf_file``.

    Returns :func:`compare_logits`'s report; with ``tokenizer`` and ``text`` it also checks that
    llama.cpp tokenizes ``text`` to the same ids as the Hugging Face tokenizer
    (``tokenizer_match``, ``tokenizer_first_diff``).
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
    return report
