"""Streaming text generation through PyTorch or llama.cpp, behind one small interface.

``open_backend(spec)`` returns a :class:`LlamaCppBackend` for a ``.gguf`` file and a
:class:`TorchBackend` for anything ``fedprune.load_model`` accepts. Both offer
``complete(prompt, ...)`` and ``chat(messages, ...)``, call ``on_text`` with each new piece
of text as it is produced, and return the whole generated text. Decoding is greedy unless
``temperature > 0``.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Protocol

OnText = Callable[[str], None]


def print_stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class Backend(Protocol):
    def complete(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
                 on_text: OnText | None = print_stream) -> str: ...

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int = 256, temperature: float = 0.0,
             on_text: OnText | None = print_stream) -> str: ...


class TorchBackend:
    def __init__(self, spec: str | os.PathLike, dtype: str = "float32", device: str = "cpu"):
        from .. import load_model, load_tokenizer

        self.model = load_model(spec, dtype=dtype, device=device)
        self.tokenizer = load_tokenizer(spec)

    def _generate(self, input_ids, max_new_tokens, temperature, on_text) -> str:
        import torch
        from transformers import TextStreamer

        pieces: list[str] = []

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                pieces.append(text)
                if on_text is not None and text:
                    on_text(text)

        streamer = _Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, streamer=streamer,
                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        if temperature > 0:
            kw["temperature"] = temperature
        else:  # greedy: silence the sampling defaults a generation_config may carry
            kw.update(temperature=None, top_p=None, top_k=None)
        input_ids = input_ids.to(self.model.device)
        with torch.no_grad():
            self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kw)
        return "".join(pieces)

    def complete(self, prompt, max_new_tokens=128, temperature=0.0, on_text=print_stream) -> str:
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        return self._generate(ids, max_new_tokens, temperature, on_text)

    def chat(self, messages, max_new_tokens=256, temperature=0.0, on_text=print_stream) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use `fedprune generate` instead")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]
        return self._generate(ids, max_new_tokens, temperature, on_text)


class LlamaCppBackend:
    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None):
        from .llamacpp import load_gguf

        self.llm = load_gguf(path, n_ctx=n_ctx, n_threads=n_threads)

    @staticmethod
    def _stream(chunks, key, on_text) -> str:
        out = []
        for chunk in chunks:
            choice = chunk["choices"][0]
            text = choice["text"] if key == "text" else choice.get("delta", {}).get("content") or ""
            out.append(text)
            if on_text is not None and text:
                on_text(text)
        return "".join(out)

    def complete(self, prompt, max_new_tokens=128, temperature=0.0, on_text=print_stream) -> str:
        chunks = self.llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=temperature,
                                            top_k=0 if temperature > 0 else 1, stream=True)
        return self._stream(chunks, "text", on_text)

    def chat(self, messages, max_new_tokens=256, temperature=0.0, on_text=print_stream) -> str:
        chunks = self.llm.create_chat_completion(messages, max_tokens=max_new_tokens, temperature=temperature,
                                                 top_k=0 if temperature > 0 else 1, stream=True)
        return self._stream(chunks, "delta", on_text)


def open_backend(spec: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None,
                 device: str = "cpu", dtype: str = "float32") -> Backend:
    """llama.cpp for a ``.gguf`` file, PyTorch otherwise (in ``dtype`` on ``device``).

    ``device`` cuda is refused for a ``.gguf`` file: the llama.cpp build used here runs on the CPU."""
    if str(spec).endswith(".gguf"):
        if str(device).lower().startswith("cuda"):
            raise ValueError(f"--device {device}: a .gguf file runs on llama.cpp on the CPU; give a PyTorch "
                             "model directory to generate on CUDA")
        return LlamaCppBackend(spec, n_ctx=n_ctx, n_threads=n_threads)
    return TorchBackend(spec, dtype=dtype, device=device)
