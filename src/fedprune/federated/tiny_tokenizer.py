"""A tiny byte-level BPE tokenizer trained on the Dolly held-out records, for fast tests.

A tiny random model with SmolLM2's 49k vocabulary spends most of its time in the LM head;
with this tokenizer (a few hundred tokens) runtime tests take seconds. Deterministic.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=4)
def tiny_bpe_tokenizer(vocab_size: int = 320, data_dir: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .partition import format_prompt, load_test_set

    texts = [format_prompt(r) + r["response"] for r in load_test_set(data_dir)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return fast
