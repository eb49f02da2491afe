"""The compiled decode step (torch.compile) against the eager one on a tiny Llama: the same greedy
tokens, the graphs built at start, every decode-only step taking the compiled path, and the
set-ups it does not cover staying eager."""

from __future__ import annotations

import json
import os
import sys
import threading

import pytest
import torch

from tests.tiny_models import write_tiny_llama
from zili import LLM, SamplingParams
from zili.engine.compiled_decode import eager_by_default, unsupported_reason
from zili.engine.runner import kv_bytes_per_block

PROMPTS = ["Hello there", "The capital of France is", "def fib(n):", "1, 2, 3, 4,", "你好，世界",
           "The quick brown fox jumps over the lazy dog, then", "a", "import torch\nimport numpy as np\n"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-compiled"))


def make_llm(tiny_dir, **kw) -> LLM:
    from zili.models.hf_config import model_config_from_hf

    cfg = model_config_from_hf(json.loads((tiny_dir / "config.json").read_text()))
    kw.setdefault("dtype", "float32")
    dtype = getattr(torch, kw["dtype"])
    return LLM(str(tiny_dir), block_size=4, max_num_seqs=8,
               kv_cache_memory=256 * kv_bytes_per_block(cfg, 4, dtype), **kw)


def greedy(llm: LLM, prompts, max_tokens=40) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def compiled(tiny_dir):
    llm = make_llm(tiny_dir, enforce_eager=False)
    calls = {"n": 0}
    inner = llm.engine.runner.compiled_decode

    class Counting:
        def __call__(self, *args):
            calls["n"] += 1
            return inner(*args)

    llm.engine.runner.compiled_decode = Counting()
    return llm, calls


def test_suite_runs_eager_unless_asked():
    assert eager_by_default()  # tests/conftest.py sets ZILI_ENFORCE_EAGER=1


def test_graphs_are_built_at_start(compiled):
    llm, _ = compiled
    assert llm.engine.compile_seconds is not None and llm.engine.compile_seconds > 0


def test_compiled_greedy_equals_eager(tiny_dir, compiled):
    llm, calls = compiled
    eager = make_llm(tiny_dir, enforce_eager=True)
    assert eager.engine.runner.compiled_decode is None
    want_alone = [greedy(eager, [p])[0] for p in PROMPTS[:3]]
    want_batched = greedy(eager, PROMPTS)
    before = calls["n"]
    # Alone (the batch-1 graph) and batched (the dynamic-batch graph), with contexts that cross
    # several blocks (block_size 4) and sequences finishing at different steps.
    assert [greedy(llm, [p])[0] for p in PROMPTS[:3]] == want_alone
    assert greedy(llm, PROMPTS) == want_batched
    mixed = greedy(llm, PROMPTS[:5], max_tokens=7) + greedy(llm, PROMPTS[5:], max_tokens=23)
    assert mixed == [t[:7] for t in want_batched[:5]] + [t[:23] for t in want_batched[5:]]
    assert calls["n"] - before >= 3 * 39 + 38  # every decode-only step went through the graph
    kv = llm.engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks


def test_bf16_int8_logits_match_eager(tiny_dir):
    """The quantized path (int8 kernels below the row limit, dense above it) compiles too, and its
    logits agree with eager up to bf16 rounding."""
    from zili.kernels.attention import AttentionMetadata

    llm = make_llm(tiny_dir, dtype="bfloat16", quantization="int8", enforce_eager=False)
    runner = llm.engine.runner
    assert runner.compiled_decode is not None
    tokens = greedy(llm, PROMPTS[:4], max_tokens=6)  # fills blocks 1.. with real context
    assert all(len(t) == 6 for t in tokens)
    b = 4
    tables = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    # The same attention backend on both sides: the runner's own (eager and compiled differ only in fusion).
    meta = AttentionMetadata.build([1] * b, [9] * b, tables, 4, backend=runner.attention)
    ids, pos = torch.tensor([5, 6, 7, 8]), torch.full((b,), 8)
    with torch.inference_mode():
        got = runner.compiled_decode(ids, pos, meta)
        want = runner.model.compute_logits(runner.model(ids, pos, runner.kv_caches, meta))
    assert got.shape == want.shape == (b, llm.engine.model_config.vocab_size)
    # bf16 activations: eager rounds every intermediate, the fused loops keep some in fp32. Fresh
    # compiles of this random tiny model measured up to 3.6% of the largest logit (2026-11-29; the
    # fused code inductor picks varies between compiles), as the cpp kernel against the torch
    # reference does (4.7%); a wrong graph (a missed layer, stale cache rows) is far beyond 5%.
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_unsupported_setups_stay_eager(tiny_dir):
    llm = make_llm(tiny_dir, enforce_eager=True)
    from zili.platforms.cpu import CpuPlatform
    from zili.platforms.interface import Platform

    model, cpu = llm.engine.runner.model, CpuPlatform()
    assert unsupported_reason(model, cpu, "sdpa", False) is None
    assert unsupported_reason(model, cpu, "cpp", False) is None

    class GraphDevice(CpuPlatform):
        name = "graphdev"
        compiles_decode_step = Platform.compiles_decode_step  # the interface default: no

    assert "graphdev" in unsupported_reason(model, GraphDevice(), "sdpa", False)
    assert "tensor-parallel" in unsupported_reason(model, cpu, "sdpa", True)
    assert "triton" in unsupported_reason(model, cpu, "triton", False)
    # The family table's capabilities decide: a family without compiled_decode stays eager.
    architecture = model.config.architecture
    model.config.architecture = "deepseek_v3"
    try:
        assert "deepseek_v3" in unsupported_reason(model, cpu, "sdpa", False)
    finally:
        model.config.architecture = architecture


def test_a_failing_compiled_step_falls_back_to_eager(tiny_dir, caplog):
    llm = make_llm(tiny_dir, enforce_eager=True)
    want = greedy(llm, PROMPTS[:3], max_tokens=8)

    class Broken:
        calls = 0

        def __call__(self, *args):
            Broken.calls += 1
            raise RuntimeError("compiler gave up")

    llm.engine.runner.compiled_decode = Broken()
    assert greedy(llm, PROMPTS[:3], max_tokens=8) == want
    assert Broken.calls == 1 and llm.engine.runner.compiled_decode is None
    assert "running eagerly from now on" in caplog.text


def test_an_eager_server_process_never_loads_the_compiler(tiny_dir):
    """The compiler stack (torch._dynamo, and Inductor behind it: ~140 MiB resident) is imported only
    by a process that compiles: importing the server and building and running an eager engine with
    zili's CPU kernels leaves it out (cpu_isa.selected's constant marking once pulled it in). The
    grammar library (xgrammar, which brings transformers: ~50 MiB) waits for the first structured
    request, and is there once one has run."""
    import os
    import subprocess
    import sys

    heavy = ("torch._dynamo", "torch._inductor", "xgrammar", "transformers")
    code = ("import sys\nimport zili.server.app\nfrom zili import LLM, SamplingParams\n"
            f"llm = LLM({str(tiny_dir)!r}, enforce_eager=True, quantization='int8', kv_cache_memory=2**22)\n"
            "llm.generate(['Hello'], SamplingParams(max_tokens=2), use_tqdm=False)\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
            "structured = SamplingParams(max_tokens=2, structured={'choice': ['yes', 'no']})\n"
            "llm.generate(['Hello'], structured, use_tqdm=False)\n"
            "print('xgrammar' in sys.modules)\n")
    env = {**os.environ, "ZILI_PACKED_KERNELS": "zili"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-2:] == ["[]", "True"]


def test_max_decode_rows_counts_verify_rows():
    from zili.config import EngineConfig
    from zili.engine.builder import max_decode_rows

    def rows(**kw) -> int:
        return max_decode_rows(EngineConfig(max_num_seqs=8, **kw))

    assert rows(speculative_config="off", enable_jump_forward=False) == 8
    # The default speculates (structured requests) and verifies up to 16 forced drafts a sequence (jump-forward).
    assert rows() == 8 * (1 + 16 + 5)
    assert rows(enable_jump_forward=False) == 48
    assert rows(jump_forward_mode="append") == 48
    assert rows(speculative_config="off") == 8 * (1 + 16)
    ngram = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    assert rows(speculative_config=ngram, enable_jump_forward=False) == 48
    # No proposals once 4 sequences run: at most 3 verifying sequences (18 rows), or 8 plain rows.
    capped = dict(ngram, disable_by_batch_size=4)
    assert rows(speculative_config=capped, enable_jump_forward=False) == 18
    capped = dict(ngram, disable_by_batch_size=2)
    assert rows(speculative_config=capped, enable_jump_forward=False) == 8
    assert rows(speculative_config=capped) == 8 * (1 + 16)  # forced drafts do not stop at disable_by_batch_size


def test_verify_steps_never_compile_after_start(tiny_dir):
    """With speculation every decode row count a verify step can reach has its graph built at start
    (up to max_num_seqs x (1 + k) rows): a graph first compiled on a request stalls every stream for
    seconds (at 8 streams it made the served extraction workload 15x slower than 1 stream). The int8
    layers' row limits split the row counts into several graphs, so the test covers that split. The
    drafts come from an oracle (the plain greedy continuation), so nearly every step verifies k rows."""
    from torch._dynamo.utils import counters

    ngram = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    llm = make_llm(tiny_dir, dtype="bfloat16", quantization="int8", enforce_eager=False, speculative_config=ngram)
    engine, runner = llm.engine, llm.engine.runner
    assert runner.compiled_decode is not None
    speculator, engine.speculator = engine.speculator, None
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    plain = greedy(llm, PROMPTS, max_tokens=48)
    engine.speculator = speculator
    continuation = {tuple(ids): ids + out for ids, out in zip(prompt_ids, plain)}

    class Oracle:
        def propose(self, seqs, num_tokens):
            drafts = []
            for seq, k in zip(seqs, num_tokens):
                full = next(v for key, v in continuation.items() if tuple(seq.token_ids[:len(key)]) == key)
                drafts.append(full[seq.num_tokens:seq.num_tokens + k])
            return drafts

        def release(self, seq_id):
            pass

    speculator.proposer = Oracle()
    inner, rows_seen = runner.compiled_decode, []

    def counting(input_ids, positions, meta):
        rows_seen.append(input_ids.shape[0])
        return inner(input_ids, positions, meta)

    runner.compiled_decode = counting
    graphs_at_start = counters["stats"]["unique_graphs"]
    greedy(llm, PROMPTS, max_tokens=48)
    assert engine.stats().spec_decode_num_accepted_tokens > 0
    limits = {m.quant.max_rows for m in runner.model.modules() if getattr(m, "quant", None) is not None}
    assert max(rows_seen) > max(limits)  # verify steps went past the largest row limit (another graph)
    assert counters["stats"]["unique_graphs"] == graphs_at_start


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="per-thread nice values are a POSIX/Linux feature")
def test_background_compile_yields_to_the_serving_thread(monkeypatch):
    """A background compile must not slow what is served meanwhile (issue 22, start-up): its thread
    runs at a raised nice value and a short GIL switch interval, and the process's interval is
    restored once it is done, also when the compile fails."""
    from zili.engine import compiled_decode as cd

    seen = {}

    def fake_warm_up(self, batch_sizes, scratch_block):
        tid = threading.get_native_id()
        seen["tid"] = tid
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, tid)
        seen["switch"] = sys.getswitchinterval()
        seen["scratch_blocks"] = self.kv_caches[0].shape[1]
        if seen.get("fail"):
            raise RuntimeError("compiler unavailable")
        return 0.0

    monkeypatch.setattr(cd.CompiledDecode, "warm_up", fake_warm_up)
    calls = []  # (which, who, value): the nice value asked for, visible even where the caller's is already 19
    real_setpriority = os.setpriority
    monkeypatch.setattr(os, "setpriority", lambda *a: (calls.append(a), real_setpriority(*a))[1])
    compiled = cd.CompiledDecode.__new__(cd.CompiledDecode)
    real = [torch.zeros(2, 64, 4, 1, 8)]
    compiled.kv_caches = real
    before = sys.getswitchinterval()
    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    ready = []
    for fail in (False, True):
        seen.clear()
        seen["fail"] = fail
        compiled.start_in_background([1, 2], ready.append).join(timeout=60)
        assert (os.PRIO_PROCESS, seen["tid"], max(main_nice, cd.BACKGROUND_NICE)) in calls
        assert seen["nice"] == max(main_nice, cd.BACKGROUND_NICE)
        assert seen["switch"] == pytest.approx(min(before, cd.BACKGROUND_SWITCH_INTERVAL_S))
        assert seen["scratch_blocks"] == cd.SCRATCH_BLOCKS  # it compiled against scratch caches
        assert sys.getswitchinterval() == pytest.approx(before)  # restored for the process
        assert compiled.kv_caches is real
    assert ready == [compiled]  # on_ready only after the compile that succeeded
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice  # the caller is untouched


