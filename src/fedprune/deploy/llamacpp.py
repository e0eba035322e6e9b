"""Loading GGUF files with llama-cpp-python (the ``deploy`` extra, built from source)."""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from typing import Iterator

log = logging.getLogger(__name__)


def require_llama_cpp(purpose: str = "running GGUF files"):
    """The ``llama_cpp`` module, or :class:`fedprune.extras.MissingExtraError` naming the ``deploy`` extra."""
    from ..extras import require

    return require("llama_cpp", purpose)


def load_gguf(path: str | os.PathLike, n_ctx: int = 2048, logits_all: bool = False, n_threads: int | None = None,
              n_batch: int = 512, seed: int = 0, vocab_only: bool = False):
    """A ``llama_cpp.Llama`` for ``path`` on the CPU, quiet (llama.cpp's loading log goes to the debug log).
    ``vocab_only``: the tokenizer alone, no weights."""
    llama_cpp = require_llama_cpp()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with captured_llama_log(llama_cpp) as lines:
        try:
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, n_threads=n_threads,
                                  n_batch=n_batch, n_ubatch=n_batch, n_gpu_layers=0, seed=seed, verbose=False,
                                  vocab_only=vocab_only)
        except ValueError as exc:
            said = " | ".join(x.strip() for x in "".join(lines).splitlines() if "error" in x.lower())
            raise ValueError(f"llama.cpp could not load {path}: {exc}{'; ' + said if said else ''}") from exc
    log.debug("llama.cpp loading %s:\n%s", path, "".join(lines))
    return llm


def llamacpp_tokenize(path: str | os.PathLike, text: str) -> list[int]:
    """Token ids of ``text`` by the tokenizer stored in the GGUF file, with the file's default special
    tokens (a BOS in front when its ``add_bos_token`` says so), special-token text parsed as such: the
    ids ``tokenizer(text)["input_ids"]`` gives for the Hugging Face tokenizer the file was written from."""
    llm = load_gguf(path, vocab_only=True)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    finally:
        llm.close()


# llama.cpp's quantizer: fedprune outtype -> llama_ftype constant of llama_cpp
QUANTIZER_FTYPES = {"q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


_captors: list = []  # the ctypes callbacks handed to llama.cpp, kept alive here


@contextlib.contextmanager
def captured_llama_log(llama_cpp) -> Iterator[list[str]]:
    """Within the block llama.cpp's log goes into the yielded list instead of stderr; llama-cpp-python's
    own forwarder is put back afterwards. (Its forwarder cannot filter warnings: it maps ggml's log
    levels by an older numbering, in which today's WARN reads as ERROR.)"""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def captor(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    _captors.append(captor)
    llama_cpp.llama_log_set(captor, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        try:
            from llama_cpp import _logger
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
            _captors.remove(captor)
        except (ImportError, AttributeError):  # keep ours (alive in _captors) rather than a dangling one
            pass


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, outtype: str, n_threads: int | None = None) -> None:
    """Quantize the GGUF file ``src`` (f16/f32 weights) to ``dst`` with llama.cpp's own quantizer
    (``llama_model_quantize``, default parameters: its tensor-type mix for ``outtype``, no importance
    matrix, ``output.weight`` quantized). Metadata (tokenizer, chat template) is copied."""
    if outtype not in QUANTIZER_FTYPES:
        raise ValueError(f"outtype {outtype!r} is not quantized by llama.cpp here; choose one of "
                         f"{', '.join(QUANTIZER_FTYPES)}")
    llama_cpp = require_llama_cpp(f"quantizing to {outtype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZER_FTYPES[outtype])
    params.nthread = int(n_threads) if n_threads else 0  # 0: all hardware threads
    with captured_llama_log(llama_cpp) as lines:
        rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    text = "".join(lines)
    log.debug("llama.cpp's quantizer:\n%s", text)
    if rc != 0:
        last = " | ".join(line.strip() for line in text.splitlines()[-4:] if line.strip())
        raise RuntimeError(f"llama.cpp's quantizer failed ({rc}) writing {outtype} from {src}: {last}")
