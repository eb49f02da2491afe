"""zili.reasoning: the thinking split from the answer, over text cut at every position and over real
DeepSeek-R1-Distill-Qwen token streams (its GGUF header's tokenizer), for both tag styles, with and
without the opening tag, with the closing tag missing, and with the thinking skipped."""

from __future__ import annotations

import pytest

from tests.reasoning_model import r1_tokenizer
from zili.reasoning import (
    DEEPSEEK_R1,
    QWEN3,
    ReasoningParser,
    detect_reasoning_parser,
    parse_reasoning_budgets,
    prompt_thinking_state,
    resolve_reasoning_parser,
    split_reasoning,
)
from zili.tokenizer import CHATML_TEMPLATE, IncrementalDetokenizer

THOUGHT = "\nThe user asks 2+2. <thinking> is not a tag; 2+2=4 </thin is not one either.\n"
ANSWER = "\n\n2 + 2 = **4**. ✓"

# (style, prompt, output, expected reasoning, expected answer): expected values are the pieces the
# output was assembled from, never the parser's own output.
CASES = [
    (DEEPSEEK_R1, None, f"<think>{THOUGHT}</think>{ANSWER}", THOUGHT, ANSWER),
    (DEEPSEEK_R1, None, f"{THOUGHT}</think>{ANSWER}", THOUGHT, ANSWER),  # no opening tag: R1 still thinks
    (DEEPSEEK_R1, "<｜User｜>hi<｜Assistant｜><think>\n", f"{THOUGHT}</think>{ANSWER}", THOUGHT, ANSWER),
    (DEEPSEEK_R1, None, f"<think>{THOUGHT}", THOUGHT, None),  # cut off while thinking: all reasoning
    (DEEPSEEK_R1, None, f"{THOUGHT}</thi", THOUGHT + "</thi", None),
    (DEEPSEEK_R1, None, f"</think>{ANSWER}", None, ANSWER),  # thinking skipped
    (DEEPSEEK_R1, "<think>\n\n</think>\n\n", f"<think>{THOUGHT}</think>{ANSWER}", None,
     f"<think>{THOUGHT}</think>{ANSWER}"),  # the prompt closed the thinking: all answer
    (QWEN3, None, f"<think>{THOUGHT}</think>{ANSWER}", THOUGHT, ANSWER),
    (QWEN3, None, f"\n <think>{THOUGHT}</think>{ANSWER}", THOUGHT, ANSWER),  # whitespace before the tag
    (QWEN3, None, f"{THOUGHT}</think>{ANSWER}", None, f"{THOUGHT}</think>{ANSWER}"),  # no opening tag: no thinking
    (QWEN3, None, ANSWER, None, ANSWER),  # the model skipped thinking
    (QWEN3, None, "<thin", None, "<thin"),
    (QWEN3, None, f"<think>{THOUGHT}", THOUGHT, None),
    (QWEN3, "<|im_start|>assistant\n<think>\n\n</think>\n\n", ANSWER, None, ANSWER),  # enable_thinking=False
    (QWEN3, "<|im_start|>assistant\n<think>\n", f"{THOUGHT}</think>{ANSWER}", THOUGHT, ANSWER),
]


def _stream(style: str, prompt: str | None, pieces: list[str]) -> tuple[str | None, str | None]:
    parser = ReasoningParser(style, prompt)
    reasoning = content = ""
    for piece in pieces:
        delta = parser.feed(piece)
        reasoning, content = reasoning + delta.reasoning, content + delta.content
    last = parser.finish()
    return parser.result(reasoning + last.reasoning, content + last.content)


@pytest.mark.parametrize("style,prompt,text,reasoning,answer", CASES)
def test_split_is_the_same_wherever_the_text_is_cut(style, prompt, text, reasoning, answer):
    assert split_reasoning(text, style, prompt) == (reasoning, answer)
    assert _stream(style, prompt, list(text)) == (reasoning, answer)  # one character at a time
    for i in range(len(text) + 1):
        for j in range(i, min(len(text), i + 12) + 1):  # every cut, and a second cut shortly after
            assert _stream(style, prompt, [text[:i], text[i:j], text[j:]]) == (reasoning, answer), (i, j)


def test_no_text_is_reported_twice_or_lost():
    text = f"<think>{THOUGHT}</think>{ANSWER}"
    parser = ReasoningParser(DEEPSEEK_R1)
    pieces = [parser.feed(c) for c in text] + [parser.finish()]
    assert "".join(d.reasoning + d.content for d in pieces) == THOUGHT + ANSWER
    first_answer = next(i for i, d in enumerate(pieces) if d.content)
    assert not any(d.reasoning for d in pieces[first_answer:])  # all thinking comes before the answer


@pytest.fixture(scope="module")
def tok():
    return r1_tokenizer()