def test_overlapping_background_compiles_restore_the_switch_interval(monkeypatch):
    """Two engines compiling at once: the process's switch interval is restored when the last one ends,
    whichever finishes first (each restoring what it saw left the short interval in place for good)."""
    from zili.engine import compiled_decode as cd

    first_started, release_first = threading.Event(), threading.Event()

    def fake_warm_up(self, batch_sizes, scratch_block):
        if batch_sizes == [1]:  # the first engine: holds its compile open until the second has finished
            first_started.set()
            release_first.wait(timeout=60)
        return 0.0

    monkeypatch.setattr(cd.CompiledDecode, "warm_up", fake_warm_up)
    engines = []
    for _ in range(2):
        compiled = cd.CompiledDecode.__new__(cd.CompiledDecode)
        compiled.kv_caches = [torch.zeros(2, 64, 4, 1, 8)]
        engines.append(compiled)
    before = sys.getswitchinterval()
    first = engines[0].start_in_background([1], lambda _: None)
    assert first_started.wait(timeout=60)
    engines[1].start_in_background([1, 2], lambda _: None).join(timeout=60)  # starts and ends inside the first
    assert sys.getswitchinterval() == pytest.approx(min(before, cd.BACKGROUND_SWITCH_INTERVAL_S))  # one still runs
    release_first.set()
    first.join(timeout=60)
    assert sys.getswitchinterval() == pytest.approx(before)


