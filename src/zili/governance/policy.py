"""Content policy ("risk warning"): operator rules checked on prompts and on streamed output.

A policy file is TOML with one `[[rules]]` table per rule:

    [[rules]]
    name = "credentials"                        # reported in errors, metrics and the audit log
    patterns = ['(?i)\\bpassword\\s*[:=]']      # Python regular expressions
    words = ["project-x", "codename"]           # whole words, case-insensitive
    applies_to = ["prompt", "output"]           # default: both

A prompt that matches is refused (400, code content_policy_violation); output that matches ends
its stream with finish_reason "content_filter". Anything with a `check(text, where)` method (the
`ContentClassifier` protocol) can stand beside or instead of the regex rules, e.g. a classifier
model an organisation runs; it must be fast, as it runs on the event loop for every output step.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

Where = Literal["prompt", "output"]
# Output is checked on a window: what a choice gained plus this many characters before it, so a
# match that straddles two deltas is still found without rescanning the whole text each step.
OUTPUT_WINDOW_CHARS = 512


@dataclass(frozen=True)
class PolicyHit:
    """Which rule matched, and where. Holds no content (that is logged only with --log-content)."""

    rule: str
    where: Where


@runtime_checkable
class ContentClassifier(Protocol):
    """A content check: the matched rule, or None when `text` is acceptable."""

    def check(self, text: str, where: Where) -> PolicyHit | None: ...


@dataclass(frozen=True)
class _Rule:
    name: str
    regexes: tuple[re.Pattern[str], ...]
    applies_to: frozenset[str]


@dataclass
class RegexPolicy:
    """Rules of regular expressions and word lists, loaded from a TOML file (`load`)."""

    rules: list[_Rule] = field(default_factory=list)

    def check(self, text: str, where: Where) -> PolicyHit | None:
        for rule in self.rules:
            if where in rule.applies_to and any(r.search(text) for r in rule.regexes):
                return PolicyHit(rule.name, where)
        return None

    @classmethod
    def load(cls, path: Path) -> RegexPolicy:
        """Parse a policy file; raises ValueError naming the file and the bad rule or pattern."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"--content-policy {path}: {exc}") from None
        entries = data.get("rules")
        if not isinstance(entries, list) or not entries or set(data) != {"rules"}:
            raise ValueError(f"--content-policy {path}: expected one or more [[rules]] tables and nothing else")
        return cls([_rule(entry, i, path) for i, entry in enumerate(entries)])


def _rule(entry: object, i: int, path: Path) -> _Rule:
    where = f"--content-policy {path}: rules[{i}]"
    if not isinstance(entry, dict) or not set(entry) <= {"name", "patterns", "words", "applies_to"}:
        raise ValueError(f"{where}: keys are name, patterns, words, applies_to")
    name = entry.get("name", f"rule{i}")
    patterns, words = entry.get("patterns", []), entry.get("words", [])
    applies = entry.get("applies_to", ["prompt", "output"])
    for key, value in (("patterns", patterns), ("words", words), ("applies_to", applies)):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"{where}.{key}: a list of non-empty strings")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: a non-empty string")
    if not patterns and not words:
        raise ValueError(f"{where} ({name}): give patterns or words")
    if not set(applies) <= {"prompt", "output"}:
        raise ValueError(f"{where}.applies_to: prompt and/or output")
    regexes = []
    for pattern in patterns:  # compiled one by one: a pattern may start with its own inline flags
        try:
            regexes.append(re.compile(pattern))
        except re.error as exc:
            raise ValueError(f"{where}.patterns: {pattern!r} is not a valid regular expression ({exc})") from None
    if words:
        regexes.append(re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE))
    return _Rule(name, tuple(regexes), frozenset(applies))


class OutputScanner:
    """Checks each choice's streamed text with every classifier, a window at a time."""

    def __init__(self, classifiers: list[ContentClassifier]) -> None:
        self.classifiers = classifiers
        self._tails: dict[int, str] = {}

    def feed(self, choice: int, text: str) -> PolicyHit | None:
        """The first hit in `text` (what choice `choice` just gained, seen with its recent past)."""
        if not text:
            return None
        window = self._tails.get(choice, "") + text
        self._tails[choice] = window[-OUTPUT_WINDOW_CHARS:]
        for classifier in self.classifiers:
            hit = classifier.check(window, "output")
            if hit is not None:
                return hit
        return None
