"""A tiny byte-level BPE tokenizer trained on the Dolly held-out records, for fast tests.

A tiny random model with SmolLM2's 49k vocabulary spends most of its time in the LM head;
with this tokenizer (a few hundred tokens) runtime tests take seconds. Deterministic. Built by
the same byte-level BPE trainer as ``fedprune.data.toy_tokenizer``, on other texts.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=4)
def tiny_bpe_tokenizer(vocab_size: int = 320, data_dir: str | None = None):
    from transformers import PreTrainedTokenizerFast

    from ..data.toy_tokenizer import train_byte_level_bpe
    from .partition import format_prompt, load_test_set

    texts = [format_prompt(r) + r["response"] for r in load_test_set(data_dir)]
    tok = train_byte_level_bpe(texts, vocab_size, ["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
