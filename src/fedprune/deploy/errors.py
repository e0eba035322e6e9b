"""Errors of the deployment path."""
from __future__ import annotations


class UnsupportedModelError(ValueError):
    """The model (or tokenizer) cannot be represented in the requested format; the message says why."""
