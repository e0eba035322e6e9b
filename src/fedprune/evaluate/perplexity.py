"""Perplexity over non-overlapping windows (the GPTQ / SparseGPT / Wanda / SliceGPT protocol).

The corpus is tokenized once (with the tokenizer's default special tokens, i.e. at most one
BOS at the very start), cut into ``len // seq_len`` non-overlapping windows (the last partial
window is dropped), and every window is scored on its own: the model predicts tokens 2..seq_len
of the window from the ones before. Perplexity = exp(mean token NLL) over all predicted tokens,
which equals exp(mean of the per-window mean NLLs) since every window predicts ``seq_len - 1``
tokens. ``limit`` keeps the first N windows.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..options import require_int


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole corpus: LongTensor [num_tokens]."""
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def windows(tokens: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows: tokens [num_tokens] -> LongTensor [num_windows, seq_len]."""
    n = tokens.numel() // seq_len
    if limit is not None:
        n = min(n, int(limit))
    if n < 1:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than one window of seq_len={seq_len}")
    return tokens[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def window_nll(model, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window: batch [B, seq_len] -> float64 [B] (seq_len - 1 tokens each)."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    logits = model(input_ids=batch).logits[:, :-1].float()  # [B, seq_len - 1, V]
    # Flatten to [B * (seq_len - 1), V]: cross_entropy over a transposed [B, V, T] view takes
    # a less precise path on CPU (about 1e-4 nats per token off a log_softmax + gather).
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
    return nll.view(batch.shape[0], -1).double().sum(dim=1).cpu()


def check_perplexity_args(seq_len: int, limit: int | None, batch_size: int) -> None:
    """Ranges of the perplexity settings (a window predicts ``seq_len - 1`` tokens, so >= 2)."""
    require_int("seq_len", seq_len, 2)
    if limit is not None:
        require_int("limit", limit, 1)
    require_int("batch_size", batch_size, 1)


def perplexity_of_tokens(model, tokens: torch.Tensor, seq_len: int = 512, limit: int | None = None,
                         batch_size: int = 1, progress: bool = True, desc: str = "perplexity") -> dict:
    """Perplexity of a token stream [num_tokens]; returns ``{"ppl", "nll", "windows", "tokens"}``.

    seq_len must fit the model's context: beyond ``max_position_embeddings`` a model still
    runs, on positions it never saw, and the figure means nothing.
    """
    check_perplexity_args(seq_len, limit, batch_size)
    wins = windows(tokens, seq_len, limit)
    config = getattr(model, "config", None)
    if config is not None:
        from ..models.loading import check_context

        check_context(config, seq_len, "seq_len")
    total = torch.zeros((), dtype=torch.float64)
    for start in tqdm(range(0, wins.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        total += window_nll(model, wins[start:start + batch_size]).sum()
    predicted = wins.shape[0] * (seq_len - 1)
    mean_nll = float(total) / predicted
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "windows": wins.shape[0], "tokens": predicted}


def perplexity(model, tokenizer, dataset: str = "wikitext2", seq_len: int = 512, limit: int | None = None,
               batch_size: int = 1, data_dir: str | os.PathLike | None = None, progress: bool = True) -> float:
    """Perplexity of ``model`` on a text dataset (``wikitext2``, ``ptb``, ``c4``, ``text:PATH``).

    Non-overlapping windows of ``seq_len`` tokens; ``limit`` = first N windows; batch_size
    windows per forward pass. Returns exp(mean token NLL).
    """
    return perplexity_details(model, tokenizer, dataset, seq_len, limit, batch_size, data_dir, progress)["ppl"]


def perplexity_details(model, tokenizer, dataset: str = "wikitext2", seq_len: int = 512, limit: int | None = None,
                       batch_size: int = 1, data_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Like :func:`perplexity` but returns ``{"ppl", "nll", "windows", "tokens"}``."""
    from ..data import load_text

    check_perplexity_args(seq_len, limit, batch_size)
    tokens = tokenize_text(tokenizer, load_text(dataset, data_dir))
    return perplexity_of_tokens(model, tokens, seq_len, limit, batch_size, progress, desc=dataset)