def test_structure_key_tells_models_apart(tiny_dir, tmp_path):
    """Guards on module attributes are dropped for speed (compiled_decode._GRAPH_OPTIONS), so the code
    object graphs are cached on is chosen by structure_key: equal for the same model loaded twice,
    different for another width, dtype, quantization or a plain attribute the forward reads."""
    from zili.engine.compiled_decode import structure_key

    def key(path, **kw):
        return structure_key(make_llm(path, **kw).engine.runner.model)

    wide = write_tiny_llama(tmp_path / "wide", hidden_size=96, intermediate_size=192)
    base = key(tiny_dir)
    assert key(tiny_dir) == base
    assert len({base, key(wide), key(tiny_dir, dtype="bfloat16"),
                key(tiny_dir, dtype="bfloat16", quantization="int8")}) == 4
    model = make_llm(tiny_dir).engine.runner.model
    before = structure_key(model)
    next(m for m in model.modules() if hasattr(m, "eps")).eps = 0.5  # an RMSNorm's epsilon
    assert structure_key(model) != before


def test_two_models_in_one_process_each_get_their_own_graphs(tiny_dir, tmp_path, compiled):
    """A model of another MLP width (the same KV caches and step tensors, so only the dropped module guards
    could tell it apart) compiled after `compiled` gives its own eager tokens: it did not run the first
    model's graphs with its weights (it does when structure_key is replaced by a constant)."""
    wide = write_tiny_llama(tmp_path / "wide", intermediate_size=192, seed=3)  # KV caches as the first model's
    llm = make_llm(wide, enforce_eager=False)
    eager = make_llm(wide, enforce_eager=True)
    assert llm.engine.runner.compiled_decode is not None
    assert greedy(llm, PROMPTS[:3], max_tokens=12) == greedy(eager, PROMPTS[:3], max_tokens=12)
    first, _ = compiled
    assert greedy(first, PROMPTS[:2], max_tokens=8) == greedy(make_llm(tiny_dir, enforce_eager=True), PROMPTS[:2],
                                                            max_tokens=8)
