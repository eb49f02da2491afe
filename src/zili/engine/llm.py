"""LLM: the offline library API. `zili.LLM(model, **engine_options).generate(prompts, params)`."""

from __future__ import annotations

import itertools
import sys
from typing import Any, Iterator, Sequence, Union, cast

from zili.config import EngineConfig
from zili.engine.builder import build_engine
from zili.engine.request import OutputAccumulator, RequestOutput
from zili.engine.thinking import split_output_reasoning
from zili.sampling import PoolingParams, SamplingParams

Prompt = Union[str, list[int]]
PromptDict = dict[str, Any]  # vLLM's TextPrompt / TokensPrompt: {"prompt": str} or {"prompt_token_ids": [int]}
Message = dict[str, Any]

PROGRESS_MIN_PROMPTS = 8  # show a progress bar for batches at least this long


class LLM:
    """The offline API: an engine built from `EngineConfig(model=model, **engine_options)`."""

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        self.engine = build_engine(EngineConfig(model=model, **engine_options))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | PromptDict | Sequence[Prompt | PromptDict],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts. A prompt is a
        string, a list of token ids, or vLLM's dict form ({"prompt": ...} / {"prompt_token_ids": [...]});
        ValueError names a prompt of any other shape."""
        prompts = _as_prompt_list(prompts)
        return self._run(prompts, _as_params_list(params, len(prompts)), use_tqdm)

    def embed(self, prompts: Prompt | Sequence[Prompt], params: PoolingParams | None = None,
              use_tqdm: bool = True) -> list[RequestOutput]:
        """Embed every prompt: each output's `embedding` is the prompt's final hidden states (after the
        final norm) pooled as `params` says ([hidden_size] float32; unit L2 norm unless
        params.normalize is False). In the order of the prompts."""
        prompts = _as_prompt_list(prompts)
        return self._run(prompts, [params or PoolingParams()] * len(prompts), use_tqdm)

    def _run(self, prompts: list[Prompt], params_list: Sequence[SamplingParams | PoolingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        prepared = [self.engine.prepare(p, sp) for p, sp in zip(prompts, params_list)]  # all checked, then queued
        ids = [self.engine.add_request(f"llm-{next(self._ids)}", r) for r in prepared]
        results = {rid: OutputAccumulator(rid, getattr(sp, "n", 1)) for rid, sp in zip(ids, params_list)}
        bar = _progress(len(ids)) if use_tqdm and len(ids) >= PROGRESS_MIN_PROMPTS else None
        try:
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    acc = results.get(delta.request_id)
                    if acc is None:
                        continue
                    acc.add(delta)
                    if delta.finished and bar is not None:
                        bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            self.engine.step()  # drain the aborts
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid].result() for rid in ids]

    def chat(self, messages: list[Message] | Sequence[list[Message]], params: SamplingParams | None = None,
             add_generation_prompt: bool = True, tools: list[dict] | None = None,
             use_tqdm: bool = True, chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of messages) or a list of conversations.

        For a reasoning model (EngineConfig.reasoning_parser) each output's `text` is the answer and
        `reasoning_text` the thinking (zili.reasoning); `token_ids` are all the generated tokens."""
        if messages and isinstance(messages[0], dict):  # one conversation
            conversations = [cast(list[Message], messages)]
        else:
            conversations = list(cast(Sequence[list[Message]], messages))
        prompts = [self.render_chat(c, add_generation_prompt, tools, chat_template_kwargs) for c in conversations]
        outputs = self.generate(prompts, params, use_tqdm=use_tqdm)
        return [split_output_reasoning(out, self.engine.reasoning_style, self.tokenizer) for out in outputs]

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """The conversation as prompt token ids, through the model's chat template."""
        from zili.structured.tools import render_chat

        # Tools go through the model's template when it takes them, else a Hermes-style fallback.
        text = render_chat(self.tokenizer, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                           **(chat_template_kwargs or {}))
        # The template already carries any BOS it wants.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's cumulative output (an independent snapshot) after every step that
        changed it, until it finishes. For per-step deltas, use `Engine.step()` directly.

        Closing the iterator early (or an exception in the consumer) aborts the request.
        """
        params = params or SamplingParams()
        rid = self._add(prompt, params)
        acc = OutputAccumulator(rid, params.n)
        finished = False
        try:
            while not finished:
                for delta in self.engine.step():
                    if delta.request_id == rid:
                        acc.add(delta)
                        finished = delta.finished
                        yield acc.snapshot()
        finally:
            if not finished:
                self.engine.abort_request(rid)
                self.engine.step()

    def _add(self, prompt: Prompt, params: SamplingParams) -> str:
        return self.engine.add_request(f"llm-{next(self._ids)}", prompt, params)


def _as_prompt_list(prompts: Prompt | PromptDict | Sequence[Prompt | PromptDict]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, dict):
        return [_from_dict(prompts, "prompts")]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [cast(list[int], items)]  # a single prompt given as token ids
    out: list[Prompt] = []
    for i, p in enumerate(items):
        if isinstance(p, dict):
            p = _from_dict(p, f"prompts[{i}]")
        if not isinstance(p, (str, list)):
            raise ValueError(f"prompts[{i}] must be a string, a list of token ids or a dict with 'prompt' or "
                             f"'prompt_token_ids', got {type(p).__name__}")
        out.append(p)
    return out


def _from_dict(prompt: dict[str, Any], where: str) -> Prompt:
    """vLLM's TextPrompt {"prompt": str} / TokensPrompt {"prompt_token_ids": [int, ...]} as a plain prompt."""
    if set(prompt) == {"prompt"} and isinstance(prompt["prompt"], str):
        return prompt["prompt"]
    ids = prompt.get("prompt_token_ids")
    if set(prompt) == {"prompt_token_ids"} and isinstance(ids, list) and all(type(t) is int for t in ids):
        return ids
    got = ", ".join(f"{k!s}: {type(v).__name__}" for k, v in prompt.items())
    raise ValueError(f"{where} as a dict must be {{'prompt': str}} or {{'prompt_token_ids': [int, ...]}}, "
                     f"got {{{got}}}")


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"params has {len(params)} entries but there are {n} prompts")
    return params


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="generating", unit="req", file=sys.stderr, disable=not sys.stderr.isatty())
