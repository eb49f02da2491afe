"""Deterministic (batch-invariant) mode: under EngineConfig.deterministic a greedy or seeded request's
tokens and logprobs are bit-for-bit the same alone, in a batch with other requests of various lengths,
after a prefix-cache hit, and with a token budget that chunks its prefill. A tiny random bf16 Llama
shows it (its int4 form too); the control test shows that without the mode the same comparisons differ,
so these tests can fail."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_models import write_tiny_llama
from zili import LLM, SamplingParams
from zili.kernels import cpu_attention
from zili.kernels.attention import AttentionMetadata, batch_invariant_paged_attention
from zili.layers import onednn
from zili.layers.linear import Linear, set_batch_invariant
from zili.layers.quant import Int4Weight, Int8Weight, float_group_quant
from zili.layers.quant_calibration import row_invariant_choice

_rng = random.Random(0)
_ALPHABET = "abcdefghijklmnopqrstuvwxyz ,."
PROMPTS = ["".join(_rng.choice(_ALPHABET) for _ in range(n)) for n in (5, 41, 77, 130)]
OTHERS = ["".join(_rng.choice(_ALPHABET) for _ in range(n)) for n in (3, 60, 170, 17)]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # Wide enough (K = 256) for the matmul libraries to block differently by row count.
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-det"), hidden_size=256, intermediate_size=512,
                            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05)


def _llm(tiny_dir, **kw) -> LLM:
    kw.setdefault("enable_prefix_caching", False)
    return LLM(str(tiny_dir), dtype="bfloat16", block_size=16, kv_cache_memory=32 << 20, max_num_seqs=16, **kw)


def _run(llm: LLM, prompts: list[str], params: SamplingParams) -> list[tuple[list[int], list[float]]]:
    outs = llm.generate(prompts, params)
    return [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs]) for o in outs]


def _situations(tiny_dir, params: SamplingParams, **kw) -> dict[str, list]:
    """The prompts' outputs alone, in a batch among others, after a prefix-cache hit, chunked."""
    llm = _llm(tiny_dir, **kw)
    got = {"alone": [_run(llm, [p], params)[0] for p in PROMPTS]}
    got["batched"] = _run(llm, OTHERS[:2] + PROMPTS + OTHERS[2:], params)[2:2 + len(PROMPTS)]
    cached = _llm(tiny_dir, enable_prefix_caching=True, **kw)
    _run(cached, [p[:len(p) * 3 // 4] + "#" for p in PROMPTS], params)  # caches a partial prefix of each
    got["prefix hit"] = _run(cached, PROMPTS, params)
    assert cached.engine.stats().prefix_cache_hit_rate > 0
    got["chunked"] = _run(_llm(tiny_dir, max_num_batched_tokens=24, **kw), PROMPTS, params)
    return got


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_deterministic_outputs_do_not_depend_on_the_batch_cache_or_chunking(tiny_dir, params):
    got = _situations(tiny_dir, params, deterministic=True)
    for name, outputs in got.items():
        assert outputs == got["alone"], name  # token ids and logprobs, bit for bit


def test_deterministic_int4_weights(tiny_dir):
    got = _situations(tiny_dir, GREEDY, deterministic=True, quantization="int4")
    for name, outputs in got.items():
        assert outputs == got["alone"], name


def test_without_deterministic_mode_the_same_comparisons_differ(tiny_dir):
    # The control: the default kernels (SDPA prefill, the decode kernel, dense matmuls by row count) give
    # other logprobs somewhere, so the tests above compare something that can differ.
    got = _situations(tiny_dir, GREEDY)
    assert any(outputs != got["alone"] for name, outputs in got.items() if name != "alone")


# ---- the kernels, one at a time ---------------------------------------------------------------


def _linear_forms() -> dict[str, Linear]:
    torch.manual_seed(0)
    weight = torch.randn(320, 256) * 0.05
    forms: dict[str, Linear] = {}
    zili_kernel = row_invariant_choice().kernel  # this CPU's level where zili's kernels build, else "torch"
    for name in ("fp32", "bf16", "onednn", "int4", "int8", "int4-zili", "int8-zili"):
        layer = Linear(256, 320)
        layer.load("weight", weight.bfloat16().float() if name != "fp32" else weight)
        if name in ("bf16", "onednn"):
            layer.to(torch.bfloat16)
        if name == "onednn":
            if not onednn.available(torch.bfloat16):
                continue
            layer.packed = onednn.PackedDense(layer.weight.detach())
        if name == "int4":
            layer.quant = Int4Weight(float_group_quant(weight), isa="torch")  # a kernel not marked row-invariant
        if name == "int8":
            layer.quant = Int8Weight(weight, isa="torch")
        if name.endswith("-zili"):
            if zili_kernel == "torch":
                continue
            layer.quant = Int4Weight(float_group_quant(weight), isa=zili_kernel) if name == "int4-zili" else \
                Int8Weight(weight, isa=zili_kernel)
            assert layer.quant.row_invariant  # called on all rows at once, untiled
        forms[name] = layer
    return forms


def test_linear_rows_are_the_same_at_every_row_count():
    x = torch.randn(70, 256)
    for name, layer in _linear_forms().items():
        set_batch_invariant(layer, 16)
        xs = x.to(layer.weight.dtype) if name in ("fp32", "bf16") else x.bfloat16()
        alone = [layer(xs[i:i + 1]) for i in range(5)]
        for rows in (2, 5, 16, 17, 70):
            y = layer(xs[:rows])
            assert y.shape == (rows, 320)
            for i in range(min(rows, 5)):
                assert torch.equal(y[i:i + 1], alone[i]), (name, rows, i)
        ref = F.linear(xs[:3].float(), layer.weight.float()) if layer.weight.numel() else None
        if ref is not None and name in ("fp32", "bf16"):
            torch.testing.assert_close(layer(xs[:3]).float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["cpp", "torch-rows"])
def test_attention_row_is_the_same_in_a_prefill_a_chunk_or_a_decode(cpu_kernel):
    if cpu_kernel and not cpu_attention.available():
        pytest.skip("zili's C++ kernel does not build here (the torch-rows case covers the mode)")
    torch.manual_seed(0)
    n_heads, n_kv, d, bs, length = 4, 2, 64, 16, 40
    q = torch.randn(length, n_heads, d, dtype=torch.bfloat16)
    k = torch.randn(length, n_kv, d, dtype=torch.bfloat16)
    v = torch.randn(length, n_kv, d, dtype=torch.bfloat16)
    table = [3, 0, 5]

    def run(splits: list[int], other: int) -> torch.Tensor:
        """The sequence's rows computed in chunks `splits`, each step beside another sequence of `other` tokens."""
        cache = torch.zeros(2, 8, bs, n_kv, d, dtype=torch.bfloat16)
        rows, done = [], 0
        for size in splits:
            qlens, slens, tables = [size], [done + size], [table]
            qs, ks, vs = [q[done:done + size]], [k[done:done + size]], [v[done:done + size]]
            if other:
                qlens, slens, tables = [other, size], [other, done + size], [[1, 2], table]
                qs, ks, vs = [torch.randn(other, n_heads, d).bfloat16()] + qs, \
                    [torch.randn(other, n_kv, d).bfloat16()] + ks, [torch.randn(other, n_kv, d).bfloat16()] + vs
            meta = AttentionMetadata.build(qlens, slens, tables, bs)
            out = batch_invariant_paged_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), cache, meta, 0.125,
                                                  cpu_kernel=cpu_kernel)
            rows.append(out[-size:])
            done += size
        return torch.cat(rows)

    whole = run([length], 0)
    assert torch.equal(run([7, 20, 13], 5), whole)
    assert torch.equal(run([1] * length, 0)[-3:], whole[-3:])  # decode rows
    assert torch.equal(run([39, 1], 3), whole)
    # and it is attention: the last row against plain softmax attention in float32
    kk, vv = (t.float().repeat_interleave(n_heads // n_kv, 1) for t in (k, v))
    probs = torch.softmax(torch.einsum("hd,shd->hs", q[-1].float(), kk) * 0.125, -1)
    torch.testing.assert_close(whole[-1].float(), torch.einsum("hs,shd->hd", probs, vv), atol=2e-2, rtol=2e-2)


def test_deterministic_must_be_a_bool():
    from zili.config import EngineConfig

    with pytest.raises(ValueError, match="deterministic"):
        EngineConfig(deterministic="yes")
