"""Checks on text a client sends inside free-form JSON (tool definitions, JSON schemas, grammars).

JSON can carry a lone UTF-16 surrogate ("\\ud800"), which Python keeps in a str but UTF-8 (the
tokenizer, the grammar compiler, the response encoder) cannot encode. Pydantic refuses it in typed
string fields; free-form objects (`parameters`, `schema`) are checked here, so the client gets a
400 that names the exact place instead of a failure deep inside a library. The same goes for NaN
and Infinity (and numbers past the float range, such as 1e400, which Python reads as Infinity):
Python's JSON parser accepts them, but they are not JSON (RFC 8259), and the grammar compiler's
parser then fails on the schema text with its own message.
"""

from __future__ import annotations

import math
from typing import Any

from zili.server.errors import bad_request, escape_unencodable, quote


def unencodable_path(value: Any, path: str = "") -> str | None:
    """The JSON path ("a.b[2]" or "a.b{key}") of the first string or object key in `value` that
    UTF-8 cannot encode, or None when all of it can be."""
    if isinstance(value, str):
        return None if _encodable(value) else (path or "$")
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not _encodable(key):
                return f"{path} key {quote(key, 40)}"
            found = unencodable_path(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = unencodable_path(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def nonfinite_path(value: Any, path: str = "") -> str | None:
    """The JSON path of the first NaN or infinite number in `value`, or None when there is none."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path or "$")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for key, item in items:
        found = nonfinite_path(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def require_valid_unicode(value: Any, param: str) -> None:
    """400 naming `param` and the place inside it when some text in `value` is not valid Unicode, or
    some number in it is NaN or infinite."""
    where = unencodable_path(value, param)
    if where is not None:
        raise bad_request(f"{where} is not valid Unicode text (it holds a lone UTF-16 surrogate)", param=param)
    where = nonfinite_path(value, param)
    if where is not None:
        raise bad_request(f"{escape_unencodable(where)} is not a finite number (NaN, Infinity and numbers past "
                          "the float range are not JSON)", param=param)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
