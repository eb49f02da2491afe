"""The offline API's prompt forms: a string, token ids, and vLLM's dicts (TextPrompt / TokensPrompt);
anything else is a ValueError naming the prompt, never a silent reinterpretation."""

from __future__ import annotations

import pytest

from tests.tiny_models import write_tiny_llama
from zili import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    return LLM(str(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))), dtype="float32", threads=1,
               enforce_eager=True, kv_cache_memory=2**24)


def _ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_dict_prompts_are_the_plain_prompts(llm: LLM):
    ids = list(range(3, 30))
    plain = _ids(llm.generate([ids, "Hello there"], GREEDY, use_tqdm=False))
    assert _ids(llm.generate([{"prompt_token_ids": ids}, {"prompt": "Hello there"}], GREEDY, use_tqdm=False)) == plain
    out = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)  # one dict alone
    assert len(out) == 1 and out[0].prompt_token_ids == ids and _ids(out) == plain[:1]


@pytest.mark.parametrize("bad", [{"prompt_ids": [1, 2]}, {"prompt_token_ids": "1 2"}, {"prompt": 5},
                                 {"prompt_token_ids": [1, 2.5]}, {"prompt": "a", "prompt_token_ids": [1]}])
def test_a_malformed_dict_prompt_is_refused(llm: LLM, bad):
    with pytest.raises(ValueError, match=r"prompts\[1\] as a dict") as info:
        llm.generate(["fine", bad], GREEDY, use_tqdm=False)
    assert all(f"{k}: {type(v).__name__}" in str(info.value) for k, v in bad.items())  # names what it got
