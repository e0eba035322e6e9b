"""Loading GGUF files with llama-cpp-python (an optional dependency, built from source)."""
from __future__ import annotations

import os


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise RuntimeError(
            "running GGUF files needs llama-cpp-python (pip install llama-cpp-python; it builds llama.cpp "
            "from source, ~10 minutes on 2 cores, then pip's wheel cache reuses it)") from exc
    return llama_cpp


def load_gguf(path: str | os.PathLike, n_ctx: int = 2048, logits_all: bool = False, n_threads: int | None = None,
              n_batch: int = 512, seed: int = 0):
    """A ``llama_cpp.Llama`` for ``path`` on the CPU, quiet."""
    llama_cpp = require_llama_cpp()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, n_threads=n_threads,
                           n_batch=n_batch, n_ubatch=n_batch, n_gpu_layers=0, seed=seed, verbose=False)
