"""Token bytes for logprobs (issue 21 item 2): each token's raw bytes, joined, are the UTF-8 of the
text the tokenizer's own decoder (HF tokenizers) makes of the same ids, on a byte-level BPE
vocabulary (SmolLM2) and a SentencePiece one with byte fallback (Gemma 3)."""

from __future__ import annotations

import random

import pytest

from zili.server.token_bytes import CharOffsets, token_bytes
from zili.tokenizer import Tokenizer
from zili.weights import resolve_model
from zili.weights.gguf import GGUFCheckpoint, read_gguf_header
from zili.weights.resolve import ALIASES, alias_path

TEXTS = ["你好，世界", "naïve café ∮ 🙂🙂", "𠀋𠀌 rare ideographs", "plain ascii", " leading space\nand lines"]


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    return GGUFCheckpoint(alias_path(ALIASES["smollm2-135m"])).tokenizer()


@pytest.fixture(scope="module")
def sentencepiece() -> Tokenizer:
    path = resolve_model("gemma3-270m").path
    return Tokenizer.from_gguf_fields(read_gguf_header(path).metadata, source=str(path))


def joined(tok: Tokenizer, ids: list[int]) -> bytes:
    return b"".join(token_bytes(tok, i) for i in ids)


@pytest.mark.parametrize("which", ["byte_level", "sentencepiece"])
def test_bytes_rebuild_the_text(request, which: str):
    tok: Tokenizer = request.getfixturevalue(which)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert joined(tok, ids) == tok.decode(ids).encode() == text.encode(), (text, ids)


@pytest.mark.parametrize("which", ["byte_level", "sentencepiece"])
def test_bytes_of_any_id_sequence_decode_like_the_tokenizer(request, which: str):
    tok: Tokenizer = request.getfixturevalue(which)
    rng = random.Random(0)
    for _ in range(400):
        ids = [rng.randrange(tok.vocab_size) for _ in range(6)]
        assert joined(tok, ids).decode("utf-8", errors="replace") == tok.decode(ids, skip_special_tokens=False), ids


def test_split_characters_have_partial_bytes(byte_level: Tokenizer, sentencepiece: Tokenizer):
    ids = byte_level.encode("你好", add_special_tokens=False)
    assert len(ids) > 2 and all(token_bytes(byte_level, i) for i in ids)
    assert any(byte_level.decode([i]) == "\ufffd" for i in ids)  # alone, a piece decodes to U+FFFD...
    assert joined(byte_level, ids) == "你好".encode()  # ...but its bytes are the character's
    ids = sentencepiece.encode("𠀋", add_special_tokens=False)
    fallback = [i for i in ids if sentencepiece.backend.id_to_token(i).startswith("<0x")]
    assert fallback and all(len(token_bytes(sentencepiece, i)) == 1 for i in fallback)


def test_special_tokens_are_their_text(byte_level: Tokenizer):
    assert token_bytes(byte_level, byte_level.eos_token_id) == byte_level.eos_token.encode()


def test_char_offsets_count_whole_characters():
    offsets = CharOffsets(start=3)
    # "你" is e4 bd a0, split over two tokens; then "a"; then "🙂" (f0 9f 99 82) over three.
    starts = [offsets.advance(b) for b in (b"\xe4\xbd", b"\xa0", b"a", b"\xf0", b"\x9f\x99", b"\x82", b"!")]
    assert starts == [3, 3, 4, 5, 5, 5, 6]
    assert offsets.position == 7 == 3 + len("你a🙂!")
