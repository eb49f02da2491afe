"""Reasoning models (DeepSeek-R1 style): the thinking between `<think>` and `</think>` split from
the answer, streaming-safe, and the state a thinking budget needs.

Two tag styles are understood, named as vLLM names its reasoning parsers:

- "deepseek-r1" (DeepSeek-R1 and its Qwen / Llama distills, QwQ): the output is thinking until
  `</think>`. The opening `<think>` is optional (newer R1 templates put it in the generation prompt
  itself; older ones leave it to the model), so output that never closes the thinking (max_tokens
  hit while thinking) is all reasoning.
- "qwen3" (Qwen3): the model opens the thinking itself with `<think>`; output that does not begin
  with it (the model skipped thinking, or `enable_thinking=False`, whose template closes an empty
  thinking block inside the prompt) is all answer.

For both, a prompt that ends inside an open thinking block (`...<think>\\n`) starts the output in
the thinking, and a prompt that ends right after `</think>` starts it in the answer.

`ReasoningParser` is fed text pieces as they are generated and returns what each adds to the
reasoning and to the answer. Text that could still be the start of a tag is held back until the
next piece decides it, so the split is the same whether a tag arrives as one token, across
several tokens, or inside a token together with other text; the pieces of each part concatenated
equal `split_reasoning` of the whole text. It works on text (the tags are ordinary vocabulary
entries in these models, kept by the detokenizer), so it needs no token ids.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from zili.config import REASONING_PARSERS

DEEPSEEK_R1, QWEN3, NONE = "deepseek-r1", "qwen3", "none"
THINK_START, THINK_END = "<think>", "</think>"
# What the engine writes to end the thinking when a budget is spent: the form R1 and Qwen3 write.
THINK_END_TEXT = "\n</think>\n\n"
# reasoning_effort -> thinking budget (tokens), unless the server is given others (--reasoning-budgets).
DEFAULT_REASONING_BUDGETS = {"low": 1024, "medium": 4096, "high": 16384}


def detect_reasoning_parser(chat_template: str | None) -> str:
    """The parser a chat template calls for: "qwen3" (it takes `enable_thinking`), "deepseek-r1"
    (it mentions `<think>` / `</think>` otherwise), or "none"."""
    template = chat_template or ""
    if THINK_START not in template and THINK_END not in template:
        return NONE
    return QWEN3 if "enable_thinking" in template else DEEPSEEK_R1


def resolve_reasoning_parser(name: str, chat_template: str | None) -> str:
    """`name` with "auto" decided from the chat template. ValueError for an unknown name."""
    if name not in REASONING_PARSERS:
        raise ValueError(f"reasoning parser must be one of {', '.join(REASONING_PARSERS)}, got {name!r}")
    return detect_reasoning_parser(chat_template) if name == "auto" else name


def parse_reasoning_budgets(text: str) -> dict[str, int]:
    """'low=512,medium=2048,high=8192' -> {effort: tokens}; efforts not named keep their defaults.
    ValueError names the part it cannot read."""
    budgets = dict(DEFAULT_REASONING_BUDGETS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        effort, sep, value = part.partition("=")
        effort = effort.strip()
        if not sep or effort not in budgets or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"reasoning budgets are written low=N,medium=N,high=N with N >= 1 tokens; "
                             f"cannot read {part!r}")
        budgets[effort] = int(value)
    return budgets


def prompt_thinking_state(prompt: str | None) -> bool | None:
    """True when the prompt leaves a thinking block open (it ends with `<think>`), False when it
    ends right after a closed one (`</think>`, e.g. Qwen3 with enable_thinking=False), None when
    the model decides."""
    tail = (prompt or "").rstrip()
    if tail.endswith(THINK_START):
        return True
    if tail.endswith(THINK_END):
        return False
    return None


class _State(enum.Enum):
    START = "start"  # nothing decided yet: an opening tag may still come
    REASONING = "reasoning"
    CONTENT = "content"


@dataclass
class ReasoningDelta:
    """What one fed piece of text adds: to the reasoning, and to the answer (never the same text)."""

    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """Streaming split of generated text into reasoning and answer, for one sequence.

    `style` is "deepseek-r1" or "qwen3" (see the module docstring); `prompt` is the prompt text, whose
    end may already open or close the thinking. `feed(piece, token_ids)` returns the piece's
    `ReasoningDelta`; `finish()` releases what was held back when the output ends. `thinking` is True
    while the output is (or, for deepseek-r1 before its first character, will be) inside the thinking.

    `reasoning_tokens` counts the tokens behind the thinking, closing tag included: every token fed
    while thinking, stopping exactly at the closing tag when it is one token (`end_token_id`, as in
    R1 and Qwen3 vocabularies; otherwise the whole piece that closed it counts).
    """

    def __init__(self, style: str, prompt: str | None = None, end_token_id: int | None = None) -> None:
        if style not in (DEEPSEEK_R1, QWEN3):
            raise ValueError(f"reasoning parser style must be {DEEPSEEK_R1!r} or {QWEN3!r}, got {style!r}")
        self.style = style
        self.end_token_id = end_token_id
        opened = prompt_thinking_state(prompt)
        self.state = _State.START if opened is None else (_State.REASONING if opened else _State.CONTENT)
        self.held = ""  # text that may still turn out to be (part of) a tag
        self._entered_now = False
        self.saw_thinking = self.state is _State.REASONING
        self.reasoning_tokens = 0
        self._undecided_tokens = 0  # tokens fed while START held its text back

    @property
    def thinking(self) -> bool:
        return self.state is _State.REASONING or (self.state is _State.START and self.style == DEEPSEEK_R1)

    @property
    def thinking_tokens(self) -> int:
        """Tokens the thinking has taken so far, counting those still undecided at the start."""
        return self.reasoning_tokens + (self._undecided_tokens if self.thinking else 0)

    @property
    def answering(self) -> bool:
        """True once the thinking is over (or was skipped): what follows is the answer."""
        return self.state is _State.CONTENT

    def feed(self, piece: str, token_ids: Sequence[int] = ()) -> ReasoningDelta:
        """Add one piece of generated text (and the tokens behind it); what it contributes."""
        was_reasoning = self.state is _State.REASONING
        out = self._split(piece)
        if self.state is _State.START:
            self._undecided_tokens += len(token_ids)
            return out
        undecided, self._undecided_tokens = self._undecided_tokens, 0
        if not (was_reasoning or self._entered_now):
            return out
        count = len(token_ids)
        if self.state is _State.CONTENT and self.end_token_id is not None and self.end_token_id in token_ids:
            count = list(token_ids).index(self.end_token_id) + 1
        self.reasoning_tokens += undecided + count
        return out

    def result(self, reasoning: str, content: str) -> tuple[str | None, str | None]:
        """A whole output's (reasoning, answer) from the concatenated parts: reasoning None when the
        output had no thinking, the answer None when it was all thinking."""
        if not self.saw_thinking:
            return None, content
        return reasoning or None, content or None

    def _split(self, piece: str) -> ReasoningDelta:
        out = ReasoningDelta()
        self._entered_now = False
        text, self.held = self.held + piece, ""
        if self.state is _State.START:
            text = self._decide_start(text)
            if self.state is _State.START:
                return out
        if self.state is _State.REASONING:
            end = text.find(THINK_END)
            if end == -1:
                keep = _partial_suffix(text, THINK_END)
                out.reasoning, self.held = text[:len(text) - keep], text[len(text) - keep:]
                return out
            out.reasoning, text = text[:end], text[end + len(THINK_END):]
            self.state = _State.CONTENT
        out.content = text
        return out

    def _decide_start(self, text: str) -> str:
        """In START: take a leading `<think>` (after optional whitespace), or decide there is none."""
        stripped = text.lstrip()
        if stripped.startswith(THINK_START):
            self.state, self.saw_thinking, self._entered_now = _State.REASONING, True, True
            return stripped[len(THINK_START):]
        if THINK_START.startswith(stripped):  # only whitespace or a prefix of the tag so far: wait
            self.held = text
            return ""
        self.state = _State.REASONING if self.style == DEEPSEEK_R1 else _State.CONTENT
        self.saw_thinking = self._entered_now = self.state is _State.REASONING
        return text

    def finish(self) -> ReasoningDelta:
        """The output ended: release held text where the current state puts it."""
        text, self.held = self.held, ""
        if self.thinking:
            self.saw_thinking = True
            self.reasoning_tokens += self._undecided_tokens
            self._undecided_tokens = 0
            return ReasoningDelta(reasoning=text)
        return ReasoningDelta(content=text)


def split_reasoning(text: str, style: str, prompt: str | None = None) -> tuple[str | None, str | None]:
    """(reasoning, answer) of a whole output. Reasoning is None when the output has none; the answer
    is None when the output is all thinking (e.g. cut off by max_tokens before `</think>`).
    With style "none" the text is all answer."""
    if style == NONE:
        return None, text
    parser = ReasoningParser(style, prompt)
    first, last = parser.feed(text), parser.finish()
    return parser.result(first.reasoning + last.reasoning, first.content + last.content)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
