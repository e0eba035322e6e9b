"""On-device deployment: GGUF export for llama.cpp, verification against PyTorch, generation.

- :func:`export_gguf` writes a (pruned, LoRA-merged) LLaMA-family model to one GGUF file, in
  float (f32/f16/bf16), q8_0, or llama.cpp's own k-quants and q4_0 (:data:`OUTTYPES`);
- :func:`verify_gguf` reloads that file in llama.cpp and compares next-token logits (and
  perplexities) with the PyTorch model on the same token ids, trusting nothing the exporter wrote;
- :func:`llamacpp_perplexity` and :func:`evaluate_gguf` measure perplexity in llama.cpp itself;
- :mod:`.generation` streams text through PyTorch or llama.cpp.
"""
from __future__ import annotations

from .errors import UnsupportedModelError
from .gguf_export import OUTTYPES, export_gguf, file_summary, unsupported_reasons, wanted_types
from .llamacpp_eval import evaluate_gguf
from .verify import llamacpp_perplexity, torch_perplexity, verify_gguf

__all__ = ["OUTTYPES", "UnsupportedModelError", "evaluate_gguf", "export_gguf", "file_summary",
           "llamacpp_perplexity", "torch_perplexity", "unsupported_reasons", "verify_gguf", "wanted_types"]
