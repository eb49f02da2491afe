"""Seeds (issue 21 item 6): all 64 bits of `seed` count, and choice i is mixed in, not added."""

from __future__ import annotations

import pytest

from tests.tiny_models import write_tiny_llama
from zili import LLM, SamplingParams
from zili.engine.sampler import sequence_seed, splitmix64


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    return LLM(str(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))), dtype="float32", block_size=4,
               max_num_seqs=16)


def sampled(llm: LLM, seed: int, n: int = 1) -> list[list[int]]:
    # temperature 2 over a tiny random model: nearly uniform, so two different draws differ.
    params = SamplingParams(temperature=2.0, max_tokens=12, seed=seed, n=n, ignore_eos=True)
    return [c.token_ids for c in llm.generate("Once upon a time", params)[0].outputs]


def test_splitmix64_matches_the_reference_generator():
    # Vigna's splitmix64.c seeded with 1234567 (the Rosetta Code "Pseudo-random numbers/Splitmix64"
    # values): the generator adds the golden gamma to its state, then outputs the mix of the state.
    state, outputs = 1234567, []
    for _ in range(5):
        outputs.append(splitmix64(state))
        state = (state + 0x9E3779B97F4A7C15) % 2**64
    assert outputs == [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
                       16408922859458223821]
    assert splitmix64(0) == 0xE220A8397B1DCDAF


def test_sequence_seed_uses_every_bit_and_the_index():
    assert sequence_seed(1, 0) != sequence_seed(2**32 + 1, 0)
    assert sequence_seed(-1, 0) == sequence_seed(2**64 - 1, 0)  # one 64-bit value, signed or not
    assert len({sequence_seed(s, i) & 0xFFFFFFFF for s in range(64) for i in range(8)}) == 64 * 8
    assert all(0 <= sequence_seed(s, 3) < 2**64 for s in (-(2**63), 0, 2**63 - 1))


def test_seeds_differing_above_bit_32_sample_differently(llm: LLM):
    assert sampled(llm, 1) == sampled(llm, 1)  # still reproducible
    assert sampled(llm, 1) != sampled(llm, 2**32 + 1)
    assert sampled(llm, 7) != sampled(llm, 7 + 2**40)
    assert sampled(llm, -5) == sampled(llm, 2**64 - 5)  # the same 64-bit seed


def test_choice_i_of_seed_s_is_not_choice_0_of_seed_s_plus_i(llm: LLM):
    four = sampled(llm, 100, n=4)
    assert len({tuple(c) for c in four}) == 4
    for i in range(1, 4):
        assert four[i] != sampled(llm, 100 + i)[0]
