"""Output processing: deltas per step, stop strings found across pieces, minimal held-back text."""

from __future__ import annotations

import random

import pytest

from tests.tiny_models import write_tiny_llama
from zili import LLM, SamplingParams
from zili.engine.output_processor import StopStringMatcher
from zili.engine.request import OutputAccumulator


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> tuple[list[str], str | None]:
    emitted = []
    for piece in pieces:
        text, stop = matcher.feed(piece)
        emitted.append(text)
        if stop is not None:
            return emitted, stop
    return emitted, None


def test_only_a_possible_stop_prefix_is_held_back():
    m = StopStringMatcher(["world!", "xyz"], include_stop=False)
    assert m.feed("Hello wor") == ("Hello ", None)  # "wor" may begin "world!"; the rest cannot
    assert m.held == "wor"
    assert m.feed("ld!") == ("", "world!")
    m = StopStringMatcher(["END"], include_stop=False)
    assert m.feed("abc") == ("abc", None) and m.held == ""  # no stop can start here: nothing waits
    assert m.feed("dE") == ("d", None) and m.held == "E"
    assert m.feed("x") == ("Ex", None) and m.held == ""  # the held "E" turned out not to start "END"


def test_stop_found_across_pieces_and_earliest_wins():
    emitted, stop = feed_all(StopStringMatcher(["END"], include_stop=False), ["xx", "E", "N", "Dyy"])
    assert "".join(emitted) == "xx" and stop == "END"
    emitted, stop = feed_all(StopStringMatcher(["END"], include_stop=True), ["xxE", "NDyy"])
    assert "".join(emitted) == "xxEND" and stop == "END"
    # Both occur in "abcd"; the one that starts first cuts the text, wherever each ends.
    emitted, stop = feed_all(StopStringMatcher(["bc", "abcd"], include_stop=False), ["a", "bcd"])
    assert "".join(emitted) == "" and stop == "abcd"
    assert StopStringMatcher(["abc"], include_stop=False).flush() == ""


def test_random_pieces_agree_with_searching_the_text_so_far():
    """After each piece: the first stop (by start) in the text so far ends it, and what is held is
    empty or a proper prefix of a stop; the emitted text is always a prefix of the text."""
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        m = StopStringMatcher(stops, include_stop=False)
        emitted, seen, stop = "", "", None
        for piece in pieces:
            seen += piece
            out, stop = m.feed(piece)
            emitted += out
            hits = [(seen.find(s), s) for s in stops if s in seen]
            if hits:
                idx, first = min(hits)
                assert stop is not None and emitted == seen[:idx] and seen.find(stop) == idx
                break
            assert stop is None and emitted + m.held == seen
            assert m.held == "" or any(st.startswith(m.held) and st != m.held for st in stops)
        else:
            assert emitted + m.flush() == text


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    tiny = write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-outputs"))
    return LLM(str(tiny), dtype="float32", block_size=4, kv_cache_memory=2**22, enforce_eager=True)


def test_step_returns_only_what_is_new(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2, n=2)
    engine.add_request("d", "Once upon a time", params)
    acc = OutputAccumulator("d", 2)
    first = True
    while engine.has_unfinished_requests():
        for delta in engine.step():
            assert delta.request_id == "d"
            assert (delta.prompt_token_ids is not None) == first  # the prompt travels once
            first = False
            for c in delta.outputs:
                assert len(c.token_ids) == 1 and len(c.logprobs) == 1  # one step, one new token each
            acc.add(delta)
    whole = llm.generate(["Once upon a time"], params, use_tqdm=False)[0]
    got = acc.result()
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in whole.outputs]
    assert [c.text for c in got.outputs] == [c.text for c in whole.outputs]
    assert got.prompt_token_ids == whole.prompt_token_ids and got.finished
    assert all(len(c.token_ids) == 20 and c.finish_reason == "length" for c in got.outputs)


def test_aborted_request_ends_with_one_abort_delta(llm):
    engine = llm.engine
    engine.add_request("a", "Hello", SamplingParams(max_tokens=50, ignore_eos=True, n=2))
    engine.step()
    engine.abort_request("a")
    (delta,) = engine.step()
    assert delta.finished and [c.finish_reason for c in delta.outputs] == ["abort", "abort"]
    assert all(c.token_ids == [] and c.text == "" for c in delta.outputs)
    assert not engine.has_unfinished_requests() and engine.outputs.num_sequences == 0
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
