"""Offline measures: engine throughput through `zili.LLM.generate`, single-stream prefill / decode
speed (llama-bench's pp512 and tg128), the same for HF transformers `generate`, and the
memory-bandwidth roofline of a decode step.

Single stream, the way llama-bench counts it:
- ppN: N prompt tokens / time to process them (one request, max_tokens=1: the one sampled
  token is part of the time, a negligible share at N=512);
- tgN: N / time of N decode steps after the first token, one request whose prompt is one token.
Each repetition uses a fresh random prompt, so a prefix cache never helps.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from zili.bench.machine import load_average
from zili.bench.stats import median
from zili.bench.workload import RequestSpec, random_token_ids
from zili.models.loader import open_checkpoint, resolve_model


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --- zili ---------------------------------------------------------------------------------------

def zili_vocab_size(llm) -> int:
    return int(llm.engine.model_config.vocab_size)


def zili_prefill_tps(llm, n_prompt: int, rng: random.Random) -> float:
    from zili.sampling import SamplingParams

    params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0)
    prompt = random_token_ids(rng, n_prompt, zili_vocab_size(llm))
    return n_prompt / _timed(lambda: llm.generate([prompt], params, use_tqdm=False))


def zili_decode_tps(llm, n_gen: int, rng: random.Random) -> float:
    from zili.sampling import SamplingParams

    params = SamplingParams(max_tokens=n_gen + 1, ignore_eos=True, temperature=0)
    prompt = random_token_ids(rng, 1, zili_vocab_size(llm))
    first: tuple[float, int] | None = None  # (time, tokens so far) at the first output
    last: tuple[float, int] | None = None  # ... and at the last
    for out in llm.stream(prompt, params):
        n = len(out.outputs[0].token_ids)
        if n:
            last = (time.perf_counter(), n)
            first = first or last
    if first is None or last is None or last[1] == first[1]:
        raise RuntimeError("zili produced fewer than two tokens in the decode test")
    return (last[1] - first[1]) / (last[0] - first[0])


def zili_single_stream(llm, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 3, seed: int = 0,
                       warmup: bool = True) -> dict[str, Any]:
    rng = random.Random(seed)
    if warmup:
        zili_prefill_tps(llm, min(n_prompt, 64), rng)
        zili_decode_tps(llm, min(n_gen, 8), rng)
    pp = [zili_prefill_tps(llm, n_prompt, rng) for _ in range(repetitions)]
    tg = [zili_decode_tps(llm, n_gen, rng) for _ in range(repetitions)]
    return {f"pp{n_prompt}": _tps_row(pp), f"tg{n_gen}": _tps_row(tg)}


def zili_throughput(llm, requests: Sequence[RequestSpec]) -> dict[str, Any]:
    """All requests at once through LLM.generate (the engine batches them as it likes)."""
    from zili.sampling import SamplingParams

    prompts = [r.prompt for r in requests]
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0) for r in requests]
    load_before = load_average()
    before = llm.engine.stats()
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    duration = time.perf_counter() - t0
    n_in = sum(len(o.prompt_token_ids) for o in outputs)
    n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    row = _throughput_row(len(requests), n_in, n_out, duration, load_before,
                          short_outputs=sum(1 for o, r in zip(outputs, requests)
                                            if len(o.outputs[0].token_ids) != r.output_len))
    if getattr(getattr(llm.engine, "speculator", None), "config", None) is not None:  # speculative decoding on
        row["spec_decode"] = spec_decode_row(before, llm.engine.stats())
    return row


def spec_decode_row(before: Any, after: Any) -> dict[str, Any]:
    """Speculative decoding between two EngineStats snapshots: drafts (verify steps with drafts),
    draft tokens proposed, accepted, the acceptance rate and the mean accepted length (1 + accepted
    drafts per verify step), as vLLM reports them."""
    drafts = after.spec_decode_num_drafts - before.spec_decode_num_drafts
    proposed = after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens
    accepted = after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens
    return {"num_drafts": drafts, "num_draft_tokens": proposed, "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / proposed if proposed else 0.0,
            "mean_accepted_length": 1 + accepted / drafts if drafts else 0.0}


def _tps_row(samples: list[float]) -> dict[str, Any]:
    return {"tokens_per_s": median(samples), "samples_ts": samples}


def _throughput_row(num: int, n_in: int, n_out: int, duration: float, load_before: list[float],
                    short_outputs: int = 0) -> dict[str, Any]:
    return {
        "num_requests": num,
        "input_tokens": n_in,
        "output_tokens": n_out,
        "short_outputs": short_outputs,
        "duration_s": duration,
        "request_throughput": num / duration,
        "output_throughput": n_out / duration,
        "input_throughput": n_in / duration,
        "total_token_throughput": (n_in + n_out) / duration,
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


# --- HF transformers ----------------------------------------------------------------------------

def load_hf_model(model_path: Path, dtype: str = "float32", device: Any = None, random_weights: bool = False):
    """An HF transformers causal LM from a .gguf file (dequantized) or a checkpoint directory;
    random_weights: built from the directory's config.json alone (as zili's "dummy" load format)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    model_path = Path(model_path)
    if random_weights:
        config = AutoConfig.from_pretrained(str(model_path))
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        return model.eval()
    if model_path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name,
                                                     dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch_dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


