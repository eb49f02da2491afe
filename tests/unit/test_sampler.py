import math

import pytest
import torch

from zili.engine.request import Request, Sequence
from zili.engine.sampler import Sampler, apply_top_k_top_p, sequence_seed
from zili.sampling import SamplingParams

V = 8


def make_seq(params: SamplingParams, prompt=(1, 2), output=(), seed_generator=False) -> Sequence:
    req = Request("r", None, list(prompt), params, max_tokens=16, stop_token_ids=frozenset({0}))
    seq = Sequence("r#0", req, 0, list(prompt) + list(output))
    if params.seed is not None or seed_generator:
        seq.seed = sequence_seed(params.seed or 0, 0)
    req.sequences.append(seq)
    return seq


def test_top_k_keeps_exactly_the_k_best():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    out = apply_top_k_top_p(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    # 0.4 + 0.3 = 0.7 < 0.75, so 0.15 is needed too; 0.1 and 0.05 are not.
    out = apply_top_k_top_p(torch.log(probs), torch.tensor([5]), torch.tensor([0.75]))
    assert torch.isfinite(out).tolist() == [[False, True, False, True, True]]
    # A tiny top_p still keeps the best token.
    out = apply_top_k_top_p(torch.log(probs), torch.tensor([5]), torch.tensor([1e-6]))
    assert torch.isfinite(out).tolist() == [[False, True, False, False, False]]


def test_top_p_applies_to_the_top_k_survivors_renormalised():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    # After top-k=2 the survivors renormalise to 4/7 and 3/7; top_p=0.5 then keeps only the first.
    out = apply_top_k_top_p(torch.log(probs), torch.tensor([2]), torch.tensor([0.5]))
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]


def test_per_row_settings_are_independent():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 2))
    out = apply_top_k_top_p(logits, torch.tensor([1, 4]), torch.tensor([1.0, 1.0]))
    assert torch.isfinite(out).sum(dim=1).tolist() == [1, 4]


def test_min_p_drops_tokens_below_the_scaled_max():
    sampler = Sampler(V, seed=0)
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08, 0.0, 0.0, 0.0, 0.0]) + 1e-9
    logits = torch.log(probs)[None].repeat(400, 1)
    seqs = [make_seq(SamplingParams(temperature=1.0, min_p=0.2)) for _ in range(400)]
    drawn = set(sampler(logits, seqs).token_ids)
    # 0.2 * 0.5 = 0.1: tokens 0, 1 and 2 survive, 3 (0.08) does not.
    assert drawn == {0, 1, 2}


def test_greedy_takes_argmax_and_sampling_follows_the_distribution():
    sampler = Sampler(V, seed=1)
    logits = torch.log(torch.tensor([0.1, 0.6, 0.3, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9]))
    seqs = [make_seq(SamplingParams(temperature=0))] + [make_seq(SamplingParams(temperature=1.0)) for _ in range(3000)]
    ids = sampler(logits[None].repeat(len(seqs), 1), seqs).token_ids
    assert ids[0] == 1
    freq = torch.bincount(torch.tensor(ids[1:]), minlength=V).float() / 3000
    assert freq[:3].tolist() == pytest.approx([0.1, 0.6, 0.3], abs=0.04)


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(1, V)

    def draws(batch_extra: int, sampler_seed: int) -> list[int]:
        sampler = Sampler(V, seed=sampler_seed)
        seq = make_seq(SamplingParams(temperature=1.0, seed=42))
        others = [make_seq(SamplingParams(temperature=1.0)) for _ in range(batch_extra)]
        got = []
        for _ in range(20):
            batch = others + [seq]
            got.append(sampler(logits.repeat(len(batch), 1), batch).token_ids[-1])
            seq.token_ids.append(got[-1])
        return got

    assert draws(0, 0) == draws(5, 123) == draws(17, 7)
    assert len(set(draws(0, 0))) > 1  # one draw per output position, not the same one


def test_a_seeded_verify_row_draws_what_plain_decoding_draws_at_its_position():
    # Verify rows (drafts) of a seeded sequence: row j draws its output token num_output_tokens + j, with
    # the noise a plain step at that position would draw, however many rows the step gave the sequence.
    logits = torch.randn(6, V)
    params = SamplingParams(temperature=1.0, seed=3)
    seq = make_seq(params, output=(5,))
    seq.draft_token_ids = [1, 2, 3, 4, 5]
    verify = Sampler(V)(logits, [seq] * 6).token_ids
    for j in range(6):
        later = make_seq(params, output=(5,) + (1, 2, 3, 4, 5)[:j])  # plain decoding after j accepted drafts
        other = make_seq(SamplingParams(temperature=1.0))  # an unseeded row before it changes nothing
        assert Sampler(V, seed=99)(logits[[0, j]], [other, later]).token_ids[1] == verify[j], j
    cut = Sampler(V)(logits[:3], [seq] * 3).token_ids  # the scheduler kept 2 drafts
    assert cut == verify[:3]


def test_logit_bias_and_min_tokens():
    sampler = Sampler(V)
    logits = torch.zeros(2, V)
    biased = make_seq(SamplingParams(temperature=0, logit_bias={5: 100.0}))
    # Token 0 is the stop token: with min_tokens unmet it must not be picked, however likely.
    logits[1, 0] = 50.0
    early = make_seq(SamplingParams(temperature=0, min_tokens=3), output=(4,))
    assert sampler(logits, [biased, early]).token_ids[0] == 5
    assert sampler(logits, [biased, early]).token_ids[1] != 0


def test_penalties():
    sampler = Sampler(V)
    base = torch.tensor([[2.0, 1.9, 1.8, -1.0, 0.0, 0.0, 0.0, 0.0]])
    # Repetition penalty covers prompt tokens too: token 0 (in the prompt) drops below token 1.
    seq = make_seq(SamplingParams(temperature=0, repetition_penalty=1.2), prompt=(0,))
    assert sampler(base, [seq]).token_ids == [1]
    # Frequency penalty scales with counts in the output: two 0s and one 1 leave token 2 best.
    seq = make_seq(SamplingParams(temperature=0, frequency_penalty=0.2), prompt=(7,), output=(0, 0, 1))
    assert sampler(base, [seq]).token_ids == [2]
    # Presence penalty is flat: one 0 in the output is enough to prefer token 1.
    seq = make_seq(SamplingParams(temperature=0, presence_penalty=0.2), prompt=(7,), output=(0,))
    assert sampler(base, [seq]).token_ids == [1]
    # Prompt tokens do not count for presence/frequency.
    seq = make_seq(SamplingParams(temperature=0, presence_penalty=2.0), prompt=(0,))
    assert sampler(base, [seq]).token_ids == [0]


def test_logprobs_are_raw_log_softmax_with_top_alternatives():
    sampler = Sampler(V)
    logits = torch.randn(1, V)
    seq = make_seq(SamplingParams(temperature=0, logprobs=3, repetition_penalty=1.5), prompt=(int(logits.argmax()),))
    out = sampler(logits, [seq])
    lp = out.logprobs[0]
    ref = torch.log_softmax(logits[0], dim=-1)
    assert lp.token_id == out.token_ids[0]
    assert math.isclose(lp.logprob, ref[lp.token_id].item(), rel_tol=1e-5)
    assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5), ("max_tokens", -1),
    ("n", 0), ("min_tokens", -1), ("presence_penalty", 3.0), ("frequency_penalty", -2.5),
    ("repetition_penalty", 0.0), ("logprobs", 21), ("stop", [""]), ("logit_bias", {3: 200}),
    ("stop_token_ids", [-1]),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}"):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=5)
