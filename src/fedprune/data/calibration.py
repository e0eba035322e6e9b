"""Calibration batches: random token windows from a corpus, drawn with a fixed seed.

Calibration text must not overlap the evaluation text, so ``wikitext2`` and ``ptb`` are
read from a non-test split here: WikiText-2 train when ``wikitext-2-raw/wiki.train.raw`` is
in the data directory, otherwise the validation split (the shared data has only the
tokenized form, ``wikitext-2-tokenized/valid.txt``, with rare words as ``<unk>``); PTB
validation. ``c4`` is the C4 sample, which no evaluation task uses.
"""
from __future__ import annotations

import logging
import os

import torch

from ..options import require_int
from .catalog import resolve_root
from .text import load_text

log = logging.getLogger(__name__)


def calibration_corpus(corpus: str, data_dir: str | os.PathLike | None = None) -> str:
    """The dataset actually read for calibration corpus ``corpus`` (never a test split)."""
    if corpus == "wikitext2":
        root = resolve_root(data_dir)
        if (root / "wikitext-2-raw/wiki.train.raw").is_file() or not (root / "wikitext-2-tokenized/valid.txt").is_file():
            return "wikitext2-train"
        return "wikitext2-valid"
    if corpus == "ptb":
        return "ptb-valid"
    return corpus


def tokenize_corpus(tokenizer, text: str) -> torch.Tensor:
    """All tokens of ``text`` without special tokens: LongTensor [num_tokens]."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(tokens: torch.Tensor, nsamples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows of ``seq_len`` tokens at seeded random offsets.

    tokens: LongTensor [num_tokens]. Returns LongTensor [nsamples, seq_len].
    """
    if tokens.numel() < seq_len:
        raise ValueError(f"the corpus has {tokens.numel()} tokens, fewer than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (nsamples,), generator=gen)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def calibration_samples(tokenizer, corpus: str = "c4", nsamples: int = 128, seq_len: int = 512, seed: int = 0,
                        data_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """Seeded random windows of the tokenized calibration corpus: LongTensor [nsamples, seq_len].

    corpus: ``c4``, ``wikitext2`` (train, else validation; never test), ``ptb`` (validation),
    any registered text dataset or ``text:PATH``.
    """
    require_int("nsamples", nsamples, 1)
    require_int("seq_len", seq_len, 2)
    name = calibration_corpus(corpus, data_dir)
    log.info("calibration: %d x %d tokens from %s (seed %d)", nsamples, seq_len, name, seed)
    return random_windows(tokenize_corpus(tokenizer, load_text(name, data_dir)), nsamples, seq_len, seed)