class _StepClock:
    """A transformers streamer that only notes when each step's tokens arrive."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_generate(model, input_ids, new_tokens: int, streamer=None, attention_mask=None):
    import torch

    with torch.inference_mode():
        return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, streamer=streamer,
                              pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None
                              else model.config.pad_token_id)


def hf_single_stream(model, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 3, seed: int = 0,
                     synchronize=lambda: None) -> dict[str, Any]:
    import torch

    rng = random.Random(seed)
    vocab = model.config.vocab_size
    device = next(model.parameters()).device

    def ids(n: int):
        return torch.tensor([random_token_ids(rng, n, vocab)], device=device)

    def prefill() -> float:
        x = ids(n_prompt)
        with torch.inference_mode():
            synchronize()
            # logits of the last position only, as an engine computes them for sampling
            t = _timed(lambda: (model(x, logits_to_keep=1), synchronize()))
        return n_prompt / t

    def decode() -> float:
        clock = _StepClock()
        _hf_generate(model, ids(1), n_gen + 1, streamer=clock)
        synchronize()
        # stamps[0]: the prompt; stamps[1]: first new token (prefill); stamps[2:]: one per decode step
        return n_gen / (clock.stamps[-1] - clock.stamps[1])

    prefill(), _hf_generate(model, ids(8), 4)  # warm-up
    pp = [prefill() for _ in range(repetitions)]
    tg = [decode() for _ in range(repetitions)]
    return {f"pp{n_prompt}": _tps_row(pp), f"tg{n_gen}": _tps_row(tg)}


def hf_throughput(model, requests: Sequence[RequestSpec], batch_size: int = 32,
                  synchronize=lambda: None) -> dict[str, Any]:
    """Batches of `batch_size` prompts (left-padded to the longest) through generate(); each batch
    runs to its longest max_tokens (HF has no per-row max), but only the tokens a row asked for count."""
    import torch

    device = next(model.parameters()).device
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    load_before = load_average()
    n_in = n_out = 0
    t0 = time.perf_counter()
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        width = max(len(r.prompt) for r in batch)
        ids = torch.tensor([[pad] * (width - len(r.prompt)) + list(r.prompt) for r in batch], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch], device=device)
        _hf_generate(model, ids, max(r.output_len for r in batch), attention_mask=mask)
        n_in += sum(len(r.prompt) for r in batch)
        n_out += sum(r.output_len for r in batch)
    synchronize()
    return _throughput_row(len(requests), n_in, n_out, time.perf_counter() - t0, load_before)


# --- roofline -----------------------------------------------------------------------------------

def measure_copy_bandwidth(device: Any = None, nbytes: int = 256 << 20, repetitions: int = 5,
                           synchronize=lambda: None) -> dict[str, float]:
    """Device memory bandwidth from a large tensor copy: (bytes read + bytes written) / time, best of N."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize()
    times = []
    for _ in range(repetitions):
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"bytes": nbytes, "best_s": best, "bandwidth_gb_s": 2 * nbytes / best / 1e9,
            "median_bandwidth_gb_s": 2 * nbytes / statistics.median(times) / 1e9}


def decode_roofline(weight_bytes: int, kv_bytes_per_tok: int, context_len: int, batch: int,
                    bandwidth_gb_s: float) -> dict[str, float]:
    """Upper bound on decode speed when a step must read every weight once and each sequence's KV cache:
    step_time >= bytes / bandwidth; tokens/s <= batch / step_time."""
    step_bytes = weight_bytes + batch * context_len * kv_bytes_per_tok
    step_s = step_bytes / (bandwidth_gb_s * 1e9)
    return {"batch": batch, "context_len": context_len, "bytes_per_step": step_bytes,
            "step_time_ms": step_s * 1e3, "tokens_per_s": batch / step_s}


def roofline_table(model_config, weight_bytes: int, bandwidth_gb_s: float, kv_dtype: str = "bfloat16",
                   context_len: int = 256, batches: Sequence[int] = (1, 4, 16, 32)) -> list[dict[str, float]]:
    """decode_roofline over `batches`; the KV bytes per token come from ModelConfig.kv_bytes_per_token
    (an MLA model's latent cache, not per-head keys and values)."""
    kv = model_config.kv_bytes_per_token(kv_dtype)
    return [decode_roofline(weight_bytes, kv, context_len, b, bandwidth_gb_s) for b in batches]


def model_shapes(model_path: Path) -> dict[str, Any]:
    """Vocabulary size and the shapes a roofline needs, read from the checkpoint's metadata."""
    cfg = open_checkpoint(resolve_model(str(model_path), weights_required=False)).config()
    return {"vocab_size": cfg.vocab_size, "config": cfg}
