"""On-device deployment: GGUF export for llama.cpp, verification against PyTorch, generation.

- :func:`export_gguf` writes a (pruned, LoRA-merged) LLaMA-family model to one GGUF file;
- :func:`verify_gguf` reloads that file in llama.cpp and compares next-token logits with
  the PyTorch model on the same token ids, trusting nothing the exporter wrote;
- :mod:`.generation` streams text through PyTorch or llama.cpp.
"""
from __future__ import annotations

from .errors import UnsupportedModelError
from .gguf_export import OUTTYPES, export_gguf, unsupported_reasons
from .verify import verify_gguf

__all__ = ["OUTTYPES", "UnsupportedModelError", "export_gguf", "unsupported_reasons", "verify_gguf"]
