"""Optional dependencies, grouped as the package's extras (``pip install 'fedprune[deploy]'``).

- ``deploy``: llama-cpp-python (running GGUF files, llama.cpp's quantizer for k-quants) and gguf;
- ``eval``: lm-evaluation-harness (the cross-checks against lm-eval's own task code).

:func:`require` imports a module of an extra or raises :class:`MissingExtraError` (an
``ImportError``) that names the extra to install.
"""
from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"llama_cpp": ("deploy", "llama-cpp-python"), "lm_eval": ("eval", "lm-eval")}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, purpose: str) -> ModuleType:
    """``import module`` or raise :class:`MissingExtraError` saying that ``purpose`` needs it and how to
    install it (``module`` must be one of :data:`EXTRAS`)."""
    extra, dist = EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = " (it builds llama.cpp from source, ~10 minutes on 2 cores)" if module == "llama_cpp" else ""
        raise MissingExtraError(
            f"{purpose} needs {dist}, which is not installed: pip install 'fedprune[{extra}]'{hint}",
            name=module) from exc
