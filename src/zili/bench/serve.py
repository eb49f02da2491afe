"""Serving load generator for any OpenAI-compatible endpoint (zili's server, llama-server, vLLM...).

Each request streams (SSE) so that time to first token and the gap between tokens can be measured
on the client. Output tokens are counted from the server's `usage` (asked for with
`stream_options.include_usage`); when a server sends none, the token-bearing chunks are counted.
Every request sets `ignore_eos` and `max_tokens`, so every engine generates the same number of
tokens for the same workload.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import httpx

from zili.bench.machine import load_average
from zili.bench.stats import summarize
from zili.bench.workload import RequestSpec

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class RequestResult:
    ok: bool
    input_len: int  # intended prompt length
    max_tokens: int
    prompt_tokens: int | None = None  # from usage, when the server reports it
    output_tokens: int = 0
    token_count_source: str = "chunks"  # "usage" or "chunks"
    ttft_s: float | None = None
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive token-bearing chunks
    start_s: float = 0.0  # when it was sent, relative to the start of the run
    error: str | None = None


def build_payload(spec: RequestSpec, model: str, endpoint: str, extra: dict[str, Any] | None = None) -> dict:
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": spec.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if endpoint == "chat":
        if not isinstance(spec.prompt, str):
            raise ValueError("the chat endpoint takes text prompts: use --prompt-source random-words or file")
        payload["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        payload["prompt"] = spec.prompt
    payload.update(extra or {})
    return payload


def chunk_text(chunk: dict, endpoint: str) -> tuple[bool, str]:
    """(carries a choice, its text) for one streamed chunk."""
    choices = chunk.get("choices") or []
    if not choices:
        return False, ""
    choice = choices[0]
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    else:
        text = choice.get("text") or ""
    # A final chunk carrying only the finish reason is not a token.
    is_token = bool(text) or choice.get("finish_reason") is None
    return is_token, text


async def parse_sse_lines(lines, endpoint: str, result: RequestResult, t_sent: float) -> None:
    """Consume `data:` lines from an async iterator, filling timing and token counts of `result`."""
    last = None
    n_chunks = 0
    for_usage: int | None = None
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"stream error: {chunk['error']}")
        now = time.perf_counter()
        is_token, _ = chunk_text(chunk, endpoint)
        if is_token:
            n_chunks += 1
            if last is None:
                result.ttft_s = now - t_sent
            else:
                result.itl_s.append(now - last)
            last = now
        usage = chunk.get("usage")
        if usage:
            for_usage = usage.get("completion_tokens", for_usage)
            result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
    if for_usage is not None:
        result.output_tokens, result.token_count_source = int(for_usage), "usage"
    else:
        result.output_tokens, result.token_count_source = n_chunks, "chunks"


async def send_request(client: httpx.AsyncClient, url: str, model: str, spec: RequestSpec,
                       endpoint: str = "completions",
                       extra: dict[str, Any] | None = None, t0: float = 0.0) -> RequestResult:
    result = RequestResult(ok=False, input_len=spec.input_len, max_tokens=spec.output_len)
    payload = build_payload(spec, model, endpoint, extra)
    t_sent = time.perf_counter()
    result.start_s = t_sent - t0
    try:
        async with client.stream("POST", url.rstrip("/") + ENDPOINTS[endpoint], json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                raise RuntimeError(f"HTTP {response.status_code}: {body[:300]}")
            await parse_sse_lines(response.aiter_lines(), endpoint, result, t_sent)
        result.ok = result.ttft_s is not None
        if not result.ok:
            result.error = "stream ended without a token"
    except Exception as e:  # every failure is counted, never raised: one bad request must not end a run
        result.error = f"{type(e).__name__}: {e}"[:500]
    result.latency_s = time.perf_counter() - t_sent
    return result


def aggregate(results: Sequence[RequestResult], duration_s: float) -> dict[str, Any]:
    """Throughput and latency figures of one run. Latencies in milliseconds."""
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.input_len for r in done)
    ms = 1000.0
    ttft = [r.ttft_s for r in done if r.ttft_s is not None]  # every completed request has one (`ok`)
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) * ms for r in done
            if r.output_tokens > 1 and r.ttft_s is not None]
    errors = [str(r.error) for r in results if not r.ok]
    return {
        "num_requests": len(results),
        "completed": len(done),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "duration_s": duration_s,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        # ignore_eos honoured: every request gave exactly max_tokens
        "short_outputs": sum(1 for r in done if r.output_tokens != r.max_tokens),
        "token_count_source": sorted({r.token_count_source for r in done}),
        "request_throughput": len(done) / duration_s if duration_s > 0 else None,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else None,
        "input_throughput": in_tokens / duration_s if duration_s > 0 else None,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s if duration_s > 0 else None,
        "ttft_ms": summarize(t * ms for t in ttft),
        "tpot_ms": summarize(tpot),
        "itl_ms": summarize(x * ms for r in done for x in r.itl_s),
        "e2e_ms": summarize(r.latency_s * ms for r in done),
    }


@dataclass
class LoadSpec:
    """One load level: a fixed number of requests in flight, or Poisson arrivals at a rate
    (requests/s), optionally capped at a concurrency."""

    concurrency: int | None = None
    request_rate: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency is None and self.request_rate is None:
            raise ValueError("a load level needs a concurrency or a request rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ValueError(f"request rate must be > 0, got {self.request_rate}")

    @property
    def label(self) -> str:
        parts = []
        if self.request_rate is not None:
            parts.append(f"rate={self.request_rate:g}/s")
        if self.concurrency is not None:
            parts.append(f"c={self.concurrency}")
        return ",".join(parts)


async def run_load(url: str, model: str, requests: Sequence[RequestSpec], load: LoadSpec, endpoint: str = "completions",
                   extra: dict[str, Any] | None = None, timeout_s: float = 600.0, seed: int = 0,
                   keep_requests: bool = False, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Send every request under `load`; return the aggregate figures (and per-request rows if asked).
    `headers` go with every request (e.g. Authorization for a server that needs a key)."""
    limit = load.concurrency or len(requests)
    limits = httpx.Limits(max_connections=limit + 4, max_keepalive_connections=limit + 4)
    timeout = httpx.Timeout(timeout_s, connect=30.0)
    results: list[RequestResult | None] = [None] * len(requests)
    load_before = load_average()
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        t0 = time.perf_counter()
        if load.request_rate is None:
            queue = iter(enumerate(requests))

            async def worker() -> None:
                for i, spec in queue:  # the shared iterator hands each request to exactly one worker
                    results[i] = await send_request(client, url, model, spec, endpoint, extra, t0)

            await asyncio.gather(*(worker() for _ in range(min(limit, len(requests)))))
        else:
            rng = random.Random(seed)
            gate = asyncio.Semaphore(limit)

            async def one(i: int, spec: RequestSpec) -> None:
                async with gate:
                    results[i] = await send_request(client, url, model, spec, endpoint, extra, t0)

            tasks = []
            for i, spec in enumerate(requests):
                tasks.append(asyncio.create_task(one(i, spec)))
                await asyncio.sleep(rng.expovariate(load.request_rate))
            await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    done = [r for r in results if r is not None]
    figures = aggregate(done, duration)
    figures.update({"load": load.label, "concurrency": load.concurrency, "request_rate": load.request_rate,
                    "load_average_before": load_before, "load_average_after": load_average()})
    if keep_requests:
        figures["requests"] = [asdict(r) for r in done]
    return figures


