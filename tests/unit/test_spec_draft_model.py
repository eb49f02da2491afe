"""Speculative decoding with a draft model (zili.engine.draft_model): method "draft_model", `--speculative-model`.

Invariants: greedy output equals plain decoding token for token whatever the draft proposes (a
perturbed copy of the target: partial acceptance; the target itself: near-total acceptance), in
batches beside requests that do not speculate, with prefix caching, preemption and abort; every
block of both KV pools comes back; a draft of another tokenizer is refused naming the field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.unit.test_engine import assert_pool_free
from tests.unit.test_engine import tiny_dir as tiny_dir  # noqa: F401 - the module's fixture
from tests.unit.test_spec_decode import PROMPTS, make_llm, outputs, token_lists
from zili import SamplingParams
from zili.config import EngineConfig, SpeculativeConfig, parse_speculative_config
from zili.engine.draft_model import DraftModelProposer


@pytest.fixture(scope="module")
def draft_dir(tiny_dir, tmp_path_factory):
    """The tiny target with noise on every weight: it agrees with the target often, not always."""
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-draft")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, path / name)
    model = LlamaForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05 * p.std())
    model.save_pretrained(path)
    return path


def draft_config(path, k: int = 4) -> dict:
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": k}


def proposer_of(llm) -> DraftModelProposer:
    proposer = llm.engine.speculator.proposer
    assert isinstance(proposer, DraftModelProposer)
    return proposer


def assert_draft_pool_free(llm) -> None:
    kv = proposer_of(llm).kv
    assert kv.tables == {} and proposer_of(llm).cached == {}
    assert kv.num_free_blocks == kv.num_blocks
    assert all(b.ref_count == 0 for b in kv.blocks)


@pytest.fixture(scope="module")
def plain(tiny_dir):
    return make_llm(tiny_dir)


@pytest.fixture(scope="module")
def reference(plain):
    return token_lists(outputs(plain, PROMPTS))


# ---- configuration ------------------------------------------------------------------------------

def test_config_parses_like_vllm():
    cfg = parse_speculative_config({"method": "draft_model", "model": "m", "num_speculative_tokens": 3})
    assert (cfg.method, cfg.model, cfg.num_speculative_tokens) == ("draft_model", "m", 3)
    # A model without a method is a draft model (vLLM); --speculative-model is the shorthand.
    assert parse_speculative_config({"model": "m", "num_speculative_tokens": 3}) == cfg
    assert EngineConfig(speculative_model="m").speculative_config == SpeculativeConfig("draft_model", 5, model="m")
    assert EngineConfig(speculative_model="m", speculative_config=cfg).speculative_config == cfg


@pytest.mark.parametrize("kw, field", [
    ({"speculative_config": {"method": "draft_model", "num_speculative_tokens": 3}}, "speculative_config.model"),
    ({"speculative_config": {"method": "ngram", "model": "m", "num_speculative_tokens": 3}}, "speculative_config.model"),
    ({"speculative_config": {"model": 5, "num_speculative_tokens": 3}}, "speculative_config.model"),
    ({"speculative_config": {"model": " ", "num_speculative_tokens": 3}}, "speculative_config.model"),
    ({"speculative_model": 3}, "speculative_model"),
    ({"speculative_model": "a", "speculative_config": {"model": "b", "num_speculative_tokens": 3}}, "speculative_model"),
    ({"speculative_model": "a", "speculative_config": {"method": "ngram", "num_speculative_tokens": 3}},
     "speculative_model"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kw)


def test_draft_of_another_tokenizer_is_refused(tiny_dir, draft_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(draft_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"][1]["content"] = "<|begin|>"  # same size, one id means another string
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match=r"speculative_config\.model.*tokenizer.*<\|begin\|>"):
        make_llm(tiny_dir, speculative_config=draft_config(other))
    with pytest.raises(ValueError, match=r"speculative_config\.model"):
        make_llm(tiny_dir, speculative_model=str(tmp_path / "missing"))


# ---- the engine ---------------------------------------------------------------------------------

def test_greedy_equals_plain_with_partial_acceptance(tiny_dir, draft_dir, reference, plain):
    """A draft that differs from the target: some drafts accepted, some rejected, output unchanged;
    in the same batch, requests that cannot speculate (a repetition penalty) decode beside them."""
    llm = make_llm(tiny_dir, speculative_model=str(draft_dir))
    assert llm.engine.speculator.config.num_speculative_tokens == 5
    assert token_lists(outputs(llm, PROMPTS)) == reference
    stats = llm.engine.stats()
    assert 0.05 < stats.spec_decode_acceptance_rate < 0.95, stats
    assert stats.spec_decode_mean_accepted_length > 1
    assert_pool_free(llm)
    assert_draft_pool_free(llm)

    penalised = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
    params = [penalised if i % 2 else greedy for i in range(len(PROMPTS))]
    expected, got = plain.generate(PROMPTS, params), llm.generate(PROMPTS, params)
    assert token_lists(got) == token_lists(expected)
    for e, g in zip(expected, got):
        if g.outputs[0].logprobs is not None:
            torch.testing.assert_close([lp.logprob for lp in g.outputs[0].logprobs],
                                       [lp.logprob for lp in e.outputs[0].logprobs], atol=1e-4, rtol=0)
    assert llm.engine.stats().spec_decode_num_accepted_tokens > stats.spec_decode_num_accepted_tokens
    assert_pool_free(llm)
    assert_draft_pool_free(llm)


def test_draft_equal_to_target_accepts_nearly_everything(tiny_dir, reference):
    llm = make_llm(tiny_dir, speculative_config=draft_config(tiny_dir, k=4))
    assert token_lists(outputs(llm, PROMPTS)) == reference
    stats = llm.engine.stats()
    assert stats.spec_decode_acceptance_rate > 0.95, stats
    assert stats.spec_decode_mean_accepted_length > 4.5  # ~1 + 4 a step
    # About 24 tokens in ~5 verify steps each: far fewer steps than tokens.
    assert stats.num_steps < 12
    assert_draft_pool_free(llm)


@pytest.mark.parametrize("options", [
    {"num_blocks": 40},  # preemption: the target's pool cannot hold every sequence
    {"max_num_batched_tokens": 16},  # chunked prefill beside verify rows
    {"enable_prefix_caching": False},
])
def test_greedy_equals_plain_under_engine_options(tiny_dir, draft_dir, reference, options):
    llm = make_llm(tiny_dir, speculative_config=draft_config(draft_dir), **options)
    assert token_lists(outputs(llm, PROMPTS)) == reference
    if "num_blocks" in options:
        assert llm.engine.stats().num_preemptions > 0
    assert llm.engine.stats().spec_decode_num_accepted_tokens > 0
    assert_pool_free(llm)
    assert_draft_pool_free(llm)


def test_prefix_cache_hits_in_both_pools(tiny_dir, draft_dir, reference):
    llm = make_llm(tiny_dir, speculative_config=draft_config(draft_dir))
    assert token_lists(outputs(llm, PROMPTS)) == reference
    assert token_lists(outputs(llm, PROMPTS)) == reference  # prompts now come from both caches
    assert llm.engine.stats().prefix_cache_hit_rate > 0.3
    assert proposer_of(llm).kv.prefix_hit_rate > 0.3
    assert_pool_free(llm)
    assert_draft_pool_free(llm)


def test_abort_mid_verification_returns_every_block(tiny_dir, draft_dir):
    llm = make_llm(tiny_dir, speculative_config=draft_config(draft_dir))
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    ids = [engine.add_request(None, p, params) for p in PROMPTS[:4]]
    for _ in range(40):
        engine.step()
        if engine.stats().spec_decode_num_drafts > 4:
            break
    assert engine.stats().spec_decode_num_drafts > 0
    assert proposer_of(llm).kv.num_free_blocks < proposer_of(llm).kv.num_blocks  # the draft holds blocks now
    for rid in ids:
        engine.abort_request(rid)
    deltas = engine.step()
    assert {d.request_id for d in deltas} == set(ids) and all(d.finished for d in deltas)
    assert_pool_free(llm)
    assert_draft_pool_free(llm)


def test_draft_cache_holds_only_verified_tokens_and_own_drafts(tiny_dir, draft_dir):
    """After each step the draft's cache of a sequence is its tokens before the last verify plus the
    drafts fed (never more blocks than that); the next proposal recomputes only past the common prefix."""
    llm = make_llm(tiny_dir, speculative_config=draft_config(draft_dir))
    engine, proposer = llm.engine, proposer_of(llm)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for p in PROMPTS[:5]:
        engine.add_request(None, p, params)
    while engine.has_unfinished_requests():
        engine.step()
        for seq_id, cached in proposer.cached.items():
            assert len(proposer.kv.block_ids(seq_id)) <= proposer.kv.blocks_needed(len(cached) + 1)
    assert engine.stats().spec_decode_num_draft_tokens > engine.stats().spec_decode_num_accepted_tokens > 0
    assert_draft_pool_free(llm)


def test_sampling_with_a_draft_model(tiny_dir, draft_dir, plain):
    """Seeded sampled requests run with drafts (verified by the rejection rule of
    zili.engine.spec_decode, whose distribution test is in test_spec_decode): the same seed gives
    the same tokens twice, and the first token, drawn before any draft, matches plain decoding's."""
    llm = make_llm(tiny_dir, speculative_config=draft_config(draft_dir))
    params = [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=16, seed=i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    first, again, ref = llm.generate(PROMPTS, params), llm.generate(PROMPTS, params), plain.generate(PROMPTS, params)
    assert token_lists(first) == token_lists(again)
    assert [r.outputs[0].token_ids[0] for r in first] == [r.outputs[0].token_ids[0] for r in ref]
    assert llm.engine.stats().spec_decode_num_accepted_tokens > 0
    assert_draft_pool_free(llm)
