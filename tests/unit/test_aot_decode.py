"""The decode step compiled ahead of time (zili.engine.aot_decode) on a tiny float32 Llama: the C++
loader's logits and KV writes equal eager ones at batch 1 and above, with a KV pool larger than the
build's; greedy output is unchanged; a server process with a cached package never imports the
compiler; a stale or corrupt package is rejected and a rebuild started.

One module fixture builds the packages once (two AOTInductor compiles of the tiny model)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.tiny_models import write_tiny_llama
from zili import LLM, SamplingParams
from zili.engine import aot_decode
from zili.engine.aot_decode import AOTDecode, batch_ranges, build_into_cache, resolve, try_load_cached, weight_slots
from zili.engine.builder import aot_decode_plan
from zili.engine.runner import kv_bytes_per_block
from zili.kernels.attention import AttentionMetadata

PROMPTS = ["Hello there", "The capital of France is", "def fib(n):", "1, 2, 3, 4,", "你好，世界"]
BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-aot"))


def llm_kwargs(tiny_dir) -> dict:
    from zili.models.hf_config import model_config_from_hf

    cfg = model_config_from_hf(json.loads((tiny_dir / "config.json").read_text()))
    return dict(model=str(tiny_dir), dtype="float32", block_size=BLOCK_SIZE, max_num_seqs=8,
                kv_cache_memory=256 * kv_bytes_per_block(cfg, BLOCK_SIZE, torch.float32))


@pytest.fixture(scope="module")
def built(tiny_dir, tmp_path_factory):
    """An eager engine, and its packages built (in this process) into a cache folder of their own."""
    llm = LLM(enforce_eager=True, **llm_kwargs(tiny_dir))
    runner = llm.engine.runner
    key, ranges = aot_decode_plan(runner, llm.engine.config, llm.engine.attention_backend)
    assert ranges[0] == (1, 1) and ranges[-1][0] == 2  # a batch-1 package, and one with a dynamic batch
    root = tmp_path_factory.mktemp("aot-cache")
    folder = build_into_cache(runner.model, runner.kv_caches, BLOCK_SIZE, runner.attention, ranges, key, root)
    return llm, key, root, folder


def greedy(llm: LLM, prompts, max_tokens=24) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_batch_ranges_follow_the_graph_boundaries():
    assert batch_ranges([1, 2], 176) == [(1, 1), (2, 176)]
    assert batch_ranges([1, 2, 9], 176) == [(1, 1), (2, 8), (9, 176)]
    assert batch_ranges([1, 2, 9], 8) == [(1, 1), (2, 8)]


def test_weight_paths_resolve_back_to_the_same_tensors(built):
    llm, *_ = built
    model = llm.engine.runner.model
    slots = weight_slots(model)
    assert len(slots) > 5
    for slot in slots:
        for path in slot.paths:
            assert resolve(model, path) is slot.tensor


def test_package_holds_no_weights_and_reads_the_models_own(built):
    """No second copy: the packages carry no constants, and every weight input is the model's tensor."""
    llm, _, _, folder = built
    model = llm.engine.runner.model
    aot = AOTDecode.load(folder, model, llm.engine.runner.kv_caches)
    assert all(loader.get_constant_fqns() == [] for _, _, loader in aot.packages)
    params = {p.data_ptr() for p in model.parameters() if p.numel()}
    assert params <= {w.data_ptr() for w in aot.weights}
    assert all(any(w is p for w in aot.weights) for p in model.parameters() if p.numel())


@pytest.mark.parametrize("batch", [1, 3])
def test_logits_and_kv_writes_equal_eager(built, batch):
    llm, _, _, folder = built
    runner = llm.engine.runner
    greedy(llm, PROMPTS[:4], max_tokens=6)  # real context in the pool's first blocks
    aot = AOTDecode.load(folder, runner.model, runner.kv_caches)
    # Blocks far past the build's two scratch blocks: the pool's block count is a dynamic dimension.
    tables = [[1, 2, 200], [4, 5, 201], [7, 8, 202]][:batch]
    meta = AttentionMetadata.build([1] * batch, [11] * batch, tables, BLOCK_SIZE, backend=runner.attention)
    ids, pos = torch.tensor([5, 6, 7][:batch]), torch.full((batch,), 10)
    before = [c.clone() for c in runner.kv_caches]
    with torch.inference_mode():
        want = runner.model.compute_logits(runner.model(ids, pos, runner.kv_caches, meta)).float()
        eager_kv = [c.clone() for c in runner.kv_caches]
        for c, b in zip(runner.kv_caches, before):
            c.copy_(b)
        got = aot(ids, pos, meta)
    assert got.shape == want.shape == (batch, llm.engine.model_config.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for c, e, b in zip(runner.kv_caches, eager_kv, before):
        assert not torch.equal(c, b)  # the step wrote this token's K/V in place
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


def test_greedy_continuation_equals_eager(built):
    llm, _, _, folder = built
    runner = llm.engine.runner
    want_alone = greedy(llm, PROMPTS[:1])
    want_batched = greedy(llm, PROMPTS)
    aot = AOTDecode.load(folder, runner.model, runner.kv_caches)
    calls = {"n": 0}

    def counting(*args):
        calls["n"] += 1
        return aot(*args)

    runner.compiled_decode = counting
    try:
        assert greedy(llm, PROMPTS[:1]) == want_alone
        assert greedy(llm, PROMPTS) == want_batched
    finally:
        runner.compiled_decode = None
    assert calls["n"] >= 2 * 23  # every decode-only step went through the packages
    kv = llm.engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks


def test_a_server_process_with_a_cached_package_never_imports_the_compiler(built, tiny_dir):
    _, key, root, _ = built
    code = ("import sys\nimport zili.server.app\nfrom zili import LLM, SamplingParams\n"
            f"llm = LLM(enforce_eager=False, **{llm_kwargs(tiny_dir)!r})\n"
            "print(type(llm.engine.runner.compiled_decode).__name__)\n"
            "llm.generate(['Hello', 'a b c'], SamplingParams(max_tokens=4), use_tqdm=False)\n"
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))\n")
    env = {**os.environ, "ZILI_ENFORCE_EAGER": "0", "ZILI_BACKGROUND_COMPILE": "1", "ZILI_AOT_DECODE": "1",
           "ZILI_AOT_DECODE_DIR": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2:] == ["AOTDecode", "[]"], out.stderr[-2000:]
    assert not list(root.glob(f"{key}.job-*"))  # no build was started


