"""The engine on an NVIDIA GPU: Triton attention, captured decode graphs, the nccl tp=1 path.

CI has no GPU, so this folder is not in `make test`; `make test-gpu` runs it (with the Triton
kernel cases compiled for the device) on a machine that has one. Every check is an invariant or an
oracle: HF transformers on the same device, batched == alone, graphs == eager, tp path == plain.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ZILI_TUNE_CACHE", "/nonexistent/zili-gpu-tests-tune.json")

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device (run `make test` on a CPU machine)")

from tests.tiny_models import write_tiny_deepseek, write_tiny_llama  # noqa: E402
from zili import LLM, SamplingParams  # noqa: E402
from zili.engine.cuda_graphs import DecodeGraphs  # noqa: E402

PROMPTS = ["Hello there", "abc", "The quick brown fox jumps over", "0123456789" * 3, "zili", "a b c d e f g",
           "Tensor cores", "xyz" * 7]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("llama") / "m", num_hidden_layers=3)


def _llm(path, **kw):
    opts = dict(dtype="float32", kv_cache_memory=64 << 20, max_num_seqs=16, use_tune_cache=False)
    opts.update(kw)
    return LLM(str(path), **opts)


def _hf_greedy(path, prompts, llm, max_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).cuda().eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([llm.tokenizer.encode(p)], device="cuda")
            gen = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=0)
            out.append(gen[0, ids.shape[1]:].tolist())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_elementwise_match_reference(dtype):
    from zili.layers import fused

    fused.enable_fusion()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    for tokens in (1, 7, 300):
        x, d, w = rand(tokens, 512), rand(tokens, 512), rand(512)
        q, k, cos, sin = rand(tokens, 8, 64), rand(tokens, 2, 64), rand(tokens, 32), rand(tokens, 32)
        cases = [("rms_norm", (x, w, 1e-5)), ("add_rms_norm", (x, d, w, 1e-5)), ("rotary_qk", (q, k, cos, sin)),
                 ("silu_mul", (x,))]
        for name, args in cases:
            with fused.compiled_ops():
                got = getattr(fused, name)(*args)
            torch.testing.assert_close(got, fused.REFERENCE[name](*args))


def test_platform_is_cuda_with_triton(tiny_llama):
    llm = _llm(tiny_llama, enforce_eager=True)
    assert llm.engine.platform.name == "cuda"
    assert llm.engine.attention_backend == "triton"
    assert llm.engine.runner.kv_caches[0].is_cuda


def test_graphs_captured_and_replayed_same_tokens_as_eager_and_hf(tiny_llama, monkeypatch):
    eager = _llm(tiny_llama, enforce_eager=True)
    expected = _tokens(eager.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert expected == _hf_greedy(tiny_llama, PROMPTS, eager, GREEDY.max_tokens)

    replays = []
    run_host = DecodeGraphs.run_host

    def counting_run(self, *args):
        logits = run_host(self, *args)
        replays.append(logits is not None)
        return logits

    monkeypatch.setattr(DecodeGraphs, "run_host", counting_run)
    # No drafts (the default speculates for structured requests, and its verify rows extend the ladder
    # past max_num_seqs: tests_gpu/test_cuda_decoding.py covers that).
    graphed = _llm(tiny_llama, enforce_eager=False, speculative_config=None, enable_jump_forward=False)
    assert graphed.engine.graph_batch_sizes == [1, 2, 4, 8, 16]
    assert graphed.engine.fused_elementwise
    batched = _tokens(graphed.generate(PROMPTS, GREEDY, use_tqdm=False))
    alone = [_tokens(graphed.generate([p], GREEDY, use_tqdm=False))[0] for p in PROMPTS[:3]]
    assert batched == expected
    assert alone == expected[:3]
    assert replays and all(replays)  # every decode step went through a graph
    assert graphed.engine.kv_cache.num_free_blocks == graphed.engine.kv_cache.num_blocks


def test_graph_padding_rows_leave_cache_alone(tiny_llama):
    """A batch of 3 replays the size-4 graph: its padded row must not write a KV slot."""
    llm = _llm(tiny_llama, enforce_eager=False)
    caches = [c.clone() for c in llm.engine.runner.kv_caches]
    llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    # each sequence writes its prompt and 3 of its 4 new tokens (the last is sampled, never fed back)
    expected = sum(-(-(len(llm.tokenizer.encode(p)) + 3) // 16) for p in PROMPTS[:3])
    used = set()
    for seq_blocks in range(llm.engine.kv_cache.num_blocks):
        if any(not torch.equal(a[:, seq_blocks], b[:, seq_blocks]) for a, b in zip(caches, llm.engine.runner.kv_caches)):
            used.add(seq_blocks)
    # a stray write of slot -1 (a padded row) would land in the pool's last block
    assert len(used) <= expected and (llm.engine.kv_cache.num_blocks - 1) not in used


def test_bf16_graphs_batched_equal_alone(tiny_llama):
    llm = _llm(tiny_llama, dtype="bfloat16", enforce_eager=False)
    assert llm.engine.graph_batch_sizes
    batched = _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    alone = [_tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in PROMPTS]
    assert batched == alone


def test_prefix_cache_hit_equals_miss_on_cuda(tiny_llama):
    llm = _llm(tiny_llama, enforce_eager=False)
    system = "You are a helpful assistant that answers briefly. " * 2
    prompts = [system + p for p in PROMPTS[:4]]
    first = _tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    second = _tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert llm.engine.kv_cache.prefix_hit_rate > 0
    assert first == second


def test_deepseek_mla_on_cuda_matches_transformers(tmp_path):
    path = write_tiny_deepseek(tmp_path / "ds", "v3")
    llm = _llm(path, enforce_eager=False)
    assert llm.engine.graph_batch_sizes is None  # data-dependent MoE routing stays eager
    got = _tokens(llm.generate(PROMPTS[:4], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                               use_tqdm=False))
    assert got == _hf_greedy(path, PROMPTS[:4], llm, 12)


def test_tp1_distributed_path_with_nccl_equals_plain(tiny_llama):
    plain = _tokens(_llm(tiny_llama, enforce_eager=True).generate(PROMPTS, GREEDY, use_tqdm=False))
    llm = _llm(tiny_llama, enforce_eager=True, distributed_executor_backend="mp")
    try:
        assert llm.engine.tp_executor is not None and llm.engine.tp_executor.backend == "nccl"
        assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == plain
    finally:
        llm.engine.close()


def test_dummy_llama_bf16_runs_with_graphs(tmp_path):
    """The random-weight path the GPU benchmarks use, at a small Llama shape."""
    import json

    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=512, intermediate_size=1536,
               num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=4096,
               max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
               eos_token_id=2, bos_token_id=1)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(tmp_path / "cfg"), load_format="dummy", dtype="bfloat16", max_num_seqs=8, use_tune_cache=False,
              enforce_eager=False)
    assert llm.engine.graph_batch_sizes
    prompts = [[5 + i, 17, 300 + i] for i in range(6)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)
    alone = llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert alone[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_sampling_on_cuda_seeded_and_every_processor(tiny_llama):
    """Every logits processor runs on device tensors; a seeded request gives the same tokens alone,
    batched with others, and through another attention backend (its noise is drawn on the host)."""
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                            presence_penalty=0.5, frequency_penalty=0.3, logit_bias={5: 3.0}, seed=1234,
                            max_tokens=16, ignore_eos=True, logprobs=3)
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    llm = _llm(tiny_llama, enforce_eager=False)
    alone = llm.generate(["Hello there"], params, use_tqdm=False)[0].outputs[0]
    mixed = llm.generate(["abc", "Hello there", "zili"], [unseeded, params, unseeded], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone.token_ids
    assert len(alone.logprobs) == 16 and all(len(lp.top) == 3 for lp in alone.logprobs)
    # another engine (torch SDPA attention, eager) draws the same seeded tokens from the same logits
    sdpa = _llm(tiny_llama, enforce_eager=True, attention_backend="sdpa")
    assert sdpa.generate(["Hello there"], params, use_tqdm=False)[0].outputs[0].token_ids == alone.token_ids
