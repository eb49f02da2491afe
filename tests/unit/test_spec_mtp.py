"""Speculative decoding with DeepSeek's multi-token-prediction layer (zili.engine.mtp): method "deepseek_mtp".

Invariants, on tiny DeepSeek-V3 checkpoints with one MTP layer (fp32): greedy output equals plain
decoding token for token (random weights: drafts mostly rejected; an MTP layer built to predict well:
most accepted); after every step the MTP layer's pending draft and hidden state equal a from-scratch
computation over the sequence's tokens (its KV entries in the target's blocks stay in step through
rejections, prefix-cache hits and preemption), and so do the recursive drafts past its one depth;
aborts and preemption return every block; a checkpoint without an MTP layer is refused naming the field."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import safetensors
import torch

from tests.tiny_models import write_tiny_deepseek_mtp
from zili import LLM, SamplingParams
from zili.config import EngineConfig, parse_speculative_config
from zili.engine.kv_cache import KVCacheManager
from zili.engine.mtp import MTPProposer
from zili.engine.runner import kv_bytes_per_block
from zili.kernels.attention import AttentionMetadata
from zili.models.hf_config import model_config_from_hf
from zili.weights import safetensors as hf_weights

PROMPTS = ["Hello there", "The capital of France is", "abc abc abc abc abc", "def fib(n):", "a",
           "Invoice 4471, total 93.20 EUR. Invoice 4471, total"]
# The same prompts diverging right after their first two blocks (block_size 4): a prefix-cache hit whose
# last MTP entry (position 7) was made for another next token.
DIVERGING = [p[:8] + "|" + p[8:] for p in PROMPTS if len(p) > 8]


def mtp_config(k: int = 3, method: str = "deepseek_mtp") -> dict:
    return {"method": method, "num_speculative_tokens": k}


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    threads = torch.get_num_threads()  # the engine sets the process's thread count
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_mtp(tmp_path_factory):
    """(big, path): a random V3 with one MTP layer; `big` is a 4-layer model without one."""
    return write_tiny_deepseek_mtp(tmp_path_factory.mktemp("mtp-random"))


@pytest.fixture(scope="module")
def good_mtp(tmp_path_factory):
    """A V3 whose MTP layer predicts the main model's next-but-one token well (see write_tiny_deepseek_mtp)."""
    return write_tiny_deepseek_mtp(tmp_path_factory.mktemp("mtp-good"), branch_scale=0.002)[1]


def make_llm(path, num_blocks=256, block_size=4, **kw) -> LLM:
    cfg = model_config_from_hf(json.loads((path / "config.json").read_text()))
    kw.setdefault("max_num_seqs", 16)
    kw.setdefault("threads", 1)
    kw.setdefault("attention_backend", "sdpa")  # no C++ kernel build for a tiny model
    return LLM(str(path), dtype="float32", block_size=block_size,
               kv_cache_memory=num_blocks * kv_bytes_per_block(cfg, block_size, torch.float32), **kw)


def greedy(llm: LLM, prompts=PROMPTS, max_tokens=16) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def proposer_of(llm: LLM) -> MTPProposer:
    proposer = llm.engine.speculator.proposer
    assert isinstance(proposer, MTPProposer)
    return proposer


def assert_pool_free(llm: LLM) -> None:
    """Every block back (the MTP layer's entries live in these blocks: there is no second pool)."""
    kv = llm.engine.kv_cache
    assert kv.tables == {} and kv.num_free_blocks == kv.num_blocks
    assert all(b.ref_count == 0 for b in kv.blocks)
    assert proposer_of(llm).first_drafts == {}


@pytest.fixture(scope="module")
def random_plain(random_mtp):
    return make_llm(random_mtp[1])


@pytest.fixture(scope="module")
def random_reference(random_plain):
    return greedy(random_plain)


# ---- configuration ------------------------------------------------------------------------------

def test_config_parses_like_vllm():
    got = parse_speculative_config(mtp_config())
    assert (got.method, got.num_speculative_tokens, got.model) == ("deepseek_mtp", 3, None)
    assert parse_speculative_config(mtp_config(method="mtp")) == got  # vLLM's newer name
    assert EngineConfig(speculative_config=json.dumps(mtp_config(2))).speculative_config.method == "deepseek_mtp"
    with pytest.raises(ValueError, match=r"speculative_config\.model"):
        EngineConfig(speculative_config={**mtp_config(), "model": "x"})