async def warm_up(url: str, model: str, requests: Sequence[RequestSpec], endpoint: str = "completions",
                  extra: dict[str, Any] | None = None, timeout_s: float = 600.0, busy_wait_s: float = 300.0,
                  headers: dict[str, str] | None = None) -> list[str]:
    """Send a few requests one by one, unrecorded; return their errors (empty when all went well).
    A 503 (still loading) is retried for up to `busy_wait_s`."""
    errors = []
    deadline = time.monotonic() + busy_wait_s
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0), headers=headers) as client:
        for spec in requests:
            while True:
                r = await send_request(client, url, model, spec, endpoint, extra)
                if r.ok or "HTTP 503" not in (r.error or "") or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
            if not r.ok:
                errors.append(r.error or "failed")
    return errors


async def wait_until_ready(url: str, timeout_s: float = 300.0, process=None) -> None:
    """Poll GET {url}/health until it answers 200 (llama-server and zili answer 503 while loading);
    a server without /health (404) is ready when GET /v1/models answers 200. Raise TimeoutError past
    the deadline, or RuntimeError when `process` (a Popen) exits first."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server process exited with status {process.returncode} before it was ready")
            try:
                status = (await client.get(url.rstrip("/") + "/health")).status_code
                if status == 404:
                    status = (await client.get(url.rstrip("/") + "/v1/models")).status_code
                if status == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} did not become ready within {timeout_s:.0f} s")

def default_num_prompts(concurrency: int, waves: int = 2, min_prompts: int = 4) -> int:
    """`waves` full batches at each level (at least `min_prompts` requests): enough to see steady
    state, few enough to keep a round short."""
    return max(min_prompts, waves * concurrency)


async def discover_model_name(url: str) -> str:
    async with httpx.AsyncClient(timeout=10.0) as client:
        data = (await client.get(url.rstrip("/") + "/v1/models")).json()
    return data["data"][0]["id"]
