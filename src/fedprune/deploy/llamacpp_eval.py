"""Perplexity of a GGUF file computed by llama.cpp (``fedprune eval --backend llama.cpp``).

The text is tokenized by the tokenizer stored in the file (llama.cpp's, with the file's default
special tokens: the ids the Hugging Face tokenizer gives), cut into the windows of
:func:`fedprune.evaluate.perplexity.windows`, and scored by
:func:`fedprune.deploy.verify.llamacpp_perplexity` (each window on its own, its first token as
context). The result has the shape of :func:`fedprune.evaluate.evaluate`'s. Zero-shot tasks are
not run through llama.cpp: they are refused by name.

llama.cpp's tokenizer is the deployed one, not necessarily token for token the Hugging Face one:
for SmolLM2 on the WikiText-2 test text the ids agree for the first 66,556 tokens, then a run of
spaces and newlines is split differently (304,978 tokens in all against 304,986), so windows past
that point start a few tokens apart. For figures on identical windows, tokenize once and pass the
windows to :func:`fedprune.deploy.verify.llamacpp_perplexity` and ``torch_perplexity``.
"""
from __future__ import annotations

import os
import time
from types import SimpleNamespace
from typing import Callable, Iterable

from .llamacpp import llamacpp_tokenize, require_llama_cpp
from .verify import llamacpp_perplexity


def gguf_metadata(path: str | os.PathLike) -> dict:
    """``architecture``, ``context_length`` (None if absent) and ``file_type`` (e.g. ``q4_k_m``) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    ftype = field("general.file_type")
    try:
        kind = gguf.LlamaFileType(ftype).name.lower().removeprefix("mostly_").removeprefix("all_")
    except ValueError:
        kind = None if ftype is None else f"file_type {ftype}"
    return {"architecture": arch, "context_length": field(f"{arch}.context_length"), "file_type": kind}


def check_llamacpp_tasks(tasks: Iterable[str]) -> None:
    """Refuse the tasks that are not perplexity tasks, naming them."""
    from ..evaluate import reported_metric

    zero_shot = [t for t in tasks if reported_metric(t) != "ppl"]
    if zero_shot:
        raise ValueError(f"--backend llama.cpp evaluates perplexity tasks only (wikitext2, ptb, c4, text:PATH); "
                         f"zero-shot task{'s' if len(zero_shot) > 1 else ''} {', '.join(zero_shot)} "
                         "run with --backend torch (which de-quantises the .gguf file)")


def evaluate_gguf(gguf_file: str | os.PathLike, tasks: str | Iterable[str] = ("wikitext2",), seq_len: int = 512,
                  limit: int | None = None, data_dir: str | os.PathLike | None = None, n_threads: int | None = None,
                  name: str | None = None, on_result: Callable[[dict], None] | None = None) -> dict:
    """Perplexity of ``gguf_file`` on each task through llama.cpp; the dict of
    :func:`fedprune.evaluate.evaluate` (``settings`` adds ``backend`` and ``threads``; ``dtype`` is the
    file's type, e.g. ``q4_k_m``). ``limit``: the first N windows of each task."""
    from ..data import load_text, resolve_root
    from ..evaluate import parse_tasks
    from ..evaluate.perplexity import check_perplexity_args, windows
    from ..models.loading import check_context

    require_llama_cpp("--backend llama.cpp")
    names = parse_tasks(tasks)
    check_llamacpp_tasks(names)
    check_perplexity_args(seq_len, limit, 1)
    if not os.path.isfile(gguf_file):
        raise FileNotFoundError(f"GGUF file not found: {gguf_file}")
    meta = gguf_metadata(gguf_file)
    if meta["context_length"]:
        check_context(SimpleNamespace(max_position_embeddings=int(meta["context_length"])), seq_len, "--seq-len",
                      str(gguf_file))
    import torch

    out = {
        "model": name or str(gguf_file),
        "settings": {"tasks": names, "seq_len": seq_len, "limit": limit, "batch_size": None, "ppl_batch_size": 1,
                     "scoring": None,
                     "dtype": meta["file_type"], "device": "cpu", "add_bos_token": None,
                     "data_dir": str(resolve_root(data_dir)), "backend": "llama.cpp", "threads": n_threads,
                     "counts": {}, "seconds": {}},
        "results": {},
        "average": None,
    }
    for task in names:
        start = time.perf_counter()
        ids = torch.tensor(llamacpp_tokenize(gguf_file, load_text(task, data_dir)), dtype=torch.long)
        try:
            wins = windows(ids, seq_len, limit)
        except ValueError as exc:
            raise ValueError(f"task {task}: {exc}") from exc
        d = llamacpp_perplexity(gguf_file, wins, n_threads)
        out["results"][task] = {"ppl": d["ppl"]}
        out["settings"]["counts"][task] = d["windows"]
        out["settings"]["seconds"][task] = round(time.perf_counter() - start, 2)
        if on_result is not None:
            on_result(out)
    return out
