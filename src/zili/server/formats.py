"""Rendering a Generation's deltas in OpenAI's shapes: chat and legacy completions.

Each format accumulates a whole response (`add`, `response`) or renders stream chunks
(`first_chunks`, `chunk_choice`, `end_choice`), logprobs included. For a reasoning model the chat
format splits each choice's text (zili.reasoning) into `reasoning_content` (the thinking) and
`content` (the answer) the way DeepSeek's API and vLLM do; tool calls are parsed out of the answer
only, so look-alikes inside the thinking are ignored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zili.engine.request import TokenLogprob
from zili.reasoning import ReasoningDelta, ReasoningParser
from zili.server import protocol as p
from zili.server.generation import ChoiceDelta, Generation
from zili.server.token_bytes import CharOffsets, token_bytes
from zili.structured.tools import HERMES, ToolCallStream, parse_tool_calls

if TYPE_CHECKING:
    from zili.server.state import ServerState


@dataclass(frozen=True)
class ReasoningSetup:
    """How a request's output is split: the parser style, the rendered prompt (whose end may open or
    close the thinking) and the closing tag's token id when it is one token (exact token counts)."""

    style: str
    prompt: str
    end_token_id: int | None = None

    def parser(self) -> ReasoningParser:
        return ReasoningParser(self.style, self.prompt, self.end_token_id)