def test_checkpoint_without_mtp_layer_is_refused(random_mtp, tmp_path):
    big, _ = random_mtp  # declares num_nextn_predict_layers=1 (transformers' default) but has no MTP tensors
    with pytest.raises(ValueError, match=r"speculative_config\.method.*MTP layer.*missing"):
        make_llm(big, speculative_config=mtp_config())
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).symlink_to(big / name)
    config = json.loads((big / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.raises(ValueError, match=r"speculative_config\.method.*num_nextn_predict_layers"):
        make_llm(tmp_path, speculative_config=mtp_config())


def test_prefix_hit_gives_up_its_last_block():
    kv = KVCacheManager(8, 2, recompute_last_hit_block=True)
    tokens = [1, 2, 3, 4, 5, 6, 7]
    assert kv.allocate("a", 7)
    kv.register_full_blocks("a", tokens, 7)
    plain = KVCacheManager(8, 2)
    assert plain.allocate("a", 7)
    plain.register_full_blocks("a", tokens, 7)
    assert len(plain.find_cached_prefix(tokens)) == 3
    assert kv.find_cached_prefix(tokens) == kv.block_ids("a")[:2]


# ---- the engine ---------------------------------------------------------------------------------

class _CountingSafeOpen:
    """safetensors' safe_open, counting the tensors read by name."""

    def __init__(self, reads: Counter, *args, **kwargs) -> None:
        self.reads, self.file = reads, safetensors.safe_open(*args, **kwargs)

    def __enter__(self):
        self.file.__enter__()
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def keys(self):
        return self.file.keys()

    def get_tensor(self, name: str):
        self.reads[name] += 1
        return self.file.get_tensor(name)


def test_greedy_equals_plain_with_a_random_mtp_layer(random_mtp, random_reference, monkeypatch):
    reads: Counter = Counter()
    monkeypatch.setattr(hf_weights, "safe_open", lambda *a, **k: _CountingSafeOpen(reads, *a, **k))
    llm = make_llm(random_mtp[1], speculative_config=mtp_config(3))
    monkeypatch.undo()
    # The MTP layer's loader asks the checkpoint for its own tensors only (not its copy of the embedding,
    # which it shares with the main model): every other tensor is read once, by the main model's loader.
    mtp = f"model.layers.{llm.engine.model_config.num_hidden_layers}."
    assert reads[mtp + "eh_proj.weight"] == 2 and reads[mtp + "embed_tokens.weight"] == 1
    assert all(n == 1 for name, n in reads.items() if not name.startswith(mtp)), reads.most_common(3)
    assert greedy(llm) == random_reference
    stats = llm.engine.stats()
    assert stats.spec_decode_num_draft_tokens > 0 and stats.spec_decode_num_drafts > 0
    assert stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens  # a random head misses
    assert proposer_of(llm).num_forward_passes > 0
    assert_pool_free(llm)


def test_a_predictive_mtp_layer_is_accepted(good_mtp):
    """k = 4 > num_nextn_predict_layers = 1: the layer is reused recursively; most drafts hit, the output
    is plain decoding's, steps are saved, and /metrics shows the counters."""
    from zili.server.metrics import ServerMetrics

    plain = make_llm(good_mtp)
    reference = greedy(plain, max_tokens=24)
    llm = make_llm(good_mtp, speculative_config=mtp_config(4))
    assert greedy(llm, max_tokens=24) == reference
    stats = llm.engine.stats()
    assert stats.spec_decode_acceptance_rate > 0.5, stats
    assert stats.spec_decode_mean_accepted_length > 2.0, stats
    assert stats.num_steps < plain.engine.stats().num_steps * 0.6
    text = ServerMetrics(llm.engine, "m").render().decode()
    accepted = float(text.split('zili_spec_decode_num_accepted_tokens_total{model_name="m"} ')[1].split()[0])
    assert accepted == stats.spec_decode_num_accepted_tokens > 0
    assert_pool_free(llm)


def reference_drafts(llm: LLM, tokens: list[int], k: int) -> tuple[torch.Tensor, list[int]]:
    """From scratch, in fresh caches with the torch reference attention: the main model over tokens[:-1],
    the MTP layer over (h_i, t_{i+1}); returns its last output h''_{n-2} and k recursive drafts."""
    engine = llm.engine
    model, mtp, cfg = engine.runner.model, proposer_of(llm).mtp, engine.model_config
    n, bs = len(tokens), 4
    blocks = -(-(n + k) // bs)
    table = list(range(blocks))
    caches = [torch.zeros(cfg.kv_cache_shape(blocks, bs, torch.float32)) for _ in range(cfg.num_hidden_layers)]
    mtp_cache = [torch.zeros(cfg.kv_cache_shape(blocks, bs, torch.float32))]

    def meta(q, s):
        return AttentionMetadata.build([q], [s], [table], bs, "cpu")

    with torch.inference_mode():
        h = model(torch.tensor(tokens[:-1]), torch.arange(n - 1), caches, meta(n - 1, n - 1))
        out = mtp(torch.tensor(tokens[1:]), torch.arange(n - 1), mtp_cache, meta(n - 1, n - 1), previous_hidden=h)
        last = out[-1:]
        drafts = [int(mtp.compute_logits(last).argmax())]
        for j in range(1, k):
            last = mtp(torch.tensor([drafts[-1]]), torch.tensor([n - 2 + j]), mtp_cache, meta(1, n - 1 + j),
                       previous_hidden=last)
            drafts.append(int(mtp.compute_logits(last).argmax()))
    return out[-1], drafts


@pytest.mark.parametrize("options", [
    {},
    {"num_blocks": 24, "max_num_batched_tokens": 12},  # preemption and chunked prefill
])
def test_mtp_cache_stays_in_step(random_mtp, random_plain, random_reference, options):
    """After every step, each sequence's pending draft state equals a from-scratch computation over its
    tokens, and so do the k recursive drafts (so no stale or missing MTP entry is read), through
    rejections, prefix-cache hits (prompts sharing their first blocks with earlier requests) and preemption."""
    llm = make_llm(random_mtp[1], speculative_config=mtp_config(3), **options)
    engine, proposer = llm.engine, proposer_of(llm)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    checked = recursive = 0
    for prompts, reference in ((PROMPTS, random_reference), (DIVERGING, greedy(random_plain, DIVERGING))):
        ids = [engine.add_request(None, p, params) for p in prompts]
        results: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for delta in engine.step():
                results.setdefault(delta.request_id, []).extend(delta.outputs[0].token_ids)
            running = {seq.seq_id: seq for seq in engine.scheduler.running}
            for seq_id, first in proposer.first_drafts.items():
                seq = running[seq_id]  # finished sequences keep no pending draft
                want_hidden, want_drafts = reference_drafts(llm, seq.token_ids, 3)
                torch.testing.assert_close(first.hidden, want_hidden, atol=1e-4, rtol=1e-4)
                if seq.num_computed_tokens == seq.num_tokens - 1:
                    # Only d_1 where the pool has no free slot for the recursive passes (a small pool).
                    got = proposer.propose([seq], [3])[0]
                    assert got and got == want_drafts[:len(got)]
                    recursive += len(got) == 3
                checked += 1
        assert [results[i] for i in ids] == [r[:12] for r in reference]
    assert checked > 10 and recursive > 0
    stats = engine.stats()
    assert stats.prefix_cache_hit_rate > 0
    if "num_blocks" in options:
        assert stats.num_preemptions > 0
    assert_pool_free(llm)


def test_a_prefill_only_prompts_cached_blocks_leave_no_stale_mtp_entry(random_mtp):
    """A scoring request (max_tokens 0) computes no MTP entry for its last prompt position (its next token
    is unknown); its full blocks go to the prefix cache. A later request that reaches that block through a
    longer cached prefix (not as the last hit block, which is recomputed) must still see MTP entries
    equal to a from-scratch computation."""
    llm = make_llm(random_mtp[1], speculative_config=mtp_config(3))
    engine, proposer = llm.engine, proposer_of(llm)
    prompt = list(range(40, 48))  # two full blocks (block_size 4)
    llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=0))
    longer = prompt + list(range(60, 68))
    llm.generate([longer], SamplingParams(temperature=0, max_tokens=1))  # caches its third block after the first two
    engine.add_request(None, longer + [70, 71], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    checked = 0
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            first = proposer.first_drafts.get(seq.seq_id)
            if first is not None:
                torch.testing.assert_close(first.hidden, reference_drafts(llm, seq.token_ids, 3)[0], atol=1e-4, rtol=1e-4)
                checked += 1
    assert checked and engine.kv_cache.prefix_hit_rate > 0
    assert_pool_free(llm)


def test_abort_mid_verification_returns_every_block(random_mtp):
    llm = make_llm(random_mtp[1], speculative_config=mtp_config(3))
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    ids = [engine.add_request(None, p, params) for p in PROMPTS]
    for _ in range(40):
        engine.step()
        if engine.stats().spec_decode_num_drafts > 4:
            break
    assert engine.stats().spec_decode_num_drafts > 0 and proposer_of(llm).first_drafts
    for rid in ids:
        engine.abort_request(rid)
    deltas = engine.step()
    assert {d.request_id for d in deltas} == set(ids) and all(d.finished for d in deltas)
    assert_pool_free(llm)