def _token_stream(tok, ids: list[int], style: str, prompt: str | None = None):
    """Feed the R1 detokenizer's pieces one token at a time, as the server does."""
    detok = IncrementalDetokenizer(tok)
    end_ids = tok.encode("</think>", add_special_tokens=False)
    parser = ReasoningParser(style, prompt, end_ids[0] if len(end_ids) == 1 else None)
    reasoning = content = ""
    for token_id in ids:
        delta = parser.feed(detok.add(token_id), [token_id])
        reasoning, content = reasoning + delta.reasoning, content + delta.content
    last = parser.feed(detok.flush())
    rest = parser.finish()
    return parser.result(reasoning + last.reasoning + rest.reasoning, content + last.content + rest.content), parser


def test_r1_vocabulary_has_single_token_tags(tok):
    assert len(tok.encode("<think>", add_special_tokens=False)) == 1
    assert len(tok.encode("</think>", add_special_tokens=False)) == 1


@pytest.mark.parametrize("style", [DEEPSEEK_R1, QWEN3])
@pytest.mark.parametrize("opening", [True, False])
def test_real_r1_token_stream_splits_and_counts_reasoning_tokens(tok, style, opening):
    text = ("<think>" if opening else "") + f"{THOUGHT}</think>{ANSWER}"
    ids = tok.encode(text, add_special_tokens=False)
    end_id = tok.encode("</think>", add_special_tokens=False)[0]
    (reasoning, answer), parser = _token_stream(tok, ids, style)
    if style == QWEN3 and not opening:
        assert (reasoning, answer, parser.reasoning_tokens) == (None, text, 0)
    else:
        assert (reasoning, answer) == (THOUGHT, ANSWER)
        assert parser.reasoning_tokens == ids.index(end_id) + 1


def test_closing_tag_spelled_by_several_tokens(tok):
    """The model writes '</' 'think' '>' as ordinary tokens instead of the tag token."""
    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    ids = enc("<think>" + THOUGHT + "</") + enc("think") + enc(">" + ANSWER)
    assert tok.encode("</think>", add_special_tokens=False)[0] not in ids
    (reasoning, answer), parser = _token_stream(tok, ids, DEEPSEEK_R1)
    assert (reasoning, answer) == (THOUGHT, ANSWER)
    closing = next(k for k in range(1, len(ids) + 1) if "</think>" in tok.decode(ids[:k]))
    assert parser.reasoning_tokens == closing  # through the token that completed the tag


def test_max_tokens_while_thinking_counts_every_token(tok):
    ids = tok.encode("<think>" + THOUGHT, add_special_tokens=False)
    (reasoning, answer), parser = _token_stream(tok, ids, DEEPSEEK_R1)
    assert (reasoning, answer, parser.reasoning_tokens) == (THOUGHT, None, len(ids))


def test_auto_detection_from_chat_templates(tok):
    assert detect_reasoning_parser(tok.chat_template) == DEEPSEEK_R1  # the real R1 distill template
    qwen3 = ("{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
             "{%- endif %}{{ '<|im_start|>assistant\\n' }}")
    assert detect_reasoning_parser(qwen3) == QWEN3
    assert detect_reasoning_parser(CHATML_TEMPLATE) == "none"
    assert detect_reasoning_parser(None) == "none"
    assert resolve_reasoning_parser("auto", tok.chat_template) == DEEPSEEK_R1
    assert resolve_reasoning_parser("qwen3", CHATML_TEMPLATE) == QWEN3
    with pytest.raises(ValueError, match="deepseek-r1"):
        resolve_reasoning_parser("r1", None)
    with pytest.raises(ValueError, match="style"):
        ReasoningParser("none")


def test_r1_template_prompt_and_history(tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}])
    assert prompt.endswith("<｜Assistant｜>") and prompt_thinking_state(prompt) is None
    # an earlier answer's thinking is cut by the R1 template itself: not fed back to the model
    history = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>secret</think>4"},
               {"role": "user", "content": "and 3+3?"}]
    rendered = tok.apply_chat_template(history)
    assert "secret" not in rendered and "<｜Assistant｜>4<｜end▁of▁sentence｜>" in rendered
    assert prompt_thinking_state("x<think>\n") is True and prompt_thinking_state("<think>\n\n</think>\n\n") is False


def test_reasoning_budgets_parse_and_reject():
    assert parse_reasoning_budgets("") == {"low": 1024, "medium": 4096, "high": 16384}
    assert parse_reasoning_budgets("low=8, high=64") == {"low": 8, "medium": 4096, "high": 64}
    for bad in ("low", "low=0", "extreme=5", "low=-1", "medium=1e3"):
        with pytest.raises(ValueError, match="low=N"):
            parse_reasoning_budgets(bad)