class ChatFormat:
    def __init__(self, state: ServerState, gen: Generation, top_logprobs: int | None,
                 tool_style: str | None = None, reasoning: ReasoningSetup | None = None) -> None:
        self.state, self.gen, self.top_logprobs = state, gen, top_logprobs
        self.texts: dict[int, list[str]] = {}
        self.reasoning = reasoning  # None: the text is all answer (no reasoning parser)
        self.reasoning_texts: dict[int, list[str]] = {}
        self.parsers: dict[int, ReasoningParser] = {}
        self.num_tokens: dict[int, int] = {}
        self.logprobs: dict[int, list[p.ChatTokenLogprob]] = {}
        self.finish: dict[int, tuple[str | None, Any]] = {}
        self.tool_style = tool_style  # when tools were offered: parse tool calls out of the text
        self.tool_streams: dict[int, ToolCallStream] = {}

    def _logprobs(self, delta: ChoiceDelta) -> list[p.ChatTokenLogprob] | None:
        if self.top_logprobs is None or delta.logprobs is None:
            return None
        token_str = self.state.token_str
        out = []
        for lp in delta.logprobs:
            tok = token_str(lp.token_id)
            # bytes from the vocabulary: a token holding part of a character has no UTF-8 of its own
            top = [p.TopLogprob(token=token_str(t), logprob=v, bytes=list(self._bytes(t)))
                   for t, v in list(lp.top)[: self.top_logprobs]]
            out.append(p.ChatTokenLogprob(token=tok, logprob=lp.logprob, bytes=list(self._bytes(lp.token_id)),
                                          top_logprobs=top))
        return out

    def _bytes(self, token_id: int) -> bytes:
        return token_bytes(self.state.tokenizer, token_id)

    def _split(self, delta: ChoiceDelta) -> ReasoningDelta:
        """The delta's text as (reasoning, answer); at the choice's end, with what the parser held."""
        self.num_tokens[delta.index] = self.num_tokens.get(delta.index, 0) + len(delta.token_ids)
        if self.reasoning is None:
            return ReasoningDelta(content=delta.text)
        parser = self.parsers.get(delta.index)
        if parser is None:
            parser = self.parsers[delta.index] = self.reasoning.parser()
        out = parser.feed(delta.text, delta.token_ids)
        if delta.finish_reason is not None:
            rest = parser.finish()
            out = ReasoningDelta(out.reasoning + rest.reasoning, out.content + rest.content)
            self._count_tokens(delta.index, parser)
        return out

    def _count_tokens(self, index: int, parser: ReasoningParser) -> None:
        metrics = self.state.metrics
        metrics.reasoning_tokens.inc(parser.reasoning_tokens)
        metrics.answer_tokens.inc(max(0, self.num_tokens.get(index, 0) - parser.reasoning_tokens))

    def add(self, delta: ChoiceDelta) -> None:
        split = self._split(delta)
        self.texts.setdefault(delta.index, []).append(split.content)
        self.reasoning_texts.setdefault(delta.index, []).append(split.reasoning)
        lps = self._logprobs(delta)
        if lps is not None:
            self.logprobs.setdefault(delta.index, []).extend(lps)
        if delta.finish_reason is not None:
            self.finish[delta.index] = (delta.finish_reason, delta.stop_reason)

    def response(self, model: str) -> p.ChatCompletionResponse:
        choices = []
        for i in range(self.gen.num_choices):
            reason, stop_reason = self.finish.get(i, (None, None))
            logprobs = p.ChatLogprobs(content=self.logprobs.get(i, [])) if self.top_logprobs is not None else None
            text = "".join(self.texts.get(i, []))
            parts: tuple[str | None, str | None] = (None, text)
            if i in self.parsers:
                parts = self.parsers[i].result("".join(self.reasoning_texts.get(i, [])), text)
            reasoning, content = parts
            message = p.ChatResponseMessage(content=content, reasoning_content=reasoning)
            if self.tool_style is not None and content:
                parsed = parse_tool_calls(content, self.tool_style, truncated=reason == "length")
                if parsed.tool_calls or parsed.content != content:
                    message = p.ChatResponseMessage(content=parsed.content, reasoning_content=reasoning,
                                                    tool_calls=[p.ResponseToolCall.model_validate(c.to_openai())
                                                                for c in parsed.tool_calls] or None)
                    reason = "tool_calls" if reason == "stop" else reason
            choices.append(p.ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=reason,
                                        stop_reason=stop_reason))
        return p.ChatCompletionResponse(id=self.gen.request_id, created=int(time.time()), model=model,
                                        choices=choices, usage=self.usage())

    def usage(self) -> p.Usage:
        """The generation's usage; with a reasoning parser, the thinking's share of the completion."""
        usage = self.gen.usage()
        if self.reasoning is not None:
            reasoning = sum(parser.reasoning_tokens for parser in self.parsers.values())
            usage.completion_tokens_details = p.CompletionTokensDetails(reasoning_tokens=reasoning)
        return usage

    def first_chunks(self, base: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}]}
                for i in range(self.gen.num_choices)]

    def chunk_choice(self, delta: ChoiceDelta) -> dict[str, Any]:
        lps = self._logprobs(delta)
        split = self._split(delta)
        body, reason = ({"content": split.content} if split.content else {}), delta.finish_reason
        if self.tool_style is not None:
            body, reason = self._tool_delta(delta, split.content)
        if split.reasoning:  # thinking comes before any answer text, so it goes first in the delta
            body = {"reasoning_content": split.reasoning, **body}
        return {"index": delta.index, "delta": body,
                "logprobs": None if lps is None else {"content": [x.model_dump() for x in lps], "refusal": None},
                "finish_reason": reason}

    def _tool_delta(self, delta: ChoiceDelta, text: str) -> tuple[dict[str, Any], str | None]:
        """The answer text split into content and `tool_calls` deltas, as the whole-response parse splits it."""
        stream = self.tool_streams.setdefault(delta.index, ToolCallStream(self.tool_style or HERMES))
        content, calls = stream.feed(text)
        reason = delta.finish_reason
        if reason is not None:
            rest, more = stream.finish(truncated=reason == "length")
            content, calls = content + rest, calls + more
            if stream.calls_sent and reason == "stop":
                reason = "tool_calls"
        body: dict[str, Any] = {"content": content} if content else {}
        if calls:
            body["tool_calls"] = calls
        return body, reason

    def end_choice(self, index: int, reason: str) -> dict[str, Any]:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}