def _copy(folder, root):
    dest = root / folder.name
    shutil.copytree(folder, dest)
    return dest


def test_a_corrupt_package_is_rejected_and_removed(built, tmp_path):
    llm, key, _, folder = built
    runner = llm.engine.runner
    copy = _copy(folder, tmp_path)
    pkg = next(copy.glob("*.pt2"))
    pkg.write_bytes(pkg.read_bytes()[: pkg.stat().st_size // 3])
    assert try_load_cached(key, runner.model, runner.kv_caches, tmp_path) is None
    assert not copy.exists()


def test_a_stale_package_is_rejected(built, tmp_path):
    llm, key, _, folder = built
    runner = llm.engine.runner
    copy = _copy(folder, tmp_path)
    manifest = json.loads((copy / aot_decode.MANIFEST).read_text())
    manifest["weights"][0][1] = [7, 7]  # another model's shape
    (copy / aot_decode.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="expects"):
        AOTDecode.load(copy, runner.model, runner.kv_caches)
    assert try_load_cached(key, runner.model, runner.kv_caches, tmp_path) is None and not copy.exists()


def test_a_server_rebuilds_a_rejected_package_in_a_child(built, tiny_dir, tmp_path, monkeypatch):
    """The engine serves eagerly and starts one build for the key (the build itself is the child's
    `build_into_cache`, which the fixture ran)."""
    _, key, _, folder = built
    copy = _copy(folder, tmp_path)
    (copy / aot_decode.MANIFEST).write_text("{not json")
    started = []
    monkeypatch.setattr(aot_decode, "start_child_build", lambda blob, k, ranges, done: started.append((k, ranges)))
    monkeypatch.setenv("ZILI_BACKGROUND_COMPILE", "1")
    monkeypatch.setenv("ZILI_AOT_DECODE", "1")
    monkeypatch.setenv("ZILI_AOT_DECODE_DIR", str(tmp_path))
    llm = LLM(enforce_eager=False, **llm_kwargs(tiny_dir))
    assert llm.engine.runner.compiled_decode is None  # eager until the build is done
    assert [k for k, _ in started] == [key] and not copy.exists()


def test_a_failed_build_leaves_a_marker_and_later_servers_compile_in_process(built, tiny_dir, tmp_path, monkeypatch):
    """A build that exits with an error by itself marks its key; a server then neither retries it nor waits:
    it compiles in-process (the background torch.compile)."""
    from zili.engine.compiled_decode import CompiledDecode

    _, key, ranges, _ = built
    codes = []
    job_root = tmp_path / "cache"
    # A job file the build process cannot read: it fails with an exception (exit code 1), not a signal.
    thread = aot_decode.start_child_build(b"not a pickle", key, ranges, codes.append, root=job_root)
    thread.join(timeout=120)
    assert codes and codes[0] > 0
    assert aot_decode.failed_marker(key, job_root).exists()

    started, compiled_here = [], []
    monkeypatch.setattr(aot_decode, "start_child_build", lambda *a, **k: started.append(a))
    monkeypatch.setattr(CompiledDecode, "start_in_background", lambda self, sizes, on_ready: compiled_here.append(sizes))
    monkeypatch.setenv("ZILI_BACKGROUND_COMPILE", "1")
    monkeypatch.setenv("ZILI_AOT_DECODE", "1")
    monkeypatch.setenv("ZILI_AOT_DECODE_DIR", str(job_root))
    llm = LLM(enforce_eager=False, **llm_kwargs(tiny_dir))
    assert started == [] and len(compiled_here) == 1
    assert llm.engine.runner.compiled_decode is None


def test_a_stopped_build_takes_its_compilers_with_it():
    """The build process leads its own process group; the SIGTERM its parent's death sends it kills the
    group, so the compilers it started (here a `sleep` standing in for g++) do not outlive the server."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import subprocess\nfrom zili.engine.aot_decode import stop_group_on_sigterm\nstop_group_on_sigterm()\n"
            "p = subprocess.Popen(['sleep', '60'])\nprint(p.pid, flush=True)\np.wait()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             preexec_fn=aot_decode._in_child)
    grandchild = int(child.stdout.readline())
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == -signal.SIGKILL
    for _ in range(100):  # gone, or a zombie waiting for init to reap it
        try:
            state = open(f"/proc/{grandchild}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        time.sleep(0.05)
    raise AssertionError(f"the build's subprocess {grandchild} is still running")
