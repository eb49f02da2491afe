"""Embeddings (PoolingParams, LLM.embed) on a tiny random Llama (fp32): the final hidden states
after the model's norm, pooled, against transformers' last hidden state of the same weights; pooling
requests batch, chunk and share the KV pool like any other request and give every block back."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_engine import PROMPTS, assert_pool_free, make_llm
from tests.unit.test_engine import tiny_dir as tiny_dir  # noqa: F401 - the module's fixture
from zili import PoolingParams, SamplingParams
from zili.sampling import InvalidRequestError

ATOL = 1e-5  # fp32 on both sides


@pytest.fixture(scope="module")
def hf_model(tiny_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def hf_embedding(hf_model, ids: list[int], pooling: str, normalize: bool = True) -> torch.Tensor:
    with torch.no_grad():
        # transformers' last hidden state is the output of the final norm, as zili's pooled rows are
        hidden = hf_model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    vector = {"mean": hidden.mean(0), "last": hidden[-1], "cls": hidden[0]}[pooling]
    return torch.nn.functional.normalize(vector, dim=0) if normalize else vector


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_embeddings_equal_transformers(tiny_dir, hf_model, pooling):  # noqa: F811
    llm = make_llm(tiny_dir)
    outs = llm.embed(PROMPTS[:5], PoolingParams(pooling))
    for out in outs:
        assert out.embedding.shape == (64,) and out.embedding.dtype == torch.float32
        assert torch.linalg.vector_norm(out.embedding).item() == pytest.approx(1.0, abs=1e-5)
        ref = hf_embedding(hf_model, out.prompt_token_ids, pooling)
        torch.testing.assert_close(out.embedding, ref, atol=ATOL, rtol=0)
        assert out.outputs[0].token_ids == []
    assert_pool_free(llm)


def test_unnormalized_and_token_id_inputs(tiny_dir, hf_model):  # noqa: F811
    llm = make_llm(tiny_dir)
    ids = llm.tokenizer.encode("The capital of France is")
    (out,) = llm.embed([ids], PoolingParams("mean", normalize=False))
    torch.testing.assert_close(out.embedding, hf_embedding(hf_model, ids, "mean", normalize=False), atol=ATOL,
                               rtol=0)


def test_batched_chunked_and_mixed_with_generation_equals_alone(tiny_dir):  # noqa: F811
    alone_llm = make_llm(tiny_dir, enable_prefix_caching=False)
    alone = {kind: [alone_llm.embed(p, PoolingParams(kind))[0].embedding for p in PROMPTS[:6]]
             for kind in ("mean", "last", "cls")}
    # chunks of 5 tokens, pooling requests of every kind batched with requests that generate
    llm = make_llm(tiny_dir, max_num_batched_tokens=5, max_num_seqs=8)
    engine = llm.engine
    for kind in ("mean", "last", "cls"):
        for i, p in enumerate(PROMPTS[:6]):
            engine.add_request(f"{kind}-{i}", p, PoolingParams(kind))
            engine.add_request(f"gen-{kind}-{i}", p, SamplingParams(max_tokens=4, ignore_eos=True))
    got = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            if delta.embedding is not None:
                got[delta.request_id] = delta.embedding
    for kind, vectors in alone.items():
        for i, vector in enumerate(vectors):
            torch.testing.assert_close(got[f"{kind}-{i}"], vector, atol=ATOL, rtol=0)
    assert_pool_free(llm)


def test_prefix_cache_hit_equals_miss(tiny_dir):  # noqa: F811
    prompts = ["You are a helpful assistant. Answer briefly. " + p for p in PROMPTS[:4]]
    miss = make_llm(tiny_dir, enable_prefix_caching=False)
    expected = {kind: [o.embedding for o in miss.embed(prompts, PoolingParams(kind))] for kind in ("mean", "last")}
    llm = make_llm(tiny_dir)
    llm.generate(prompts, SamplingParams(max_tokens=1))  # the prompts' blocks are now cached
    for kind, vectors in expected.items():
        outs = llm.embed(prompts, PoolingParams(kind))
        for out, vector in zip(outs, vectors):
            torch.testing.assert_close(out.embedding, vector, atol=ATOL, rtol=0)
        # mean pooling needs every position's state: no hit; last only its final one: hits are fine
        assert all((o.num_cached_tokens > 0) == (kind == "last") for o in outs)
    assert_pool_free(llm)


def test_preemption_and_abort_free_every_block(tiny_dir):  # noqa: F811
    reference = [o.embedding for o in make_llm(tiny_dir).embed(PROMPTS)]
    llm = make_llm(tiny_dir, num_blocks=24, max_num_batched_tokens=64)
    engine = llm.engine
    for i, p in enumerate(PROMPTS):  # generating requests grow until the pool runs out and preempts
        engine.add_request(f"gen-{i}", p, SamplingParams(max_tokens=40, ignore_eos=True))
        engine.add_request(f"emb-{i}", p, PoolingParams())
    got = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            if delta.embedding is not None:
                got[delta.request_id] = delta.embedding
    assert engine.stats().num_preemptions > 0
    for i, vector in enumerate(reference):
        torch.testing.assert_close(got[f"emb-{i}"], vector, atol=ATOL, rtol=0)
    assert_pool_free(llm)
    llm = make_llm(tiny_dir, max_num_batched_tokens=8)  # a prompt of 135 tokens takes 17 steps
    engine = llm.engine
    engine.add_request("cut", "The quick brown fox jumps over the lazy dog. " * 3, PoolingParams())
    engine.step()
    assert engine.kv_cache.num_free_blocks < engine.kv_cache.num_blocks
    engine.abort_request("cut")
    (out,) = engine.step()
    assert out.finished and out.embedding is None
    assert_pool_free(llm)


def test_bad_pooling_params_and_prompts_name_their_field(tiny_dir):  # noqa: F811
    with pytest.raises(InvalidRequestError) as err:
        PoolingParams("max")
    assert err.value.field == "pooling"
    llm = make_llm(tiny_dir, max_model_len=32)
    with pytest.raises(InvalidRequestError) as err:
        llm.embed([list(range(40, 73))])  # 33 tokens: more than the context
    assert err.value.field == "prompt"
    with pytest.raises(InvalidRequestError) as err:
        llm.embed([[]])
    assert err.value.field == "prompt"
    assert llm.embed([list(range(40, 72))])[0].embedding is not None  # exactly the context fits