class CompletionFormat:
    """Legacy completions. With `echo` each choice's text starts with its prompt; with echo and
    `logprobs` (scoring, as lm-evaluation-harness uses it) its logprobs start with the prompt's own
    tokens too: `token_logprobs` and `top_logprobs` are null for the first prompt token, and
    `text_offset` counts characters from the start of the echoed prompt."""

    def __init__(self, state: ServerState, gen: Generation, logprobs: int | None, echo: list[str] | None) -> None:
        self.state, self.gen, self.k, self.echo = state, gen, logprobs, echo
        self.texts: dict[int, list[str]] = {}
        self.logprobs: dict[int, p.CompletionLogprobs] = {}
        self.offsets: dict[int, CharOffsets] = {}  # per choice: where its next token starts in its text
        self.finish: dict[int, tuple[str | None, Any]] = {}
        self.started: set[int] = set()  # choices whose first chunk was sent (streaming)

    @property
    def scores_prompt(self) -> bool:
        return self.echo is not None and self.k is not None

    def _prefix(self, index: int) -> str:
        return self.echo[index // self.gen.n] if self.echo is not None else ""

    def _entry(self, out: p.CompletionLogprobs, token_id: int, logprob: TokenLogprob | None,
               offsets: CharOffsets) -> None:
        tok = self.state.token_str(token_id)
        out.tokens.append(tok)
        out.text_offset.append(offsets.advance(token_bytes(self.state.tokenizer, token_id)))
        if logprob is None:  # the first prompt token: nothing before it to predict it
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            return
        top = {self.state.token_str(t): v for t, v in list(logprob.top)[: self.k]}
        top.setdefault(tok, logprob.logprob)
        out.token_logprobs.append(logprob.logprob)
        out.top_logprobs.append(top)

    def _prompt_logprobs(self, index: int) -> p.CompletionLogprobs:
        """The echoed prompt's tokens and their logprobs (the engine's prompt_logprobs)."""
        prompt_index = index // self.gen.n
        ids = self.gen.prompts[prompt_index]
        scored = self.gen.prompt_logprobs.get(prompt_index) or [None] * len(ids)
        out, offsets = p.CompletionLogprobs(), CharOffsets(0)
        for token_id, logprob in zip(ids, scored):
            self._entry(out, token_id, logprob, offsets)
        return out

    def _logprobs(self, delta: ChoiceDelta) -> p.CompletionLogprobs | None:
        if self.k is None or delta.logprobs is None:
            return None
        out = p.CompletionLogprobs()
        offsets = self.offsets.setdefault(delta.index, CharOffsets(len(self._prefix(delta.index))))
        for lp in delta.logprobs:
            self._entry(out, lp.token_id, lp, offsets)
        return out

    def add(self, delta: ChoiceDelta) -> None:
        self.texts.setdefault(delta.index, []).append(delta.text)
        lps = self._logprobs(delta)
        if lps is not None:
            _extend(self.logprobs.setdefault(delta.index, p.CompletionLogprobs()), lps)
        if delta.finish_reason is not None:
            self.finish[delta.index] = (delta.finish_reason, delta.stop_reason)

    def response(self, model: str) -> p.CompletionResponse:
        choices = []
        for i in range(self.gen.num_choices):
            reason, stop_reason = self.finish.get(i, (None, None))
            logprobs = None
            if self.k is not None:
                logprobs = self._prompt_logprobs(i) if self.scores_prompt else p.CompletionLogprobs()
                _extend(logprobs, self.logprobs.get(i, p.CompletionLogprobs()))
            choices.append(p.CompletionChoice(index=i, text=self._prefix(i) + "".join(self.texts.get(i, [])),
                                              logprobs=logprobs, finish_reason=reason, stop_reason=stop_reason))
        return p.CompletionResponse(id=self.gen.request_id, created=int(time.time()), model=model,
                                    choices=choices, usage=self.gen.usage())

    def first_chunks(self, base: dict[str, Any]) -> list[dict[str, Any]]:
        if self.echo is None or self.scores_prompt:  # scored prompts go out with the first delta, once known
            return []
        return [{**base, "choices": [{"index": i, "text": self._prefix(i), "logprobs": None, "finish_reason": None}]}
                for i in range(self.gen.num_choices)]

    def chunk_choice(self, delta: ChoiceDelta) -> dict[str, Any]:
        lps = self._logprobs(delta)
        text = delta.text
        if self.scores_prompt and delta.index not in self.started:
            self.started.add(delta.index)
            text = self._prefix(delta.index) + text
            prompt = self._prompt_logprobs(delta.index)
            lps = _extend(prompt, lps) if lps is not None else prompt
        return {"index": delta.index, "text": text, "logprobs": None if lps is None else lps.model_dump(),
                "finish_reason": delta.finish_reason}

    def end_choice(self, index: int, reason: str) -> dict[str, Any]:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": reason}

    def usage(self) -> p.Usage:
        return self.gen.usage()


def _extend(acc: p.CompletionLogprobs, more: p.CompletionLogprobs) -> p.CompletionLogprobs:
    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        getattr(acc, name).extend(getattr(more, name))
    return acc


Format = ChatFormat | CompletionFormat
