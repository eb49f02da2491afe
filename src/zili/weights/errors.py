"""Errors raised while finding and opening a model. Both are ValueErrors: the input was wrong.

Each message names what was asked, what is supported, and how to get it.
"""

from __future__ import annotations


class ModelNotFoundError(ValueError):
    """The reference names no file, directory or alias that exists here."""


class UnsupportedModelError(ValueError):
    """The model exists but zili cannot run it (format, architecture, quant type, tokenizer)."""
