"""A small byte-level BPE tokenizer built in-process, for tests and docs (no download, no cache).

It pairs with ``fedprune.models.tiny.tiny_model(vocab_size=len(tokenizer))``. Byte-level
means every string encodes; the BPE merges learnt from ``texts`` make words span several
bytes, so context/continuation boundaries behave like a real tokenizer's (a leading space
merges into the next word). ``add_bos=True`` makes it prepend ``<s>`` like Llama-2's.
"""
from __future__ import annotations

DEFAULT_TEXT = (
    "Question: What do plants need to grow?\nAnswer: Plants need water, light and air. "
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times. "
    "A man is sitting on a roof. He starts pulling up roofing on a roof. "
    "Is the answer yes or no? The answer is no. The answer is yes. "
)


def train_byte_level_bpe(texts: list[str], vocab_size: int, special_tokens: list[str]):
    """A ``tokenizers.Tokenizer``: byte-level BPE trained on ``texts`` (deterministic, no download).

    The one builder behind :func:`toy_tokenizer` and the federated tests' ``tiny_bpe_tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(list(texts), trainer=trainer)
    return tk


def toy_tokenizer(texts: list[str] | None = None, vocab_size: int = 512, add_bos: bool = False):
    """A ``PreTrainedTokenizerFast`` trained on ``texts`` (a fixed text when None); deterministic."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tk = train_byte_level_bpe(list(texts) if texts else [DEFAULT_TEXT], vocab_size, ["<pad>", "<s>", "</s>"])
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                          special_tokens=[("<s>", tk.token_to_id("<s>"))])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
