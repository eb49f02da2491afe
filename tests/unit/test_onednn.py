"""Dense bf16 weights pre-packed for oneDNN (zili.layers.onednn): the same numbers as F.linear,
eagerly and inside torch.compile, dense copies released where nothing reads them, and an engine
that packs gives the same tokens as one that does not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_models import write_tiny_llama
from zili.layers import onednn
from zili.layers.linear import Linear

pytestmark = pytest.mark.skipif(not onednn.available(torch.bfloat16),
                                reason="this torch build or CPU has no oneDNN bf16 matmul")


def test_available_only_for_bf16_and_not_when_switched_off(monkeypatch):
    assert not onednn.available(torch.float32)
    monkeypatch.setenv("ZILI_ONEDNN", "0")
    assert not onednn.available(torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 3, 64, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_matmul_equals_linear(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=gen).to(torch.bfloat16)
    b = torch.randn(96, generator=gen).to(torch.bfloat16) if with_bias else None
    x = torch.randn(rows, 80, generator=gen).to(torch.bfloat16)
    packed = onednn.PackedDense(w)
    got = packed.matmul(x, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
    assert torch.equal(got, F.linear(x, w, b))  # one oneDNN kernel either way: bitwise equal
    # An fp32 input is run in bf16 and handed back as fp32.
    got32 = packed.matmul(x.float(), b)
    assert got32.dtype == torch.float32 and torch.equal(got32, got.float())


def test_registry_drops_a_collected_packing():
    """A discarded engine's packed weights leave the registry with it (no growth across engines)."""
    import gc

    packed = onednn.PackedDense(torch.randn(16, 32).to(torch.bfloat16))
    handle = packed.handle
    assert handle in onednn._PACKED
    del packed
    gc.collect()
    assert handle not in onednn._PACKED


def test_packed_matmul_inside_torch_compile():
    w = torch.randn(48, 32).to(torch.bfloat16)
    packed = onednn.PackedDense(w)

    def f(x):
        return torch.relu(packed.matmul(x)) * 2

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    with torch.inference_mode():
        for rows in (5, 17, 64):
            x = torch.randn(rows, 32).to(torch.bfloat16)
            assert torch.equal(compiled(x), f(x))


def test_pack_releases_dense_weights_except_readers_and_tied(tmp_path):
    from zili.models.loader import load_model

    path = write_tiny_llama(tmp_path / "m", tie_word_embeddings=True)
    model = load_model(str(path), dtype="bfloat16").model
    linears = {n: m for n, m in model.named_modules() if type(m) is Linear}
    dense_bytes = {n: m.weight.numel() * 2 for n, m in linears.items()}
    assert onednn.pack_dense_weights(model) == len(linears)
    for name, m in linears.items():
        assert m.packed is not None
        if name == "lm_head":  # tied to the embedding, and read by the top-k refinement
            assert m.weight.numel() > 0 and m.weight is model.model.embed_tokens.weight
        else:
            assert m.weight.numel() == 0, name
    released = sum(b for n, b in dense_bytes.items() if n != "lm_head")
    assert onednn.packed_only_bytes(model) == released


def test_engine_packs_and_generates_the_same_tokens(tmp_path, monkeypatch):
    from zili import LLM, SamplingParams

    path = write_tiny_llama(tmp_path / "m")
    prompts = ["Hello there", "The capital of France is", "def fib(n):", "a b c d e f"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    mem = 4 * 2**20
    llm = LLM(str(path), dtype="bfloat16", kv_cache_memory=mem, block_size=16)
    linears = [m for m in llm.engine.runner.model.modules() if type(m) is Linear]
    assert linears and all(m.packed is not None for m in linears)
    packed = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    monkeypatch.setenv("ZILI_ONEDNN", "0")
    plain = LLM(str(path), dtype="bfloat16", kv_cache_memory=mem, block_size=16)
    assert all(m.packed is None for m in plain.engine.runner.model.modules() if type(m) is Linear)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    assert packed == alone == want


def test_tied_q8_0_table_is_held_once_and_reads_the_same(tmp_path, monkeypatch):
    """A tied embedding / LM head stored as Q8_0 is held once: the int8 blocks (the file's own codes),
    no dense table and no oneDNN copy beside them. Lookups give the dense table's values bit for bit,
    and the logits (the int8 head at every batch size, its top-k refined from those rows) agree with
    the dense-table model's and pick the same tokens."""
    from tests.unit.test_gguf import write_tiny_gguf
    from zili.models.loader import load_model, open_checkpoint, resolve_model
    from zili.models.quantize import quantize_and_calibrate

    path = tmp_path / "tied.gguf"
    write_tiny_gguf(path)
    monkeypatch.setenv("ZILI_PACKED_KERNELS", "zili")

    def build(release: bool):
        loaded = load_model(str(path), dtype="bfloat16")
        with monkeypatch.context() as m:
            if not release:
                m.setattr("zili.models.quantize.serve_tied_embedding_from_head", lambda model: False)
            report = quantize_and_calibrate(loaded.model, "auto", torch.bfloat16, "cpu-packed",
                                            lambda: open_checkpoint(loaded.source), calibrate=False)
        return loaded.model, report

    dense, kept = build(release=False)
    once, report = build(release=True)
    assert not kept.tied_table_released and report.tied_table_released
    table, head = once.model.embed_tokens, once.lm_head
    assert table.weight.numel() == 0 and head.weight is table.weight  # no dense copy left
    assert head.packed is None and head.quant.exact and dense.lm_head.packed is not None
    ids = torch.arange(dense.config.vocab_size)
    exact = open_checkpoint(resolve_model(str(path))).tensor("model.embed_tokens.weight")  # float32, the file's
    with torch.inference_mode():
        assert torch.equal(table(ids), dense.model.embed_tokens(ids))
        hidden = torch.randn(40, dense.config.hidden_size).bfloat16()
        ref = hidden.float() @ exact.t()
        for rows in (1, 40):  # the int8 kernel at one row and at many (the dense-table model: oneDNN there)
            got, want = once.compute_logits(hidden[:rows]), ref[:rows]
            # The leading logits are recomputed in fp32 from the exact rows: the true argmax, its true value.
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            top = want.argmax(-1, keepdim=True)
            torch.testing.assert_close(got.gather(1, top), want.gather(1, top), atol=1e-3, rtol=1e-4)
            assert torch.equal(dense.compute_logits(hidden[:rows]).argmax(-1)[:1], want.argmax(-1)[:1])
