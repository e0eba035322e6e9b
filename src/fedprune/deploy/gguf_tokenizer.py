"""The tokenizer part of a GGUF file, for GPT-2-style byte-level BPE tokenizers (SmolLM2 & co).

llama.cpp's ``gpt2`` tokenizer model takes the token strings in byte-level form (``Ġthe``),
the merges as ``"a b"`` strings, one type per token (normal / control / user-defined /
unused), the special ids, and a *pre-tokenizer* name that selects the splitting regex.
SentencePiece tokenizers (LLaMA-2 style) are not handled here and are refused.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from .errors import UnsupportedModelError

# llama.cpp token types (llama_token_type / gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5


@dataclass
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, pad, unk
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


# Vocabularies whose pre-tokenizer cannot be read off a re-built tokenizer, by the sha256 of the
# token strings in id order. SmolLM/SmolLM2 (HuggingFaceTB, 49152 tokens): the original tokenizer
# splits digits one by one (llama.cpp "smollm", which also keeps spaces on decode), but
# transformers' GGUF loader rebuilds it as a plain ByteLevel tokenizer. The ids agree either way
# (the vocabulary has no multi-digit or space+digit tokens); the decode differs.
KNOWN_VOCABS = {"d1f2ce856b324081b621d9e2e8dbd22879f462329f3fd4aa39fa758dddb2ce55": "smollm"}


def vocab_fingerprint(vocab: dict[str, int]) -> str:
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()


def _has(node, type_name: str, **attrs) -> bool:
    """Whether a tokenizer.json pre_tokenizer tree contains a node of ``type_name`` with ``attrs``."""
    if isinstance(node, dict):
        if node.get("type") == type_name and all(node.get(k) == v for k, v in attrs.items()):
            return True
        return any(_has(v, type_name, **attrs) for v in node.values())
    if isinstance(node, list):
        return any(_has(v, type_name, **attrs) for v in node)
    return False


def detect_pre(pre_tokenizer: dict | None) -> str:
    """llama.cpp pre-tokenizer name for a byte-level BPE ``pre_tokenizer`` (tokenizer.json form).

    Plain ByteLevel with the GPT-2 regex -> ``gpt-2``; digits split one by one before ByteLevel
    (SmolLM's original tokenizer) -> ``smollm``. Anything else is refused: a wrong regex
    silently changes token ids, so the caller must name it (``tokenizer_pre=``).
    """
    if not _has(pre_tokenizer, "ByteLevel"):
        raise UnsupportedModelError(
            "tokenizer is not a byte-level BPE (GPT-2 style); only those are exported to GGUF here")
    node_types = set()

    def collect(n):
        if isinstance(n, dict):
            if "type" in n:
                node_types.add(n["type"])
            for v in n.values():
                collect(v)
        elif isinstance(n, list):
            for v in n:
                collect(v)

    collect(pre_tokenizer)
    node_types -= {"Sequence", "ByteLevel"}
    if not node_types and _has(pre_tokenizer, "ByteLevel", use_regex=True):
        return "gpt-2"
    if node_types == {"Digits"} and _has(pre_tokenizer, "Digits", individual_digits=True):
        return "smollm"
    raise UnsupportedModelError(
        f"cannot tell llama.cpp's pre-tokenizer for this tokenizer (pre_tokenizer nodes {sorted(node_types)}); "
        "pass tokenizer_pre= (e.g. 'gpt-2', 'smollm', 'llama-bpe') explicitly")


def gguf_vocab(tokenizer, vocab_size: int, tokenizer_pre: str | None = None) -> GGUFVocab:
    """Collect the GGUF tokenizer fields from a Hugging Face fast tokenizer.

    ``vocab_size`` is the embedding's row count: ids the tokenizer does not use are padded
    with unused ``[PAD{i}]`` tokens so the token list matches the embedding, as llama.cpp needs.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedModelError("GGUF export needs a fast (tokenizers-backed) Hugging Face tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"tokenizer model {model.get('type')!r} is not BPE; only byte-level BPE is exported")
    pre = tokenizer_pre or KNOWN_VOCABS.get(vocab_fingerprint(model["vocab"])) or detect_pre(spec.get("pre_tokenizer"))

    id_to_token: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    specials: dict[int, bool] = {}
    for added in spec.get("added_tokens", []):
        id_to_token[int(added["id"])] = added["content"]
        specials[int(added["id"])] = bool(added.get("special"))
    n = max(id_to_token) + 1
    if n > vocab_size:
        raise UnsupportedModelError(f"tokenizer has ids up to {n - 1} but the embedding has only {vocab_size} rows")

    tokens, types = [], []
    for i in range(vocab_size):
        if i not in id_to_token:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(id_to_token[i])
            types.append(NORMAL if i not in specials else (CONTROL if specials[i] else USER_DEFINED))

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {}
    for key in ("bos", "eos", "pad", "unk"):
        tid = getattr(tokenizer, f"{key}_token_id", None)
        if tid is not None:
            ids[key] = int(tid)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    add_bos = bool(ids.get("bos") is not None and probe[:1] == [ids["bos"]])
    add_eos = bool(ids.get("eos") is not None and len(probe) > 1 and probe[-1] == ids["eos"])
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: keep the default one
        template = template.get("default") or next(iter(template.values()), None)
    return GGUFVocab(tokens, types, merges, pre, ids, add_bos, add_eos, template)
