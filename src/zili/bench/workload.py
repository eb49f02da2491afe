"""Workloads: prompts (random token ids, random words, or lines of a file) and their lengths.

Everything is drawn from one seeded `random.Random`, so the same seed gives both engines in a
comparison the very same requests.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

Prompt = Union[str, list[int]]

# A plain-English word list: most are one token in BPE vocabularies, so N words ~ N tokens.
WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education "
    "light green small large river stone open quick slow bright under over after before between through"
).split()

# Token ids below this are left out of random-id prompts: vocabularies put special tokens first.
LOW_TOKEN_ID = 100


@dataclass(frozen=True)
class LengthSpec:
    """A fixed length ("128") or a uniform integer range ("64:256", both ends included)."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str | int) -> "LengthSpec":
        if isinstance(text, int):
            return cls(text, text)
        match = re.fullmatch(r"\s*(\d+)\s*(?:[:-]\s*(\d+)\s*)?", text)
        if not match:
            raise ValueError(f"length must be N or LOW:HIGH, got {text!r}")
        low = int(match.group(1))
        high = int(match.group(2) or low)
        if low < 1 or high < low:
            raise ValueError(f"length range must have 1 <= LOW <= HIGH, got {text!r}")
        return cls(low, high)

    def draw(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    @property
    def fixed(self) -> bool:
        return self.low == self.high

    def __str__(self) -> str:
        return str(self.low) if self.fixed else f"{self.low}:{self.high}"


@dataclass(frozen=True)
class RequestSpec:
    prompt: Prompt
    input_len: int  # intended prompt length in tokens (exact for token ids, approximate for text)
    output_len: int  # max_tokens, and with ignore_eos the exact output length


def random_token_ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    if vocab_size <= LOW_TOKEN_ID + 1:
        raise ValueError(f"vocab_size must exceed {LOW_TOKEN_ID + 1}, got {vocab_size}")
    return [rng.randrange(LOW_TOKEN_ID, vocab_size) for _ in range(n)]


def random_words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def file_text(path: Path, rng: random.Random, n_words: int) -> str:
    """n_words consecutive words from a random place in the file (wrapping around)."""
    words = Path(path).read_text(encoding="utf-8", errors="replace").split()
    if not words:
        raise ValueError(f"prompt file {path} has no words")
    start = rng.randrange(len(words))
    return " ".join(words[(start + i) % len(words)] for i in range(n_words))


def make_requests(num: int, input_len: LengthSpec, output_len: LengthSpec, source: str = "random-ids",
                  vocab_size: int = 32000, seed: int = 0, prompt_file: Path | None = None) -> list[RequestSpec]:
    """`num` requests. source: "random-ids" (token id lists), "random-words" (text) or "file"."""
    if source not in ("random-ids", "random-words", "file"):
        raise ValueError(f"prompt source must be random-ids, random-words or file, got {source!r}")
    if source == "file" and prompt_file is None:
        raise ValueError("prompt source 'file' needs a prompt file")
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        n_in, n_out = input_len.draw(rng), output_len.draw(rng)
        if source == "random-ids":
            prompt: Prompt = random_token_ids(rng, n_in, vocab_size)
        elif source == "random-words":
            prompt = random_words(rng, n_in)
        else:
            assert prompt_file is not None  # checked above for source "file"
            prompt = file_text(prompt_file, rng, n_in)
        out.append(RequestSpec(prompt, n_in, n_out))
    return out
