"""Each token's raw bytes, for the `bytes` of logprobs and for character offsets that do not drift.

A token may hold part of a UTF-8 character (byte-level BPE splits rare characters across tokens;
SentencePiece's byte-fallback tokens `<0xE4>` hold one byte each), so decoding it alone gives
"\\ufffd" and its UTF-8 is not its bytes. Its bytes come from the vocabulary instead: a byte-level
BPE piece is spelled in GPT-2's byte alphabet (one character per byte); a SentencePiece piece is
text with "▁" for a space, or `<0xNN>` for one byte; an added (special) token is its text. Joined,
the bytes of a token sequence are the UTF-8 of its decoded text (tested against the tokenizer's
own decoder).
"""

from __future__ import annotations

import codecs
import json
import re
import weakref
from functools import lru_cache
from typing import Any

from zili.tokenizer import Tokenizer, _byte_to_unicode

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_TABLES: weakref.WeakKeyDictionary[Tokenizer, TokenBytes] = weakref.WeakKeyDictionary()


class TokenBytes:
    """token id -> bytes for one tokenizer (cached per id)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        spec = json.loads(tokenizer.backend.to_str())
        decoders = _decoder_types(spec.get("decoder"))
        self._byte_level = "ByteLevel" in decoders
        self._byte_fallback = "ByteFallback" in decoders
        self._added = {int(a["id"]): a["content"] for a in spec.get("added_tokens", [])}
        self._byte_of = {char: byte for byte, char in _byte_to_unicode().items()}
        self._id_to_token = tokenizer.backend.id_to_token
        self.of = lru_cache(maxsize=1 << 17)(self._of)

    def _of(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self._id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            try:
                return bytes(self._byte_of[char] for char in piece)
            except KeyError:  # a piece outside the byte alphabet: plain text
                return piece.encode()
        if self._byte_fallback and (byte := _BYTE_PIECE.fullmatch(piece)):
            return bytes([int(byte.group(1), 16)])
        return piece.replace("\u2581", " ").encode()


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The raw bytes of `token_id` in `tokenizer`'s vocabulary (b"" for an id it does not have)."""
    table = _TABLES.get(tokenizer)
    if table is None:
        table = _TABLES[tokenizer] = TokenBytes(tokenizer)
    return table.of(token_id)


class CharOffsets:
    """Character offsets of consecutive tokens in the text they decode to (OpenAI's `text_offset`):
    `advance(token_bytes)` returns where the token starts, counting only whole characters, so a
    token that ends inside a character does not move the count until the character is complete."""

    def __init__(self, start: int = 0) -> None:
        self.position = start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, data: bytes) -> int:
        start = self.position
        self.position += len(self._decoder.decode(data))
        return start


def _decoder_types(decoder: Any) -> set[str]:
    if not isinstance(decoder, dict):
        return set()
    found = {decoder.get("type", "")}
    for inner in decoder.get("decoders") or []:
        found |= _decoder_types(inner)
    return found
